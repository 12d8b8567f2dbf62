"""Triton attention (decode and extend kernels, and the backend) against a float64 softmax(QK^T)V and against
TorchAttentionBackend, run by Triton's interpreter on the CPU (TRITON_INTERPRET=1; set TRITON_INTERPRET=0 on a
CUDA machine to run the compiled kernels on the GPU instead)."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: kernels are built at import

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip(
    "triton", reason="triton is not installed or fails to import", exc_type=ImportError
)

from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from radixserve.memory.kv_pool import KVCache, ReqToTokenTable  # noqa: E402
from radixserve.ops.attention.torch_backend import TorchAttentionBackend  # noqa: E402
from radixserve.ops.attention.triton_backend import TritonAttentionBackend  # noqa: E402
from radixserve.ops.attention.triton_ops import (  # noqa: E402
    decode_attention,
    decode_workspace,
    extend_attention,
)
from radixserve.ops.forward_batch import AttentionBatch  # noqa: E402
from radixserve.ops.kv_dtype import to_kv  # noqa: E402
from radixserve.ops.triton_launch import interpreting  # noqa: E402

if interpreting() and not isinstance(triton.language.sum, InterpretedFunction):
    # torch._dynamo (which transformers imports) imports triton; when that came before TRITON_INTERPRET=1,
    # triton's own jit helpers (tl.sum, tl.max, ...) were built for the compiler and cannot be interpreted.
    pytest.skip(
        "triton was imported before TRITON_INTERPRET=1 was set: set it before anything imports torch._dynamo "
        "(in tests/conftest.py or the environment)",
        allow_module_level=True,
    )
DEVICE = "cpu" if interpreting() else "cuda"
if DEVICE == "cuda" and not torch.cuda.is_available():
    pytest.skip("TRITON_INTERPRET is off and there is no CUDA device", allow_module_level=True)

KV_HEADS, NUM_SLOTS, NUM_LAYERS, MAX_CONTEXT = 2, 401, 2, 96
LAYER = 1


def _reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_len: int, scale: float
) -> torch.Tensor:
    """q [E, Hq, d], k/v [S, Hkv, d] (the row's whole sequence) -> [E, Hq, d], in float64."""
    q, k, v = q.double().cpu(), k.double().cpu(), v.double().cpu()
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # [S, Hq, d]
    scores = torch.einsum("ehd,shd->hes", q, k) * scale  # [Hq, E, S]
    q_pos = torch.arange(q.shape[0])[:, None] + prefix_len
    scores = scores.masked_fill(torch.arange(k.shape[0])[None, :] > q_pos, float("-inf"))
    return torch.einsum("hes,shd->ehd", scores.softmax(-1), v)


def _assert_matches(
    out: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, value_max: float = 0.0
) -> None:
    """value_max: the largest |v| attended; the kernels round probabilities to a 16-bit type for the P.V dot
    (2**-8 relative at worst, bf16), so an output that cancels values of hundreds (a saturated FP8 pool) may
    be off by value_max * 2**-8 however small it is."""
    out = out.double().cpu()
    if dtype == torch.float32:
        torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    else:
        rel = ((out - expected).norm() / expected.norm()).item()
        assert rel < 1e-2, rel
        torch.testing.assert_close(out, expected, atol=3e-2 + value_max * 2**-8, rtol=3e-2)


class Case:
    """rows: (prefix_len, extend_len) each. Each token's K/V at a scattered slot; the prefix's stored."""

    def __init__(self, rows: list[tuple[int, int]], group: int, head_dim: int, dtype: torch.dtype, seed: int,
                 kv_dtype: torch.dtype | None = None):
        g = torch.Generator().manual_seed(seed)
        self.rows, self.dtype, self.head_dim = rows, dtype, head_dim
        self.kv_dtype = kv_dtype or dtype  # the pool's; the reference attends over K/V as the pool holds them
        self.cache = KVCache(NUM_LAYERS, NUM_SLOTS, KV_HEADS, head_dim, self.kv_dtype, DEVICE)
        table = ReqToTokenTable(max_rows=len(rows) + 3, max_context=MAX_CONTEXT, device=DEVICE)
        free_slots = (torch.randperm(NUM_SLOTS - 1, generator=g) + 1).tolist()  # slot 0 is padding
        req_rows = torch.randperm(table.max_rows, generator=g)[: len(rows)]
        self.seqs_k, self.seqs_v, self.row_slots, out_slots = [], [], [], []
        for (prefix_len, extend_len), row in zip(rows, req_rows.tolist(), strict=True):
            seq_len = prefix_len + extend_len
            slots = torch.tensor([free_slots.pop() for _ in range(seq_len)])
            table.write(torch.full((seq_len,), row), torch.arange(seq_len), slots.to(DEVICE))
            # V x 300 in an FP8 pool: past e4m3's range (448) now and then, so the store saturates
            spread = 300.0 if self.kv_dtype != dtype else 1.0
            k_seq = torch.randn(seq_len, KV_HEADS, head_dim, generator=g).to(dtype)
            v_seq = (torch.randn(seq_len, KV_HEADS, head_dim, generator=g) * spread).to(dtype)
            self.cache.store(
                LAYER,
                slots[:prefix_len].to(DEVICE),
                k_seq[:prefix_len].to(DEVICE),
                v_seq[:prefix_len].to(DEVICE),
            )
            self.seqs_k.append(k_seq)
            self.seqs_v.append(v_seq)
            self.row_slots.append(slots.to(DEVICE))
            out_slots.append(slots[prefix_len:])
        extend_lens = [e for _, e in rows]
        seq_lens = [p + e for p, e in rows]
        self.starts = [0, *torch.tensor(extend_lens).cumsum(0).tolist()[:-1]]
        self.batch = AttentionBatch(
            req_rows=req_rows.long().to(DEVICE),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
            extend_lens=torch.tensor(extend_lens, dtype=torch.int32, device=DEVICE),
            extend_starts=torch.tensor(self.starts, dtype=torch.int32, device=DEVICE),
            out_slots=torch.cat(out_slots).long().to(DEVICE),
            req_to_token=table.table,
            seq_lens_cpu=tuple(seq_lens),
            extend_lens_cpu=tuple(extend_lens),
            is_decode=all(e == 1 for e in extend_lens),
        )
        self.q = torch.randn(sum(extend_lens), KV_HEADS * group, head_dim, generator=g).to(dtype).to(DEVICE)
        self.k = torch.cat([s[p:] for s, (p, _) in zip(self.seqs_k, rows, strict=True)]).to(DEVICE)
        self.v = torch.cat([s[p:] for s, (p, _) in zip(self.seqs_v, rows, strict=True)]).to(DEVICE)
        self.scale = head_dim**-0.5

    def store_new_tokens(self) -> None:
        self.cache.store(LAYER, self.batch.out_slots, self.k, self.v)

    def check(self, out: torch.Tensor) -> None:
        assert out.shape == self.q.shape and out.dtype == self.dtype
        for r, (prefix_len, extend_len) in enumerate(self.rows):
            s = self.starts[r]
            k_seq, v_seq = self.seqs_k[r], self.seqs_v[r]
            if self.kv_dtype != self.dtype:  # attend over what the FP8 pool holds
                k_seq, v_seq = (buf[LAYER][self.row_slots[r]].to(self.dtype).cpu()
                                for buf in (self.cache.k_buffers, self.cache.v_buffers))
            expected = _reference(self.q[s : s + extend_len], k_seq, v_seq, prefix_len, self.scale)
            value_max = float(v_seq.float().abs().max()) if self.kv_dtype != self.dtype else 0.0
            _assert_matches(out[s : s + extend_len], expected, self.dtype, value_max)


MIXED = [(0, 7), (5, 1), (13, 20), (0, 1), (37, 9)]  # extend 0..20 new tokens, prefixes 0..37


@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("head_dim", [64, 80])
def test_backend_mixed_step_float32(group: int, head_dim: int) -> None:
    case = Case(MIXED, group, head_dim, torch.float32, seed=group + head_dim)
    other_layer_before = case.cache.k_buffers[0].clone()
    backend = TritonAttentionBackend(case.cache.k_buffers, case.cache.v_buffers)
    backend.prepare(case.batch)
    out = backend.forward(case.q, case.k, case.v, LAYER, case.scale, case.batch)
    case.check(out)
    assert torch.equal(case.cache.k_buffers[LAYER][case.batch.out_slots], case.k)
    assert torch.equal(case.cache.v_buffers[LAYER][case.batch.out_slots], case.v)
    assert torch.equal(case.cache.k_buffers[0], other_layer_before)
    # and the reference backend agrees on the same pool
    torch_out = TorchAttentionBackend(case.cache.k_buffers, case.cache.v_buffers).forward(
        case.q, case.k, case.v, LAYER, case.scale, case.batch
    )
    torch.testing.assert_close(out, torch_out, atol=1e-4, rtol=1e-4)


def test_backend_split_rows_of_a_mixed_step() -> None:
    """A mixed step's leading decode rows and its other rows attend as two batches (AttentionBatch.split_rows,
    as the FlashInfer backend runs them): each half's extend_starts must index its own q."""
    rows = [(5, 1), (20, 1), (0, 1), (13, 4), (0, 7)]
    case = Case(rows, 4, 64, torch.float32, seed=11)
    backend = TritonAttentionBackend(case.cache.k_buffers, case.cache.v_buffers)
    head, tail = case.batch.split_rows(3)
    parts = []
    for lo, hi, part in ((0, 3, head), (3, case.q.shape[0], tail)):
        backend.prepare(part)
        parts.append(backend.forward(case.q[lo:hi], case.k[lo:hi], case.v[lo:hi], LAYER, case.scale, part))
    case.check(torch.cat(parts))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_backend_mixed_step_half(dtype: torch.dtype) -> None:
    case = Case(MIXED, 4, 64, dtype, seed=7)
    backend = TritonAttentionBackend(case.cache.k_buffers, case.cache.v_buffers)
    case.check(backend.forward(case.q, case.k, case.v, LAYER, case.scale, case.batch))


@pytest.mark.parametrize("kv_dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backend_fp8_pool(dtype: torch.dtype, kv_dtype: torch.dtype) -> None:
    """An FP8 pool: the store kernel saturates and rounds as the torch store does, the kernels widen the
    tiles (decode rows split over the keys, extend rows over a prefix) and match float64 attention over what
    the pool holds."""
    case = Case(MIXED, 4, 64, dtype, seed=13, kv_dtype=kv_dtype)
    backend = TritonAttentionBackend(case.cache.k_buffers, case.cache.v_buffers, min_split_len=16, num_sms=16)
    case.check(backend.forward(case.q, case.k, case.v, LAYER, case.scale, case.batch))
    # NOTE: Triton's interpreter rounds FP8 casts without carrying into the exponent (0.494 -> 0.25 in e4m3),
    # so the rounding is checked where the kernels compile.
    if not interpreting():
        for buffers, new in ((case.cache.k_buffers, case.k), (case.cache.v_buffers, case.v)):
            held = buffers[LAYER][case.batch.out_slots].float()
            torch.testing.assert_close(held, to_kv(new, kv_dtype).float(), atol=0, rtol=0)
    if kv_dtype == torch.float8_e4m3fn:
        assert case.cache.v_buffers[LAYER][case.batch.out_slots].float().abs().max() == 448.0


@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_backend_decode_splits(group: int, dtype: torch.dtype) -> None:
    """Decode rows of lengths off every block/split boundary; small min_split_len so rows really split."""
    rows = [(0, 1), (16, 1), (40, 1), (70, 1)]
    case = Case(rows, group, 64, dtype, seed=11 + group)
    backend = TritonAttentionBackend(case.cache.k_buffers, case.cache.v_buffers, min_split_len=16, num_sms=16)
    assert backend.num_kv_splits(len(rows), case.q.shape[1], max(case.batch.seq_lens_cpu)) > 1
    case.check(backend.forward(case.q, case.k, case.v, LAYER, case.scale, case.batch))


@pytest.mark.parametrize(("num_splits", "block_n"), [(1, 64), (3, 16), (5, 16), (16, 16)])
def test_decode_kernel_split_counts(num_splits: int, block_n: int) -> None:
    """Empty splits (more splits than a row's blocks) weigh nothing; chunk tails are masked."""
    rows = [(20, 1), (0, 1), (52, 1), (80, 1)]
    case = Case(rows, 4, 80, torch.float32, seed=num_splits)
    case.store_new_tokens()
    b = case.batch
    # a workspace wider than needed, as a CUDA graph runner would reserve it
    workspace = decode_workspace(len(rows) + 2, case.q.shape[1], 80, 16, DEVICE)
    out = decode_attention(
        case.q,
        case.cache.k_buffers[LAYER],
        case.cache.v_buffers[LAYER],
        b.req_to_token,
        b.req_rows,
        b.seq_lens,
        case.scale,
        num_splits,
        workspace=workspace,
        block_n=block_n,
    )
    case.check(out)


def test_decode_strided_q_and_graph_style_splits() -> None:
    """q as a view of a fused QKV tensor; splits chosen without sequence lengths (as under graph capture)."""
    rows = [(30, 1), (3, 1)]
    case = Case(rows, 4, 64, torch.float32, seed=5)
    case.store_new_tokens()
    hq = case.q.shape[1]
    qkv = torch.zeros(len(rows), hq + 2 * KV_HEADS, 64, device=DEVICE)
    qkv[:, :hq] = case.q
    case.q = qkv[:, :hq]
    assert not case.q.is_contiguous()
    backend = TritonAttentionBackend(case.cache.k_buffers, case.cache.v_buffers, min_split_len=8, num_sms=64)
    backend.reserve_decode_workspace(max_rows=4, num_q_heads=hq)
    splits = backend.num_kv_splits(len(rows), hq, max_seq_len=None)
    assert splits == backend.max_kv_splits
    b = case.batch
    out = decode_attention(
        case.q,
        case.cache.k_buffers[LAYER],
        case.cache.v_buffers[LAYER],
        b.req_to_token,
        b.req_rows,
        b.seq_lens,
        case.scale,
        splits,
        min_split_len=8,
        workspace=backend._workspace,
        block_n=16,
    )
    case.check(out)


@pytest.mark.parametrize("block", [16, 64])
def test_extend_kernel_blocks(block: int) -> None:
    """Query and key blocks smaller and larger than the rows, prefixes 0 and > 0, GQA 4."""
    rows = [(0, 33), (17, 18), (50, 2)]
    case = Case(rows, 4, 64, torch.float32, seed=block)
    case.store_new_tokens()
    b = case.batch
    out = extend_attention(
        case.q,
        case.cache.k_buffers[LAYER],
        case.cache.v_buffers[LAYER],
        b.req_to_token,
        b.req_rows,
        b.seq_lens,
        b.extend_lens,
        b.extend_starts,
        case.scale,
        33,
        block_m=block,
        block_n=block,
    )
    case.check(out)


def test_rejects_mismatched_inputs() -> None:
    case = Case([(3, 1)], 4, 64, torch.float32, seed=0)
    b = case.batch
    k_buf, v_buf = case.cache.k_buffers[LAYER], case.cache.v_buffers[LAYER]
    with pytest.raises(ValueError, match="head_dim"):
        decode_attention(case.q[..., :32], k_buf, v_buf, b.req_to_token, b.req_rows, b.seq_lens, 1.0, 1)
    with pytest.raises(ValueError, match="dtypes"):
        decode_attention(case.q.double(), k_buf, v_buf, b.req_to_token, b.req_rows, b.seq_lens, 1.0, 1)
    with pytest.raises(ValueError, match="req_to_token"):
        decode_attention(case.q, k_buf, v_buf, b.req_to_token.long(), b.req_rows, b.seq_lens, 1.0, 1)
    with pytest.raises(ValueError, match="workspace"):
        decode_attention(
            case.q,
            k_buf,
            v_buf,
            b.req_to_token,
            b.req_rows,
            b.seq_lens,
            1.0,
            4,
            workspace=decode_workspace(1, case.q.shape[1], 64, 2, DEVICE),
        )
