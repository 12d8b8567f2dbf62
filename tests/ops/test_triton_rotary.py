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
