"""Fused elementwise Triton kernels: RMSNorm with the residual add, SiLU-and-mul, and the KV-pool store.

Each wrapper checks shapes, dtypes and strides, then launches one program per token (row). The results match
the torch modules they replace (ops/norm.py, ops/activation.py, KVCache.store) including where those round to
the model dtype between steps, so swapping one for the other changes no logits beyond float32 noise.

NOTE: every kernel upcasts to float32 right after its loads. Besides being the accuracy we want, that keeps
Triton's CPU interpreter (TRITON_INTERPRET=1) correct for bfloat16: it holds bf16 values as raw uint16 and
would do integer arithmetic on them, while casts to and from float32 are emulated properly.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from radixserve.ops.kv_dtype import saturation
from radixserve.ops.triton_launch import pdl_enabled, wait_for_predecessor


def _check_rows(name: str, x: torch.Tensor) -> None:
    if x.dim() != 2 or x.stride(-1) != 1:
        raise ValueError(
            f"{name} must be 2-D [tokens, features] with unit stride in the last dim, "
            f"got shape {tuple(x.shape)} strides {x.stride()}"
        )


def _num_warps(block: int) -> int:
    return min(max(block // 256, 1), 8)


# ---------------------------------------------------------------------------------------------------- RMSNorm


@triton.jit
def _rms_norm_kernel(
    X, R, W, Out, ResOut,
    stride_x, stride_r, stride_o, stride_ro,
    n_cols, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    wait_for_predecessor(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(R + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        # Round the sum to the model dtype before normalising: the reference adds in that dtype, and the
        # residual handed to the next layer must be exactly the value that was normalised.
        summed = (x + r).to(ResOut.dtype.element_ty)
        tl.store(ResOut + row * stride_ro + cols, summed, mask=mask)
        x = summed.to(tl.float32)
    mean_sq = tl.sum(x * x, axis=0) / n_cols
    # The reference casts norm(x) to the model dtype before multiplying by the weight; so do we.
    normed = (x * tl.rsqrt(mean_sq + eps)).to(Out.dtype.element_ty).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Out + row * stride_o + cols, (normed * w).to(Out.dtype.element_ty), mask=mask)


def rms_norm(
    x: torch.Tensor,  # [T, hidden]
    weight: torch.Tensor,  # [hidden], x's dtype
    eps: float,
    residual: torch.Tensor | None = None,  # [T, hidden], x's dtype
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """norm(x) * weight, or with a residual (norm(x + residual) * weight, x + residual): RMSNorm.forward."""
    _check_rows("x", x)
    n_rows, hidden = x.shape
    if weight.shape != (hidden,) or weight.dtype != x.dtype or weight.stride(0) != 1:
        raise ValueError(
            f"weight must be contiguous [{hidden}] {x.dtype}: {tuple(weight.shape)} {weight.dtype}"
        )
    if residual is not None:
        _check_rows("residual", residual)
        if residual.shape != x.shape or residual.dtype != x.dtype:
            raise ValueError(
                f"residual {tuple(residual.shape)} {residual.dtype} does not match x "
                f"{tuple(x.shape)} {x.dtype}"
            )
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    res_out = torch.empty_like(out) if residual is not None else out  # `out` is a dummy pointer when unused
    if n_rows:
        block = triton.next_power_of_2(hidden)
        r = residual if residual is not None else x
        pdl = pdl_enabled(x.device)
        _rms_norm_kernel[(n_rows,)](
            x, r, weight, out, res_out,
            x.stride(0), r.stride(0), out.stride(0), res_out.stride(0),
            hidden, eps,
            HAS_RESIDUAL=residual is not None, BLOCK=block, PDL=pdl, num_warps=_num_warps(block),
            launch_pdl=pdl,
        )  # fmt: skip
    return out if residual is None else (out, res_out)


# ----------------------------------------------------------------------------------------------- SiLU and mul


@triton.jit
def _silu_and_mul_kernel(X, Out, stride_x, stride_o, d, BLOCK: tl.constexpr, PDL: tl.constexpr):
    wait_for_predecessor(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    gate = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(X + row * stride_x + d + cols, mask=mask, other=0.0).to(tl.float32)
    # sigmoid from exp(-|g|), which never overflows (1 / (1 + exp(-g)) overflows for g << 0).
    e = tl.exp(-tl.abs(gate))
    sigmoid = tl.where(gate >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
    # F.silu returns the model dtype before the multiply; round there too.
    silu = (gate * sigmoid).to(Out.dtype.element_ty).to(tl.float32)
    tl.store(Out + row * stride_o + cols, (silu * up).to(Out.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """[T, 2 * d] (gate | up) -> [T, d]: silu(gate) * up, as ops.activation.silu_and_mul."""
    _check_rows("x", x)
    n_rows, width = x.shape
    if width % 2:
        raise ValueError(f"silu_and_mul needs an even last dim (gate | up), got {width}")
    d = width // 2
    out = torch.empty((n_rows, d), dtype=x.dtype, device=x.device)
    if n_rows and d:
        block = min(triton.next_power_of_2(d), 1024)
        pdl = pdl_enabled(x.device)
        _silu_and_mul_kernel[(n_rows, triton.cdiv(d, block))](
            x, out, x.stride(0), out.stride(0), d, BLOCK=block, PDL=pdl, num_warps=_num_warps(block),
            launch_pdl=pdl,
        )  # fmt: skip
    return out


# -------------------------------------------------------------------------------------------------- KV store


@triton.jit
def cast_to_kv(x, Buf, SAT: tl.constexpr):  # type: ignore[no-untyped-def]
    """x in the KV buffer's element type; SAT > 0 (an FP8 pool: ops/kv_dtype.saturation) clamps to +-SAT
    first, so that out-of-range values saturate on every path (the torch store does the same)."""
    if SAT > 0:
        x = tl.clamp(x.to(tl.float32), -SAT, SAT)
    return x.to(Buf.dtype.element_ty)


@triton.jit
def _store_kv_kernel(
    K, V, KBuf, VBuf, Slots,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kbs, stride_kbh, stride_vbs, stride_vbh,
    num_heads, head_dim,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, SAT: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    wait_for_predecessor(PDL)
    t = tl.program_id(0).to(tl.int64)
    # int64: slot * slot_stride passes 2**31 in large pools.
    slot = tl.load(Slots + t).to(tl.int64)
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (h < num_heads) & (d < head_dim)
    k = tl.load(K + t * stride_kt + h * stride_kh + d, mask=mask)
    tl.store(KBuf + slot * stride_kbs + h * stride_kbh + d, cast_to_kv(k, KBuf, SAT), mask=mask)
    v = tl.load(V + t * stride_vt + h * stride_vh + d, mask=mask)
    tl.store(VBuf + slot * stride_vbs + h * stride_vbh + d, cast_to_kv(v, VBuf, SAT), mask=mask)


def store_kv(
    k: torch.Tensor,  # [T, kv_heads, head_dim], may be a strided view (e.g. of a fused QKV output)
    v: torch.Tensor,  # [T, kv_heads, head_dim]
    k_buf: torch.Tensor,  # [num_slots, kv_heads, head_dim]
    v_buf: torch.Tensor,  # [num_slots, kv_heads, head_dim]
    slots: torch.Tensor,  # [T] int32 or int64
) -> None:
    """k_buf[slots] = k; v_buf[slots] = v (cast to the buffers' dtype, saturating into FP8: ops/kv_dtype.py).
    Mutates the two buffers only."""
    if k.dim() != 3 or v.shape != k.shape or k_buf.shape != v_buf.shape or k_buf.shape[1:] != k.shape[1:]:
        raise ValueError(
            f"k {tuple(k.shape)} / v {tuple(v.shape)} do not fit the KV buffers "
            f"{tuple(k_buf.shape)} / {tuple(v_buf.shape)}"
        )
    if slots.shape != (k.shape[0],) or slots.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"slots must be [{k.shape[0]}] int32/int64, got {tuple(slots.shape)} {slots.dtype}")
    if k.stride(-1) != 1 or v.stride(-1) != 1 or k_buf.stride(-1) != 1 or v_buf.stride(-1) != 1:
        raise ValueError("k, v and the KV buffers need unit stride in head_dim")
    if not slots.is_contiguous():
        raise ValueError("slots must be contiguous")
    num_tokens, num_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    block_h, block_d = triton.next_power_of_2(num_heads), triton.next_power_of_2(head_dim)
    pdl = pdl_enabled(k.device)
    _store_kv_kernel[(num_tokens,)](
        k, v, k_buf, v_buf, slots,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_buf.stride(0), k_buf.stride(1), v_buf.stride(0), v_buf.stride(1),
        num_heads, head_dim,
        BLOCK_H=block_h, BLOCK_D=block_d, SAT=saturation(k_buf.dtype), PDL=pdl,
        num_warps=_num_warps(block_h * block_d),
        launch_pdl=pdl,
    )  # fmt: skip
