"""Triton cascade decode attention (triton_cascade.py) against float64 attention over each row's whole
sequence, in Triton's interpreter (TRITON_INTERPRET=0 on a CUDA machine runs the compiled kernels).

Rows of a group point at the same prefix slots in req_to_token, as the radix tree hands them out; every row
also has keys of its own. The cases cut level 0 and level 1 into several splits and tiles, put more rows in
a group than one prefix program holds, and include a row in no group."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton", reason="triton is not installed or fails to import", exc_type=ImportError)

from radixserve.memory.kv_pool import KVCache, ReqToTokenTable  # noqa: E402
from radixserve.ops.attention import cascade  # noqa: E402
from radixserve.ops.attention.cascade import CascadePlan  # noqa: E402
from radixserve.ops.attention.triton_backend import TritonAttentionBackend  # noqa: E402
from radixserve.ops.attention.triton_cascade import (  # noqa: E402
    PREFIX_BLOCK_M,
    cascade_decode_attention,
    cascade_tensors,
)
from radixserve.ops.forward_batch import AttentionBatch  # noqa: E402
from radixserve.ops.triton_launch import interpreting  # noqa: E402

DEVICE = "cpu" if interpreting() else "cuda"
if DEVICE == "cuda" and not torch.cuda.is_available():
    pytest.skip("TRITON_INTERPRET is off and there is no CUDA device", allow_module_level=True)

LAYER, HEAD_DIM = 0, 64


class SharedPrefixCase:
    """groups: (prefix_len, [own keys of each row]); a prefix of 0 is a row in no group (own keys only)."""

    def __init__(self, groups: list[tuple[int, list[int]]], q_heads: int, kv_heads: int, dtype: torch.dtype,
                 kv_dtype: torch.dtype, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        rows = [(p, own) for p, owns in groups for own in owns]
        total = sum(p for p, _ in groups) + sum(own for _, own in rows)
        self.cache = KVCache(1, total + 1, kv_heads, HEAD_DIM, kv_dtype, DEVICE)
        k = torch.randn(total + 1, kv_heads, HEAD_DIM, generator=g)
        v = torch.randn(total + 1, kv_heads, HEAD_DIM, generator=g)
        self.cache.store(LAYER, torch.arange(total + 1, device=DEVICE), k.to(dtype).to(DEVICE),
                         v.to(dtype).to(DEVICE))
        free = (torch.randperm(total, generator=g) + 1).tolist()  # slot 0 is padding
        longest = max(p + o for p, o in rows)
        table = ReqToTokenTable(max_rows=len(rows) + 2, max_context=longest, device=DEVICE)
        req_rows = torch.randperm(table.max_rows, generator=g)[: len(rows)]
        self.slots: list[torch.Tensor] = []
        shared, seq_lens, r = [], [], 0
        for prefix_len, owns in groups:
            prefix = [free.pop() for _ in range(prefix_len)]
            for i, own in enumerate(owns):
                slots = torch.tensor(prefix + [free.pop() for _ in range(own)])
                table.write(torch.full((len(slots),), int(req_rows[r])), torch.arange(len(slots)),
                            slots.to(DEVICE))
                self.slots.append(slots)
                shared.append(prefix_len if i else 0)
                seq_lens.append(len(slots))
                r += 1
        self.batch = AttentionBatch(
            req_rows=req_rows.long().to(DEVICE),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
            extend_lens=torch.ones(len(rows), dtype=torch.int32, device=DEVICE),
            extend_starts=torch.arange(len(rows), dtype=torch.int32, device=DEVICE),
            out_slots=torch.tensor([int(s[-1]) for s in self.slots], device=DEVICE),
            req_to_token=table.table, seq_lens_cpu=tuple(seq_lens), extend_lens_cpu=(1,) * len(rows),
            is_decode=True, shared_lens_cpu=tuple(shared),
        )
        self.q = torch.randn(len(rows), q_heads, HEAD_DIM, generator=g).to(dtype).to(DEVICE)
        self.dtype, self.scale = dtype, HEAD_DIM**-0.5

    def check(self, out: torch.Tensor) -> None:
        """Against float64 attention over what the pool holds for each row's slots."""
        assert out.shape == self.q.shape and out.dtype == self.dtype
        k_buf, v_buf = self.cache.k_buffers[LAYER], self.cache.v_buffers[LAYER]
        group = self.q.shape[1] // k_buf.shape[1]
        for b, slots in enumerate(self.slots):
            k = k_buf[slots.to(DEVICE)].to(self.dtype).double().cpu().repeat_interleave(group, 1)
            v = v_buf[slots.to(DEVICE)].to(self.dtype).double().cpu().repeat_interleave(group, 1)
            scores = torch.einsum("hd,shd->hs", self.q[b].double().cpu(), k) * self.scale
            expected = torch.einsum("hs,shd->hd", scores.softmax(-1), v)
            got = out[b].double().cpu()
            if self.dtype == torch.float32:
                torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
            else:
                assert ((got - expected).norm() / expected.norm()).item() < 1e-2, b


def _plan(case: SharedPrefixCase) -> CascadePlan:
    """Level 0 per group as the case built them (plan_cascade would refuse shapes this small)."""
    starts, prefixes, row_prefix, first = [], [], [], 0
    seq_lens = case.batch.seq_lens_cpu
    shared = case.batch.shared_lens_cpu
    for b in range(1, len(seq_lens) + 1):
        if b < len(seq_lens) and shared[b]:
            continue
        p = shared[first + 1] if b - first > 1 else seq_lens[first] - 1
        starts.append(first)
        prefixes.append(p)
        row_prefix += [p] * (b - first)
        first = b
    return CascadePlan(tuple(starts) + (len(seq_lens),), tuple(prefixes), tuple(row_prefix), saved_tokens=0)


GROUPS = [(70, [1, 9, 30, 2, 17]), (0, [45]), (33, [5] * 21), (100, [1, 2])]


@pytest.mark.parametrize(("q_heads", "kv_heads"), [(8, 2), (6, 2), (2, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads_fastest", [True, False])
def test_cascade_matches_attention_over_whole_rows(q_heads: int, kv_heads: int, dtype: torch.dtype,
                                                   heads_fastest: bool) -> None:
    case = SharedPrefixCase(GROUPS, q_heads, kv_heads, dtype, dtype, seed=q_heads)
    plan = _plan(case)
    tensors = cascade_tensors(plan, case.batch.seq_lens_cpu, q_heads, kv_heads, torch.device(DEVICE),
                              num_sms=64, min_split_len=16, max_splits=4)
    assert tensors.prefix_splits > 1 and tensors.suffix_splits > 1  # both levels really split
    if q_heads // kv_heads == 4:
        assert int(tensors.block_count) > len(plan.prefix_lens)  # the 21-row group takes two prefix programs
        assert PREFIX_BLOCK_M // 4 < 21
    k_buf, v_buf = case.cache.k_buffers[LAYER], case.cache.v_buffers[LAYER]
    b = case.batch
    out = cascade_decode_attention(case.q, k_buf, v_buf, b.req_to_token, b.req_rows, b.seq_lens, case.scale,
                                   tensors, min_split_len=16, block_n=(16, 16), heads_fastest=heads_fastest)
    case.check(out)


@pytest.mark.parametrize(("block_m", "waves"), [(16, 8), (32, 2)])
def test_smaller_prefix_blocks_and_more_level0_splits(block_m: int, waves: int) -> None:
    """The tuning knobs: 16 or 32 level-0 queries a program (4 or 8 rows of a GQA-4 group), level 0 split
    over more waves."""
    case = SharedPrefixCase(GROUPS, 8, 2, torch.bfloat16, torch.bfloat16, seed=block_m)
    tensors = cascade_tensors(_plan(case), case.batch.seq_lens_cpu, 8, 2, torch.device(DEVICE), num_sms=16,
                              min_split_len=16, prefix_block_m=block_m, prefix_waves=waves)
    assert tensors.prefix_block_m == block_m
    blocks = sum(-(-len(owns) // (block_m // 4)) for _, owns in GROUPS)
    assert int(tensors.block_count) == tensors.block_programs == blocks  # eager: one program a block
    k_buf, v_buf = case.cache.k_buffers[LAYER], case.cache.v_buffers[LAYER]
    b = case.batch
    case.check(cascade_decode_attention(case.q, k_buf, v_buf, b.req_to_token, b.req_rows, b.seq_lens,
                                        case.scale, tensors, min_split_len=16, block_n=(32, 16)))
    with pytest.raises(ValueError, match="power of two"):
        cascade_tensors(_plan(case), case.batch.seq_lens_cpu, 8, 2, torch.device(DEVICE), num_sms=16,
                        prefix_block_m=24)


@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.float8_e4m3fn])
@pytest.mark.parametrize("fuse_merge", [True, False])
def test_level1_in_one_split_merges_level0_itself(kv_dtype: torch.dtype, fuse_merge: bool,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Level 1 in one split folds level 0's several splits into the output itself, with no reduce kernel
    (fuse_merge=False: the partial and the reduce, as with more splits)."""
    from radixserve.ops.attention import triton_cascade

    reduces: list[int] = []
    reduce = triton_cascade.reduce_splits
    monkeypatch.setattr(triton_cascade, "reduce_splits", lambda *a: (reduces.append(1), reduce(*a)))
    case = SharedPrefixCase(GROUPS, 8, 2, torch.bfloat16, kv_dtype, seed=11)
    # no row's own keys reach 48 (level 1: one split); prefixes up to 100 (level 0: three)
    tensors = cascade_tensors(_plan(case), case.batch.seq_lens_cpu, 8, 2, torch.device(DEVICE), num_sms=64,
                              min_split_len=48)
    assert tensors.suffix_splits == 1 and tensors.prefix_splits == 3
    k_buf, v_buf = case.cache.k_buffers[LAYER], case.cache.v_buffers[LAYER]
    b = case.batch
    case.check(cascade_decode_attention(case.q, k_buf, v_buf, b.req_to_token, b.req_rows, b.seq_lens,
                                        case.scale, tensors, min_split_len=48, block_n=(16, 32),
                                        fuse_merge=fuse_merge))
    assert len(reduces) == (0 if fuse_merge else 1)


@pytest.mark.parametrize("fp8_f16", [False, True], ids=["bf16-dots", "f16-dots"])
@pytest.mark.parametrize("kv_dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_cascade_over_an_fp8_pool(kv_dtype: torch.dtype, fp8_f16: bool) -> None:
    case = SharedPrefixCase(GROUPS, 8, 2, torch.bfloat16, kv_dtype, seed=5)
    tensors = cascade_tensors(_plan(case), case.batch.seq_lens_cpu, 8, 2, torch.device(DEVICE), num_sms=8,
                              min_split_len=64, max_splits=16)
    k_buf, v_buf = case.cache.k_buffers[LAYER], case.cache.v_buffers[LAYER]
    b = case.batch
    case.check(cascade_decode_attention(case.q, k_buf, v_buf, b.req_to_token, b.req_rows, b.seq_lens,
                                        case.scale, tensors, min_split_len=64, fp8_f16=fp8_f16))
    # q as the model passes it: a view into the QKV projection's output (rows strided past K and V)
    qkv = torch.zeros(case.q.shape[0], 8 + 2 * 2, HEAD_DIM, dtype=case.q.dtype, device=DEVICE)
    qkv[:, :8] = case.q
    out = cascade_decode_attention(qkv[:, :8], k_buf, v_buf, b.req_to_token, b.req_rows, b.seq_lens,
                                   case.scale, tensors, min_split_len=64, fp8_f16=fp8_f16)
    assert out.is_contiguous()
    case.check(out)


def test_backend_runs_cascade_where_the_plan_pays(monkeypatch: pytest.MonkeyPatch) -> None:
    """The backend plans cascade from shared_lens_cpu in `prepare` and uses it for that batch only."""
    monkeypatch.setattr(cascade, "MIN_SAVED_TOKENS", 16)
    case = SharedPrefixCase(GROUPS, 8, 2, torch.float32, torch.float32, seed=7)
    backend = TritonAttentionBackend(case.cache.k_buffers, case.cache.v_buffers, min_split_len=16, num_sms=16)
    backend.prepare(case.batch)
    assert backend.num_cascade_steps == 1
    k_new = case.cache.k_buffers[LAYER][case.batch.out_slots]
    v_new = case.cache.v_buffers[LAYER][case.batch.out_slots]
    case.check(backend.forward(case.q, k_new, v_new, LAYER, case.scale, case.batch))
    assert backend._cascade is not None  # the plan's tensors were built and used
    # another batch (a CUDA-graph warm-up, say) with no prepare of its own runs plain decode
    other = AttentionBatch(*(getattr(case.batch, f) for f in AttentionBatch.__slots__))
    backend._cascade = None
    case.check(backend.forward(case.q, k_new, v_new, LAYER, case.scale, other))
    assert backend._cascade is None


def test_rejects_a_plan_for_other_rows() -> None:
    case = SharedPrefixCase(GROUPS[:1], 4, 2, torch.float32, torch.float32, seed=1)
    tensors = cascade_tensors(_plan(case), case.batch.seq_lens_cpu, 4, 2, torch.device(DEVICE), num_sms=4,
                              min_split_len=16, max_splits=2)
    b = case.batch
    with pytest.raises(ValueError, match="cascade plan has 5 rows"):
        cascade_decode_attention(case.q[:4], case.cache.k_buffers[0], case.cache.v_buffers[0], b.req_to_token,
                                 b.req_rows[:4], b.seq_lens[:4], case.scale, tensors)


def _padded(case: SharedPrefixCase, max_rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, req_rows and seq_lens of the case's rows padded to max_rows as a CUDA graph pads them: zero queries
    on a table row of zeros (slot 0, one key)."""
    b = case.batch
    n, pad_row = b.num_rows, next(r for r in range(b.req_to_token.shape[0]) if r not in b.req_rows.tolist())
    q = torch.zeros(max_rows, *case.q.shape[1:], dtype=case.q.dtype, device=DEVICE)
    q[:n] = case.q
    req_rows = torch.full((max_rows,), pad_row, dtype=torch.int64, device=DEVICE)
    req_rows[:n] = b.req_rows
    seq_lens = torch.ones(max_rows, dtype=torch.int32, device=DEVICE)
    seq_lens[:n] = b.seq_lens
    return q, req_rows, seq_lens


@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.float8_e4m3fn])
def test_graph_shaped_cascade_on_reused_buffers(kv_dtype: torch.dtype) -> None:
    """GraphCascade's fixed grids over padded rows match attention over whole rows, step after step on the
    same buffers (a smaller step after a larger one: no stale block survives), padding rows stay finite."""
    from radixserve.ops.attention.graph_cascade import GraphCascade

    graph = GraphCascade(40, 8, 2, HEAD_DIM, torch.device(DEVICE), num_sms=2)
    assert graph.tensors.block_programs == 2  # a level-0 program a kv head takes every other block
    for groups in (GROUPS, GROUPS[:2]):
        case = SharedPrefixCase(groups, 8, 2, torch.bfloat16, kv_dtype, seed=len(groups))
        n = case.batch.num_rows
        graph.load(_plan(case), n)
        q, req_rows, seq_lens = _padded(case, graph.max_rows)
        out = cascade_decode_attention(
            q, case.cache.k_buffers[LAYER], case.cache.v_buffers[LAYER], case.batch.req_to_token, req_rows,
            seq_lens, case.scale, graph.tensors, workspace=graph.workspace, block_n=(16, 16))
        case.check(out[:n])
        assert torch.isfinite(out[n:].float()).all()


def test_graph_cascade_plan_layout() -> None:
    from radixserve.ops.attention.graph_cascade import GraphCascade

    graph = GraphCascade(8, 8, 2, HEAD_DIM, torch.device("cpu"), num_sms=4, prefix_block_m=16)  # 4 rows/block
    plan = CascadePlan(group_starts=(0, 5, 6), prefix_lens=(30, 9), row_prefix_lens=(30,) * 5 + (9,),
                       saved_tokens=120)
    packed = graph.host_plan(plan, 6)
    assert packed[0] == 4  # the block count
    host = packed[1:].reshape(5, 8)
    # blocks: group 0 in rows 0-3 and 4, row 5 alone, padding rows 6-7 with no prefix, then unused zeros
    assert host[0].tolist() == [0, 4, 5, 6, 0, 0, 0, 0]  # first row
    assert host[1].tolist() == [4, 1, 1, 2, 0, 0, 0, 0]  # rows
    assert host[2].tolist() == [0, 0, 5, 6, 0, 0, 0, 0]  # the group's first row
    assert host[3].tolist() == [30, 30, 9, 0, 0, 0, 0, 0]  # prefix length
    assert host[4].tolist() == [30, 30, 30, 30, 30, 9, 0, 0]  # kv_starts
    with pytest.raises(ValueError, match="a plan for 6 rows, a step of 7 rows"):
        graph.host_plan(plan, 7)
    # a capture's batch: every row padding, each block of rows with an empty prefix
    packed = graph.host_plan(None, 0)
    host = packed[1:].reshape(5, 8)
    assert packed[0] == 2
    assert host[0].tolist() == [0, 4, 0, 0, 0, 0, 0, 0] and host[1].tolist() == [4, 4, 0, 0, 0, 0, 0, 0]
    assert not host[3].any() and not host[4].any()
