"""Rotary embedding (neox style) applied to q and k in place, one Triton program per token.

Replaces the ~10 small kernels of the torch version (gather cos/sin, chunk, mul, sub, cat per tensor) with one,
which matters inside a decode step where every layer's launch overhead adds up.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rope_kernel(
    Q, K, CosSin, Pos,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_cs,
    n_q_heads, n_kv_heads,
    HALF: tl.constexpr, BLOCK_H: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(Pos + t).to(tl.int64)
    d = tl.arange(0, HALF)
    cos = tl.load(CosSin + pos * stride_cs + d).to(tl.float32)[None, :]
    sin = tl.load(CosSin + pos * stride_cs + HALF + d).to(tl.float32)[None, :]
    h = tl.arange(0, BLOCK_H)[:, None]
    # neox pairs: element i of the first half with element i of the second half
    mq = h < n_q_heads
    qp = Q + t * stride_qt + h * stride_qh + d[None, :]
    x1 = tl.load(qp, mask=mq, other=0.0).to(tl.float32)
    x2 = tl.load(qp + HALF, mask=mq, other=0.0).to(tl.float32)
    tl.store(qp, (x1 * cos - x2 * sin).to(Q.dtype.element_ty), mask=mq)
    tl.store(qp + HALF, (x2 * cos + x1 * sin).to(Q.dtype.element_ty), mask=mq)
    mk = h < n_kv_heads
    kp = K + t * stride_kt + h * stride_kh + d[None, :]
    y1 = tl.load(kp, mask=mk, other=0.0).to(tl.float32)
    y2 = tl.load(kp + HALF, mask=mk, other=0.0).to(tl.float32)
    tl.store(kp, (y1 * cos - y2 * sin).to(K.dtype.element_ty), mask=mk)
    tl.store(kp + HALF, (y2 * cos + y1 * sin).to(K.dtype.element_ty), mask=mk)


def supported(head_dim: int) -> bool:
    half = head_dim // 2
    return half >= 16 and half & (half - 1) == 0


def apply_rotary_inplace(
    positions: torch.Tensor,  # [T] int64
    q: torch.Tensor,  # [T, q_heads, head_dim], last dim contiguous
    k: torch.Tensor,  # [T, kv_heads, head_dim]
    cos_sin_cache: torch.Tensor,  # [max_position, head_dim]: cos of each frequency, then sin
) -> None:
    T, n_q, head_dim = q.shape
    if not supported(head_dim) or q.stride(-1) != 1 or k.stride(-1) != 1 or k.shape[0] != T:
        raise ValueError(f"rotary kernel needs a power-of-two head_dim/2 >= 16 and unit last strides, got "
                         f"q {tuple(q.shape)} {q.stride()}, k {tuple(k.shape)} {k.stride()}")
    if cos_sin_cache.shape[-1] != head_dim or cos_sin_cache.stride(-1) != 1:
        raise ValueError(f"cos_sin_cache must be [positions, {head_dim}], got {tuple(cos_sin_cache.shape)}")
    if T == 0:
        return
    n_kv = k.shape[1]
    block_h = triton.next_power_of_2(max(n_q, n_kv))
    _rope_kernel[(T,)](
        q, k, cos_sin_cache, positions,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos_sin_cache.stride(0),
        n_q, n_kv, HALF=head_dim // 2, BLOCK_H=block_h, num_warps=4,
    )
