"""The Triton rotary kernel against the torch rotary embedding, in Triton's CPU interpreter."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton")

from radixserve.ops.rotary import RotaryEmbedding  # noqa: E402
from radixserve.ops.triton_rotary import apply_rotary_inplace  # noqa: E402


@pytest.mark.parametrize("head_dim,n_q,n_kv", [(64, 4, 2), (128, 3, 1)])
def test_rotary_kernel_matches_torch(head_dim: int, n_q: int, n_kv: int) -> None:
    torch.manual_seed(0)
    rope = RotaryEmbedding(head_dim, 512, 10000.0, None, torch.float32)
    T = 7
    positions = torch.tensor([0, 1, 5, 100, 511, 3, 42])
    qkv = torch.randn(T, (n_q + 2 * n_kv) * head_dim)
    q = qkv[:, : n_q * head_dim].view(T, n_q, head_dim)  # strided views, as the model produces them
    k = qkv[:, n_q * head_dim : (n_q + n_kv) * head_dim].view(T, n_kv, head_dim)
    q_ref, k_ref = rope(positions, q.clone(), k.clone())
    apply_rotary_inplace(positions, q, k, rope.cos_sin_cache)
    torch.testing.assert_close(q, q_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k, k_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_kernel_stores_kv(dtype: torch.dtype) -> None:
    """With a KVStore the kernel also writes the rotated k and the v into the pool's slots, exactly what the
    unfused path (rotate, then index-store) writes, and touches no other slot."""
    _check_fused_store(dtype, dtype)


def test_rotary_kernel_stores_kv_into_an_fp8_pool() -> None:
    """An FP8 (e4m3) pool: v past its range saturates at +-448 on both paths."""
    _check_fused_store(torch.bfloat16, torch.float8_e4m3fn)


def _check_fused_store(dtype: torch.dtype, pool_dtype: torch.dtype) -> None:
    from radixserve.ops.forward_batch import KVStore

    torch.manual_seed(1)
    head_dim, n_q, n_kv, T, num_slots = 64, 4, 2, 5, 40
    rope = RotaryEmbedding(head_dim, 256, 10000.0, None, dtype)
    positions = torch.tensor([3, 0, 255, 17, 9])
    slots = torch.tensor([7, 39, 1, 22, 8])
    qkv = torch.randn(T, (n_q + 2 * n_kv) * head_dim).to(dtype)
    sizes = [n_q * head_dim, n_kv * head_dim, n_kv * head_dim]
    q, k, v = (t.view(T, -1, head_dim) for t in qkv.split(sizes, 1))
    fp8 = pool_dtype != dtype
    if fp8:
        qkv[:, -n_kv * head_dim:] *= 300  # v: past e4m3's 448 now and then
    pools = [torch.randn(num_slots, n_kv, head_dim).to(pool_dtype) for _ in range(2)]
    ref_pools = [p.clone() for p in pools]
    q_ref, k_ref = rope(positions, q.clone(), k.clone(), v, KVStore(*ref_pools, slots))  # the torch path

    apply_rotary_inplace(positions, q, k, rope.cos_sin_cache, v, KVStore(*pools, slots))
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(q, q_ref, **tol)
    torch.testing.assert_close(k, k_ref, **tol)
    if fp8:
        # Triton's interpreter rounds FP8 casts without carrying into the exponent (test_triton_attention),
        # so values are compared within an FP8 step and saturation exactly.
        step = {"atol": torch.finfo(pool_dtype).smallest_normal, "rtol": 0.5}
        torch.testing.assert_close(pools[0].float(), ref_pools[0].float(), **step)
        torch.testing.assert_close(pools[1].float(), ref_pools[1].float(), **step)
        held_v, over = pools[1][slots].float(), v.float().abs() >= 448
        assert over.any() and bool((held_v[over].abs() == 448.0).all()) and bool(held_v.isfinite().all())
    else:
        torch.testing.assert_close(pools[0], ref_pools[0], **tol)
        assert torch.equal(pools[1], ref_pools[1])  # v is copied as is
    untouched = torch.ones(num_slots, dtype=torch.bool)
    untouched[slots] = False
    assert torch.equal(pools[0][untouched].float(), ref_pools[0][untouched].float())
    with pytest.raises(ValueError, match="v shaped like k"):
        apply_rotary_inplace(positions, q, k, rope.cos_sin_cache, None, KVStore(*pools, slots))
