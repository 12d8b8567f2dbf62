"""TorchAttentionBackend against a naive float64 softmax(QK^T)V over each row's logical sequence."""

from __future__ import annotations

import pytest
import torch

from radixserve.memory.kv_pool import KVCache, ReqToTokenTable
from radixserve.ops.attention.torch_backend import TorchAttentionBackend
from radixserve.ops.forward_batch import AttentionBatch
from radixserve.ops.kv_dtype import to_kv

Q_HEADS, KV_HEADS, HEAD_DIM, NUM_SLOTS, NUM_LAYERS = 8, 2, 16, 301, 2


def _reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_len: int, scale: float
) -> torch.Tensor:
    """q [E, Hq, d], k/v [S, Hkv, d] (the row's whole sequence) -> [E, Hq, d], in float64."""
    q, k, v = q.double(), k.double(), v.double()
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # [S, Hq, d]
    scores = torch.einsum("ehd,shd->hes", q, k) * scale  # [Hq, E, S]
    q_pos = torch.arange(q.shape[0])[:, None] + prefix_len
    scores = scores.masked_fill(torch.arange(k.shape[0])[None, :] > q_pos, float("-inf"))
    return torch.einsum("hes,shd->ehd", scores.softmax(-1), v)


def _run(
    rows: list[tuple[int, int]], dtype: torch.dtype, seed: int = 0, split: int = 0,
    kv_dtype: torch.dtype | None = None,
) -> None:
    """rows: (prefix_len, extend_len) per row. Prefix K/V are put in the pool first, at scattered slots.
    split > 0: the batch's first `split` (decode) rows and the rest attend as two batches (split_rows), the
    way the FlashInfer backend runs a mixed step. kv_dtype: the pool's (default: dtype); the reference attends
    over K/V as the pool holds them."""
    g = torch.Generator().manual_seed(seed)
    kv_dtype = kv_dtype or dtype
    cache = KVCache(NUM_LAYERS, NUM_SLOTS, KV_HEADS, HEAD_DIM, kv_dtype, "cpu")
    table = ReqToTokenTable(max_rows=len(rows) + 3, max_context=64, device="cpu")
    free_slots = (torch.randperm(NUM_SLOTS - 1, generator=g) + 1).tolist()  # slot 0 is padding
    req_rows = torch.randperm(table.max_rows, generator=g)[: len(rows)]
    layer = 1
    seqs_k, seqs_v, out_slots = [], [], []
    for (prefix_len, extend_len), row in zip(rows, req_rows.tolist(), strict=True):
        seq_len = prefix_len + extend_len
        slots = torch.tensor([free_slots.pop() for _ in range(seq_len)])
        table.write(torch.full((seq_len,), row), torch.arange(seq_len), slots)
        k_seq = torch.randn(seq_len, KV_HEADS, HEAD_DIM, generator=g).to(dtype)
        v_seq = torch.randn(seq_len, KV_HEADS, HEAD_DIM, generator=g).to(dtype)
        cache.store(layer, slots[:prefix_len], k_seq[:prefix_len], v_seq[:prefix_len])
        seqs_k.append(k_seq)
        seqs_v.append(v_seq)
        out_slots.append(slots[prefix_len:])
    extend_lens = [e for _, e in rows]
    seq_lens = [p + e for p, e in rows]
    starts = torch.tensor([0, *extend_lens[:-1]]).cumsum(0)
    batch = AttentionBatch(
        req_rows=req_rows.long(),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        extend_lens=torch.tensor(extend_lens, dtype=torch.int32),
        extend_starts=starts.to(torch.int32),
        out_slots=torch.cat(out_slots).long(),
        req_to_token=table.table,
        seq_lens_cpu=tuple(seq_lens),
        extend_lens_cpu=tuple(extend_lens),
        is_decode=all(e == 1 for e in extend_lens),
    )
    T = sum(extend_lens)
    q = torch.randn(T, Q_HEADS, HEAD_DIM, generator=g).to(dtype)
    k = torch.cat([s[p:] for s, (p, _) in zip(seqs_k, rows, strict=True)])
    v = torch.cat([s[p:] for s, (p, _) in zip(seqs_v, rows, strict=True)])
    other_layer_before = cache.k_buffers[0].clone()

    scale = HEAD_DIM**-0.5
    backend = TorchAttentionBackend(cache.k_buffers, cache.v_buffers)
    if split:
        head, tail = batch.split_rows(split)
        assert head.is_decode and head.num_tokens == split and tail.num_rows == len(rows) - split
        out = torch.cat([backend.forward(q[:split], k[:split], v[:split], layer, scale, head),
                         backend.forward(q[split:], k[split:], v[split:], layer, scale, tail)])
    else:
        out = backend.forward(q, k, v, layer, scale, batch)

    assert out.shape == q.shape and out.dtype == dtype
    stored = (cache.k_buffers[layer][batch.out_slots], cache.v_buffers[layer][batch.out_slots])
    assert torch.equal(stored[0].float(), to_kv(k, kv_dtype).float())
    assert torch.equal(stored[1].float(), to_kv(v, kv_dtype).float())
    assert torch.equal(cache.k_buffers[0].float(), other_layer_before.float())
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    for r, (prefix_len, extend_len) in enumerate(rows):
        start = int(starts[r])
        k_held, v_held = (to_kv(t, kv_dtype).to(dtype) for t in (seqs_k[r], seqs_v[r]))
        expected = _reference(q[start : start + extend_len], k_held, v_held, prefix_len, scale)
        torch.testing.assert_close(out[start : start + extend_len].double(), expected, atol=tol, rtol=tol)


MIXED = [(0, 7), (5, 1), (13, 4), (20, 1), (0, 1), (9, 9)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mixed_extend_and_decode_rows(dtype: torch.dtype) -> None:
    _run(MIXED, dtype)


@pytest.mark.parametrize("kv_dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_pool(dtype: torch.dtype, kv_dtype: torch.dtype) -> None:
    _run(MIXED, dtype, seed=5, kv_dtype=kv_dtype)
    _run([(5, 1), (20, 1), (13, 4), (0, 7)], dtype, seed=6, split=2, kv_dtype=kv_dtype)


def test_fp8_store_saturates() -> None:
    """Past the largest finite value (e4m3: 448, e5m2: 57344) the pool stores that value, never inf or NaN."""
    x = torch.tensor([[[1000.0, -1000.0, 3.0, float(2**20)]]])
    assert torch.isinf(x.to(torch.float8_e5m2).float()).any()
    assert to_kv(x, torch.float8_e4m3fn).float().flatten().tolist() == [448.0, -448.0, 3.0, 448.0]
    assert to_kv(x, torch.float8_e5m2).float().flatten().tolist() == [1024.0, -1024.0, 3.0, 57344.0]


def test_all_decode_rows() -> None:
    _run([(3, 1), (17, 1), (1, 1), (30, 1)], torch.float32, seed=1)


def test_single_prefill_row_without_prefix() -> None:
    _run([(0, 33)], torch.float32, seed=2)


def test_long_extend_over_long_prefix() -> None:
    _run([(40, 20), (2, 3)], torch.float32, seed=3)


def test_a_mixed_step_split_into_its_decode_rows_and_the_rest() -> None:
    rows = [(5, 1), (20, 1), (0, 1), (13, 4), (0, 7), (3, 1)]
    _run(rows, torch.float32, seed=4, split=3)


def test_leading_decode_rows() -> None:
    def batch(extend_lens: list[int]) -> AttentionBatch:
        n, t = len(extend_lens), sum(extend_lens)
        return AttentionBatch(
            torch.arange(n), torch.ones(n, dtype=torch.int32), torch.tensor(extend_lens, dtype=torch.int32),
            torch.zeros(n, dtype=torch.int32), torch.zeros(t, dtype=torch.int64), torch.zeros(n, 8),
            tuple([8] * n), tuple(extend_lens), all(e == 1 for e in extend_lens))

    assert batch([1, 1, 3, 1]).num_leading_decode_rows == 2
    assert batch([4, 1, 1]).num_leading_decode_rows == 0
    assert batch([1, 1, 1]).num_leading_decode_rows == 3
    with pytest.raises(AssertionError):
        batch([1, 3, 1]).split_rows(2)  # row 1 does not decode
