"""Rotary embedding (neox style) applied to q and k in place, one Triton program per token.

Replaces the ~10 small kernels of the torch version (gather cos/sin, chunk, mul, sub, cat per tensor) with
one, which matters inside a decode step where every layer's launch overhead adds up. It can also write the
layer's rotated K and its V into the KV pool (an attention backend's `kv_store`), which saves the store
kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from radixserve.ops.forward_batch import KVStore
from radixserve.ops.kv_dtype import saturation
from radixserve.ops.triton_fused import cast_to_kv
from radixserve.ops.triton_launch import pdl_enabled, wait_for_predecessor


@triton.jit
def _rope_kernel(
    Q, K, V, CosSin, Pos, KBuf, VBuf, Slots,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_cs,
    stride_kbs, stride_kbh, stride_vbs, stride_vbh,
    n_q_heads, n_kv_heads,
    HALF: tl.constexpr, BLOCK_H: tl.constexpr, STORE_KV: tl.constexpr, SAT: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    wait_for_predecessor(PDL)
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
    # Rounded to K's dtype first, as the unfused path stores the rotated k.
    k1 = (y1 * cos - y2 * sin).to(K.dtype.element_ty)
    k2 = (y2 * cos + y1 * sin).to(K.dtype.element_ty)
    tl.store(kp, k1, mask=mk)
    tl.store(kp + HALF, k2, mask=mk)
    if STORE_KV:
        slot = tl.load(Slots + t).to(tl.int64)  # int64: slot * stride passes 2**31 in large pools
        kb = KBuf + slot * stride_kbs + h * stride_kbh + d[None, :]
        tl.store(kb, cast_to_kv(k1, KBuf, SAT), mask=mk)
        tl.store(kb + HALF, cast_to_kv(k2, KBuf, SAT), mask=mk)
        vp = V + t * stride_vt + h * stride_vh + d[None, :]
        vb = VBuf + slot * stride_vbs + h * stride_vbh + d[None, :]
        tl.store(vb, cast_to_kv(tl.load(vp, mask=mk), VBuf, SAT), mask=mk)
        tl.store(vb + HALF, cast_to_kv(tl.load(vp + HALF, mask=mk), VBuf, SAT), mask=mk)


def supported(head_dim: int) -> bool:
    half = head_dim // 2
    return half >= 16 and half & (half - 1) == 0


def apply_rotary_inplace(
    positions: torch.Tensor,  # [T] int64
    q: torch.Tensor,  # [T, q_heads, head_dim], last dim contiguous
    k: torch.Tensor,  # [T, kv_heads, head_dim]
    cos_sin_cache: torch.Tensor,  # [max_position, head_dim]: cos of each frequency, then sin
    v: torch.Tensor | None = None,  # [T, kv_heads, head_dim], with kv_store
    kv_store: KVStore | None = None,
) -> None:
    """Rotate q and k in place; with `kv_store`, also write the rotated k and v into the KV pool there (one
    kernel for what is otherwise two per layer)."""
    T, n_q, head_dim = q.shape
    if not supported(head_dim) or q.stride(-1) != 1 or k.stride(-1) != 1 or k.shape[0] != T:
        raise ValueError(f"rotary kernel needs a power-of-two head_dim/2 >= 16 and unit last strides, got "
                         f"q {tuple(q.shape)} {q.stride()}, k {tuple(k.shape)} {k.stride()}")
    if cos_sin_cache.shape[-1] != head_dim or cos_sin_cache.stride(-1) != 1:
        raise ValueError(f"cos_sin_cache must be [positions, {head_dim}], got {tuple(cos_sin_cache.shape)}")
    n_kv = k.shape[1]
    if kv_store is not None:
        k_buf, v_buf, slots = kv_store.k_buffer, kv_store.v_buffer, kv_store.slots
        if v is None or v.shape != k.shape or v.stride(-1) != 1:
            raise ValueError(f"storing K/V needs v shaped like k {tuple(k.shape)} with a unit last stride")
        if k_buf.shape[1:] != k.shape[1:] or v_buf.shape != k_buf.shape or k_buf.stride(-1) != 1:
            raise ValueError(
                f"KV buffers {tuple(k_buf.shape)} / {tuple(v_buf.shape)} do not fit k {tuple(k.shape)}"
            )
        if slots.shape != (T,) or not slots.is_contiguous():
            raise ValueError(f"slots must be a contiguous [{T}] tensor, got {tuple(slots.shape)}")
        store: tuple[torch.Tensor, ...] = (v, k_buf, v_buf, slots)
        store_strides = (*v.stride()[:2], *k_buf.stride()[:2], *v_buf.stride()[:2])
    else:
        store = (k, k, k, positions)  # never read: STORE_KV is off
        store_strides = (0, 0, 0, 0, 0, 0)
    if T == 0:
        return
    v_arg, k_buf_arg, v_buf_arg, slots_arg = store
    svt, svh, skbs, skbh, svbs, svbh = store_strides
    block_h = triton.next_power_of_2(max(n_q, n_kv))
    pdl = pdl_enabled(q.device)
    _rope_kernel[(T,)](
        q, k, v_arg, cos_sin_cache, positions, k_buf_arg, v_buf_arg, slots_arg,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), svt, svh, cos_sin_cache.stride(0),
        skbs, skbh, svbs, svbh,
        n_q, n_kv, HALF=head_dim // 2, BLOCK_H=block_h, STORE_KV=kv_store is not None,
        SAT=saturation(kv_store.k_buffer.dtype) if kv_store is not None else 0.0, PDL=pdl, num_warps=4,
        launch_pdl=pdl,
    )  # fmt: skip
