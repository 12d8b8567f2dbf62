"""Batch-1 decode GEMVs that compute their own input: the elementwise op before the GEMV runs in its prologue.

A Llama decode step at batch 1 is ~330 kernels in one CUDA graph, and every kernel boundary leaves an H100
idle for ~1.5 us. Two elementwise kernels feed a GEMV and nothing else, so the GEMV can absorb them:

    silu_mul_matmul(gate_up, W)                  = silu_and_mul(gate_up) @ W^T               down_proj
    rms_norm_matmul(x, residual, w_norm, eps, W) = rms_norm(x, w_norm, eps, residual) @ W^T   qkv, gate_up
                                                   (and x + residual for the next layer)

The loop is ops/triton_gemv.py's CUDA-core kernel with the same config (pick_fma_config(N, K)): one program
per BLOCK_N outputs streams its slab of W in BLOCK_K chunks. Where that kernel loads a chunk of x, these
recompute it from their inputs, a few KB that every program reads and that stay in L2:

    rms_norm_matmul, program p (grid = cdiv(N, BLOCK_N)):
      pass 1   k = 0 .. K in SUM_BLOCK steps:  s = x + residual   ssq += s * s     program 0 also stores s
      pass 2   k = 0 .. K in BLOCK_K steps:    a = norm(s) * w_norm                acc += W[slab, k] * a

Rounding mirrors ops/triton_fused.py, whose outputs are model-dtype tensors that skinny_matmul upcasts:
  - silu_mul_matmul: silu(gate) rounded to the model dtype, times up, rounded again (as F.silu(gate) * up).
  - rms_norm_matmul: s = x + residual rounded to the model dtype (the value normalised and the residual_out);
    s * rsqrt(mean(s^2) + eps) rounded, times w_norm, rounded again.
So y equals the unfused pair run with the same config up to float32 summation order: silu_mul_matmul's
activation is elementwise and its dot sums in the same order (bitwise equal); rms_norm_matmul's sum of
squares is accumulated in SUM_BLOCK chunks where rms_norm sums the row in one tl.sum (a float32 ulp of the
rstd, which moves a rounded activation by an ulp only when it sits on a rounding boundary). residual_out is
bitwise the unfused one.

Cost: each program re-reads its activation inputs from L2 (pass 2 reads x, residual and w_norm per chunk:
3/BLOCK_N of its W bytes; pass 1 adds 2/BLOCK_N once), and pass 1 delays the W stream by a few L2 round
trips. Whether that beats the kernel boundary it saves is benchmarks/bench_gemv.py's "fused" table.

NOT WIRED into the model: on an H100 (benchmarks/results/h100-2026-11-27-session3/) the fused kernels saved
+0.07 (qkv), +0.7 (gate_up) and -0.75 (down) us per layer with the GEMV's own config, up to ~1 us each with
their best CUDA-core config: ~0.1 ms of a 6.05 ms batch-1 step. Wiring them (per-shape configs of their own,
LlamaDecoderLayer at one row) is worth it only together with other cuts of per-kernel cost.

Launches are CUDA-graph capturable (host ints, torch.empty only, no sync) and deterministic (one program owns
each output and residual_out has one writer; no atomics).

NOTE: as in ops/triton_fused.py, loads are upcast to float32 right away: Triton's CPU interpreter
(TRITON_INTERPRET=1) holds bf16 as raw uint16 and would do integer arithmetic on it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from radixserve.ops.triton_gemv import DTYPES, SkinnyConfig, pick_fma_config

# Pass 1's chunk per thread and input: 16 values (two 16-byte bf16 loads) keep it to a few round trips to L2
# (K = 4096 with 2 warps: 4 chunks) without holding the row in registers.
SUM_ELEMS_PER_THREAD = 16


# ------------------------------------------------------------------------------------------------- kernels


@triton.jit
def _load_f32(ptrs, mask, EVEN: tl.constexpr):
    if EVEN:
        v = tl.load(ptrs)
    else:
        v = tl.load(ptrs, mask=mask, other=0.0)
    return v.to(tl.float32)


@triton.jit
def _load_w_f32(w_ptrs, mask_n, mask_k, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr):
    if EVEN_K:
        if EVEN_N:
            w = tl.load(w_ptrs)
        else:
            w = tl.load(w_ptrs, mask=mask_n[:, None], other=0.0)
    else:
        w = tl.load(w_ptrs, mask=mask_n[:, None] & mask_k[None, :], other=0.0)
    return w.to(tl.float32)


@triton.jit
def _residual_sum(x_ptrs, r_ptrs, mask, HAS_RESIDUAL: tl.constexpr, EVEN: tl.constexpr, dtype: tl.constexpr):
    """x + residual rounded to the model dtype (rms_norm's `summed`), as float32; x alone without one."""
    s = _load_f32(x_ptrs, mask, EVEN)
    if HAS_RESIDUAL:
        s = (s + _load_f32(r_ptrs, mask, EVEN)).to(dtype).to(tl.float32)
    return s


@triton.jit
def _silu_mul_gemv_kernel(
    GateUp, W, Y,
    N, K,
    stride_wn,
    EVEN_N: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr,
):  # fmt: skip
    """y[0, n] = sum_k a[k] * W[n, k], a = silu(gate_up[0, :K]) * gate_up[0, K:] rounded as silu_and_mul."""
    dtype = Y.dtype.element_ty
    n0 = tl.program_id(0) * BLOCK_N
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_n = (n0 + offs_n) < N
    # int64 slab base, partial sums spread over [BLOCK_N, BLOCK_K]: as _gemv_fma_kernel
    w_ptrs = W + n0.to(tl.int64) * stride_wn + offs_n[:, None] * stride_wn + offs_k[None, :]
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=NUM_STAGES):
        mask_k = (k0 + offs_k) < K
        gate = _load_f32(GateUp + k0 + offs_k, mask_k, EVEN_K)
        up = _load_f32(GateUp + K + k0 + offs_k, mask_k, EVEN_K)
        # _silu_and_mul_kernel's arithmetic: sigmoid from exp(-|g|) (never overflows), F.silu's rounding to
        # the model dtype before the multiply, and the product rounded as the tensor it stores.
        e = tl.exp(-tl.abs(gate))
        sigmoid = tl.where(gate >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
        silu = (gate * sigmoid).to(dtype).to(tl.float32)
        a = (silu * up).to(dtype).to(tl.float32)
        acc += _load_w_f32(w_ptrs, mask_n, mask_k, EVEN_N, EVEN_K) * a[None, :]
        w_ptrs += BLOCK_K
    y = tl.sum(acc, axis=1)  # [BLOCK_N]
    tl.store(Y + n0 + offs_n, y.to(dtype), mask=mask_n)


@triton.jit
def _rms_norm_gemv_kernel(
    X, R, NormW, W, Bias, Y, ResOut,
    N, K, eps,
    stride_wn,
    HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr, SUM_BLOCK: tl.constexpr,
):  # fmt: skip
    """y[0, n] = sum_k a[k] * W[n, k], a = rms_norm(x + residual) * norm_weight rounded as rms_norm."""
    dtype = Y.dtype.element_ty
    pid = tl.program_id(0)
    # Pass 1: the row's sum of squares, every program for itself (programs cannot wait for one another).
    offs = tl.arange(0, SUM_BLOCK)
    ssq = tl.zeros([SUM_BLOCK], dtype=tl.float32)
    for k0 in range(0, K, SUM_BLOCK):
        mask = (k0 + offs) < K
        s = _residual_sum(X + k0 + offs, R + k0 + offs, mask, HAS_RESIDUAL, False, dtype)
        if HAS_RESIDUAL:
            # One writer, into a fresh tensor: the other programs are still reading x and residual.
            if pid == 0:
                tl.store(ResOut + k0 + offs, s.to(dtype), mask=mask)
        ssq += s * s
    rstd = tl.rsqrt(tl.sum(ssq, axis=0) / K + eps)

    # Pass 2: _gemv_fma_kernel's loop over the normalised activation.
    n0 = pid * BLOCK_N
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_n = (n0 + offs_n) < N
    w_ptrs = W + n0.to(tl.int64) * stride_wn + offs_n[:, None] * stride_wn + offs_k[None, :]
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=NUM_STAGES):
        mask_k = (k0 + offs_k) < K
        s = _residual_sum(X + k0 + offs_k, R + k0 + offs_k, mask_k, HAS_RESIDUAL, EVEN_K, dtype)
        # rms_norm rounds norm(s) to the model dtype before the weight, and stores the product rounded.
        normed = (s * rstd).to(dtype).to(tl.float32)
        a = (normed * _load_f32(NormW + k0 + offs_k, mask_k, EVEN_K)).to(dtype).to(tl.float32)
        acc += _load_w_f32(w_ptrs, mask_n, mask_k, EVEN_N, EVEN_K) * a[None, :]
        w_ptrs += BLOCK_K
    y = tl.sum(acc, axis=1)  # [BLOCK_N]
    if HAS_BIAS:
        y += tl.load(Bias + n0 + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    tl.store(Y + n0 + offs_n, y.to(dtype), mask=mask_n)


# ------------------------------------------------------------------------------------------------ wrappers


def _check_vector(name: str, t: torch.Tensor, length: int, like: torch.Tensor) -> None:
    if t.shape != (length,) or t.dtype != like.dtype or t.stride(0) != 1 or t.device != like.device:
        raise ValueError(
            f"{name} must be contiguous [{length}] {like.dtype} on {like.device}, got {tuple(t.shape)} "
            f"{t.dtype} strides {t.stride()} on {t.device}"
        )


def _check_row_and_weight(fn: str, x: torch.Tensor, weight: torch.Tensor, k_of_x: int) -> None:
    """x is [1, k_of_x] and weight [N, K], both with unit stride in K, one dtype and device; N, K >= 1."""
    if x.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"{fn} takes a 2-D input and weight, got {tuple(x.shape)} and {tuple(weight.shape)}")
    if x.shape[0] != 1:
        raise ValueError(f"{fn} takes one row (M == 1), got {x.shape[0]}: use the unfused ops")
    if x.shape[1] != k_of_x:
        raise ValueError(f"{fn}: input {tuple(x.shape)} does not fit weight {tuple(weight.shape)}")
    if weight.shape[0] == 0 or weight.shape[1] == 0:
        raise ValueError(f"{fn} needs a non-empty weight, got {tuple(weight.shape)}")
    if x.dtype not in DTYPES or weight.dtype != x.dtype:
        raise ValueError(
            f"{fn}: input and weight must share one dtype of {DTYPES}, got {x.dtype} and {weight.dtype}"
        )
    if x.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError(f"{fn}: input and weight need unit stride in K, got {x.stride()}, {weight.stride()}")
    if weight.device != x.device:
        raise ValueError(f"{fn}: input is on {x.device} but weight on {weight.device}")


def _fma_config(fn: str, n: int, k: int, config: SkinnyConfig | None) -> SkinnyConfig:
    if config is None:
        return pick_fma_config(n, k)
    if config.tensor_cores:
        raise ValueError(f"{fn} runs on CUDA cores only, got the tensor-core config {config.name}")
    return config


def silu_mul_matmul(
    gate_up: torch.Tensor,  # [1, 2 * I]: gate | up, unit stride
    weight: torch.Tensor,  # [N, I], unit stride in I
    config: SkinnyConfig | None = None,  # CUDA-core; None: pick_fma_config(N, I)
) -> torch.Tensor:  # [1, N] contiguous, gate_up's dtype
    """skinny_matmul(silu_and_mul(gate_up), weight) in one kernel (down_proj at batch 1)."""
    n, k = weight.shape
    _check_row_and_weight("silu_mul_matmul", gate_up, weight, 2 * k)
    config = _fma_config("silu_mul_matmul", n, k, config)
    y = torch.empty((1, n), dtype=gate_up.dtype, device=gate_up.device)
    _silu_mul_gemv_kernel[(triton.cdiv(n, config.block_n),)](
        gate_up, weight, y,
        n, k,
        weight.stride(0),
        EVEN_N=n % config.block_n == 0, EVEN_K=k % config.block_k == 0,
        BLOCK_N=config.block_n, BLOCK_K=config.block_k, NUM_STAGES=config.num_stages,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    return y


def rms_norm_matmul(
    x: torch.Tensor,  # [1, K], unit stride
    residual: torch.Tensor | None,  # [1, K], x's dtype; None: the first layer's plain RMSNorm
    norm_weight: torch.Tensor,  # [K], contiguous
    eps: float,
    weight: torch.Tensor,  # [N, K], unit stride in K
    bias: torch.Tensor | None = None,  # [N], contiguous
    config: SkinnyConfig | None = None,  # CUDA-core; None: pick_fma_config(N, K)
) -> tuple[torch.Tensor, torch.Tensor]:  # y [1, N] contiguous; residual_out [1, K]
    """(skinny_matmul(normed, weight, bias), residual_out) in one kernel, where (normed, residual_out) =
    rms_norm(x, norm_weight, eps, residual): residual_out = x + residual, a new contiguous tensor, or x
    itself (not a copy) when residual is None."""
    n, k = weight.shape
    _check_row_and_weight("rms_norm_matmul", x, weight, k)
    if residual is not None and (
        residual.shape != x.shape or residual.dtype != x.dtype or residual.stride(1) != 1
        or residual.device != x.device
    ):  # fmt: skip
        raise ValueError(
            f"residual must be [1, {k}] {x.dtype} on {x.device} with unit stride, got "
            f"{tuple(residual.shape)} {residual.dtype} strides {residual.stride()} on {residual.device}"
        )
    _check_vector("norm_weight", norm_weight, k, x)
    if bias is not None:
        _check_vector("bias", bias, n, x)
    config = _fma_config("rms_norm_matmul", n, k, config)
    y = torch.empty((1, n), dtype=x.dtype, device=x.device)
    # NOTE: never x or residual (in place): every program reads them until its last chunk.
    residual_out = torch.empty((1, k), dtype=x.dtype, device=x.device) if residual is not None else x
    sum_block = min(triton.next_power_of_2(k), SUM_ELEMS_PER_THREAD * 32 * config.num_warps)
    _rms_norm_gemv_kernel[(triton.cdiv(n, config.block_n),)](
        x, residual if residual is not None else x, norm_weight, weight,
        bias if bias is not None else y, y, residual_out,  # dummies where a flag is off
        n, k, eps,
        weight.stride(0),
        HAS_RESIDUAL=residual is not None, HAS_BIAS=bias is not None,
        EVEN_N=n % config.block_n == 0, EVEN_K=k % config.block_k == 0,
        BLOCK_N=config.block_n, BLOCK_K=config.block_k, NUM_STAGES=config.num_stages, SUM_BLOCK=sum_block,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    return y, residual_out
