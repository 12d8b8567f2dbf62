"""Skinny GEMM for decode in Triton: y[M, N] = x[M, K] @ W[N, K]^T (+ bias[N]) for M <= 128.

At decode batch sizes a linear layer is a stream over its weight (2 bytes and at most 2 * M flops per weight),
so the time to beat is bytes(W) / HBM bandwidth. cuBLAS's GEMV falls short of that on some of Llama's shapes
(o_proj 4096x4096 at ~48% of an H100's 3.35 TB/s; qkv and down split K and add a separate reduce kernel).

One program owns BLOCK_N output features and streams their slab of W in BLOCK_K chunks:

    grid = cdiv(N, BLOCK_N)      program p:  W[p*BLOCK_N : (p+1)*BLOCK_N, 0:K]  (all M rows of x)
                                             k = 0 .. K in BLOCK_K steps, num_stages chunks in flight

W is read exactly once, and every output is one program's float32 sum in a fixed order (no split K, no
atomics), so results are bitwise identical run to run: the TP ranks rely on that to sample the same tokens.
Small BLOCK_N keeps every SM busy (N = 4096 with BLOCK_N = 64 is 64 programs for 132 SMs); num_stages and
BLOCK_K set the bytes in flight per program, which is what bounds a streaming kernel's bandwidth.

Two kernels, picked by SkinnyConfig.tensor_cores:
  - CUDA cores, M == 1 only: acc[BLOCK_N, BLOCK_K] += w * x in float32, reduced over K once after the loop
    (no cross-thread reduction inside it). W goes from shared memory straight into FMAs, with no shuffle into
    an MMA operand layout.
  - tensor cores, any M <= 128: acc[BLOCK_N, BLOCK_M] += tl.dot(w, x^T), the batch padded to the next power
    of two from 16 (BLOCK_M) with masked rows (no memory traffic); the padding costs only tensor-core time,
    which this memory-bound loop leaves idle at small M, so M = 16 runs at the price of M = 1. W is the dot's
    left operand: BLOCK_N is the MMA's M dimension (BLOCK_N >= 64 with 4 warps gets Hopper's wgmma) and the
    padded batch its N dimension. Past M ~ 64 the loop does 2 * M flops per weight byte pair and tensor-core
    time starts to count (M = 128 at an H100's bandwidth needs ~400 TFLOP/s). Measured on an H100 (bench_gemv
    --batches 64 128): 0.67-1.05x cuBLAS, so TUNED stops at 16 and larger batches stay on F.linear; the
    kernel takes them for bench_gemv, to re-measure on other cards.
    On CUDA cores, M > 1 would need M accumulators of [BLOCK_N, BLOCK_K] (out of registers by M = 4) or a
    cross-thread reduction per chunk and per row; tensor cores avoid both.
Which of the two wins at M == 1 is for the GPU benchmark (benchmarks/bench_gemv.py) to say; its results fill
TUNED.

Launch shapes are host ints and the only allocation is the output (torch.empty): CUDA-graph capturable. Pick
configs from the static table, never triton.autotune: autotuning during a graph capture would time kernels
inside the capture.

NOTE: as in ops/triton_fused.py, loads are upcast to float32 where the arithmetic is (the CUDA-core kernel
always; the dot kernel when interpreted). Triton's CPU interpreter (TRITON_INTERPRET=1) holds bf16 as raw
uint16 and would multiply bit patterns; compiled dots keep 16-bit tiles for the tensor cores.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from radixserve.ops.triton_launch import interpreting, pdl_enabled, wait_for_predecessor

MAX_M = 128  # the dot kernel's largest padded batch; larger batches belong to F.linear (a real GEMM)
SMEM_BYTES = 220 << 10  # what one program's pipelined tiles may take of an H100 SM's 227 KB
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@dataclass(frozen=True, slots=True)
class SkinnyConfig:
    block_n: int  # output features per program
    block_k: int  # weight columns per pipelined chunk
    num_warps: int
    num_stages: int  # chunks in flight: Triton's software pipeline depth over the K loop
    tensor_cores: bool  # tl.dot with the batch padded to block_m(M); False: CUDA-core FMAs, M == 1 only

    def __post_init__(self) -> None:
        for name in ("block_n", "block_k", "num_warps"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two, got {value}")
        if self.num_stages < 1:
            raise ValueError(f"num_stages must be >= 1, got {self.num_stages}")
        if self.tensor_cores and (self.block_n < 16 or self.block_k < 16):
            raise ValueError(f"tl.dot needs block_n and block_k >= 16, got {self.block_n} x {self.block_k}")

    @property
    def name(self) -> str:
        kind = "tc" if self.tensor_cores else "fma"
        return f"{kind}_n{self.block_n}_k{self.block_k}_w{self.num_warps}_s{self.num_stages}"

    def shared_memory(self, m: int) -> int:
        """Bytes of 16-bit tiles in flight for a batch of m rows: W's and (tensor cores) x's padded tile."""
        rows = self.block_n + (block_m(m) if self.tensor_cores else 1)
        return self.num_stages * rows * self.block_k * 2


def block_m(m: int) -> int:
    """The dot kernel's padded batch for m rows: a power of two, at least 16 (tl.dot's smallest)."""
    return max(16, 1 << (m - 1).bit_length())


# What the GPU benchmark sweeps. Bytes in flight per program: (num_stages - 1) * block_n * block_k * 2; an
# H100 needs some 20-40 KB in flight per SM to cover HBM latency. Shared memory per program (bf16) is
# num_stages * (block_n + 1) * block_k * 2 on CUDA cores and num_stages * (block_n + 16) * block_k * 2 on
# tensor cores (x's padded tile is staged too): 23-35 KB and 48-120 KB of an SM's 227 KB. Registers (ptxas,
# sm_90, bf16): 74-118 on CUDA cores, 48-108 on tensor cores; no spills.
CANDIDATES: tuple[SkinnyConfig, ...] = (
    # CUDA cores (M == 1); the float32 accumulator holds block_n * block_k / (32 * num_warps) values a thread
    SkinnyConfig(8, 256, 2, 6, tensor_cores=False),
    SkinnyConfig(8, 512, 4, 4, tensor_cores=False),
    SkinnyConfig(16, 256, 4, 4, tensor_cores=False),
    SkinnyConfig(16, 512, 4, 3, tensor_cores=False),
    SkinnyConfig(32, 256, 4, 3, tensor_cores=False),
    SkinnyConfig(32, 128, 4, 5, tensor_cores=False),
    SkinnyConfig(64, 128, 8, 3, tensor_cores=False),
    # tensor cores (any M)
    SkinnyConfig(16, 256, 2, 4, tensor_cores=True),
    SkinnyConfig(16, 256, 4, 4, tensor_cores=True),
    SkinnyConfig(16, 512, 4, 3, tensor_cores=True),
    SkinnyConfig(32, 256, 4, 4, tensor_cores=True),
    SkinnyConfig(32, 512, 4, 3, tensor_cores=True),
    SkinnyConfig(64, 128, 4, 5, tensor_cores=True),
    SkinnyConfig(64, 256, 4, 3, tensor_cores=True),
    # tensor cores for M 32-128: more programs (N / block_n) and shallower K chunks, so x's tile and the
    # [block_n, block_m] float32 accumulator fit
    SkinnyConfig(16, 128, 4, 4, tensor_cores=True),
    SkinnyConfig(32, 128, 4, 4, tensor_cores=True),
    SkinnyConfig(32, 64, 4, 6, tensor_cores=True),
    SkinnyConfig(64, 64, 4, 4, tensor_cores=True),
    SkinnyConfig(64, 64, 8, 4, tensor_cores=True),
)

# Measured best per weight shape: (N, K) -> ((largest M, config), ...) in increasing M, from bench_gemv's
# "tuned" output: Llama-3.1-8B's shapes at TP1 and TP2 on an H100 80GB HBM3 (commit e75e288 + this file,
# `bash benchmarks/run_parallel_suite.sh gemv`, benchmarks/results/h100-2026-11-27-session3/). Shapes not
# listed fall back to _default_config.
TUNED: dict[tuple[int, int], tuple[tuple[int, SkinnyConfig], ...]] = {
    # qkv tp2, speedup over cuBLAS: M=1 1.32x, M=2 1.15x, M=4 1.16x, M=8 1.16x, M=16 1.17x
    (3072, 4096): (
        (1, SkinnyConfig(block_n=8, block_k=256, num_warps=2, num_stages=6, tensor_cores=False)),
        (16, SkinnyConfig(block_n=64, block_k=128, num_warps=4, num_stages=5, tensor_cores=True)),
    ),
    # o_proj tp2, speedup over cuBLAS: M=1 1.13x, M=2 1.04x, M=4 1.02x, M=8 1.02x, M=16 1.03x
    (4096, 2048): (
        (1, SkinnyConfig(block_n=8, block_k=256, num_warps=2, num_stages=6, tensor_cores=False)),
        (16, SkinnyConfig(block_n=64, block_k=128, num_warps=4, num_stages=5, tensor_cores=True)),
    ),
    # o_proj tp1, speedup over cuBLAS: M=1 1.24x, M=2 1.16x, M=4 1.15x, M=8 1.15x, M=16 1.16x
    (4096, 4096): (
        (1, SkinnyConfig(block_n=8, block_k=256, num_warps=2, num_stages=6, tensor_cores=False)),
        (16, SkinnyConfig(block_n=64, block_k=128, num_warps=4, num_stages=5, tensor_cores=True)),
    ),
    # down tp2, speedup over cuBLAS: M=1 1.16x, M=2 1.09x, M=4 1.09x, M=8 1.09x, M=16 1.07x
    (4096, 7168): (
        (1, SkinnyConfig(block_n=8, block_k=256, num_warps=2, num_stages=6, tensor_cores=False)),
        (16, SkinnyConfig(block_n=32, block_k=512, num_warps=4, num_stages=3, tensor_cores=True)),
    ),
    # down tp1, speedup over cuBLAS: M=1 1.09x, M=2 1.04x, M=4 1.04x, M=8 1.04x, M=16 1.05x
    (4096, 14336): (
        (1, SkinnyConfig(block_n=8, block_k=256, num_warps=2, num_stages=6, tensor_cores=False)),
        (16, SkinnyConfig(block_n=32, block_k=512, num_warps=4, num_stages=3, tensor_cores=True)),
    ),
    # qkv tp1, speedup over cuBLAS: M=1 1.08x, M=2 1.05x, M=4 1.05x, M=8 1.05x, M=16 1.05x
    (6144, 4096): (
        (1, SkinnyConfig(block_n=8, block_k=256, num_warps=2, num_stages=6, tensor_cores=False)),
        (16, SkinnyConfig(block_n=64, block_k=128, num_warps=4, num_stages=5, tensor_cores=True)),
    ),
    # gate_up tp2, speedup over cuBLAS: M=1 1.03x, M=2 1.00x, M=4 1.00x, M=8 0.99x, M=16 0.99x
    (14336, 4096): (
        (1, SkinnyConfig(block_n=16, block_k=256, num_warps=4, num_stages=4, tensor_cores=False)),
        (2, SkinnyConfig(block_n=64, block_k=128, num_warps=4, num_stages=5, tensor_cores=True)),
        (16, SkinnyConfig(block_n=64, block_k=256, num_warps=4, num_stages=3, tensor_cores=True)),
    ),
    # gate_up tp1, speedup over cuBLAS: M=1 1.04x, M=2 1.03x, M=4 1.02x, M=8 1.02x, M=16 1.02x
    (28672, 4096): (
        (1, SkinnyConfig(block_n=8, block_k=512, num_warps=4, num_stages=4, tensor_cores=False)),
        (16, SkinnyConfig(block_n=64, block_k=128, num_warps=4, num_stages=5, tensor_cores=True)),
    ),
    # lm_head tp1, speedup over cuBLAS: M=1 1.12x, M=2 1.11x, M=4 1.10x, M=8 1.10x, M=16 1.09x
    (128256, 4096): (
        (1, SkinnyConfig(block_n=8, block_k=512, num_warps=4, num_stages=4, tensor_cores=False)),
        (4, SkinnyConfig(block_n=16, block_k=256, num_warps=2, num_stages=4, tensor_cores=True)),
        (16, SkinnyConfig(block_n=64, block_k=256, num_warps=4, num_stages=3, tensor_cores=True)),
    ),
}


def candidate_configs(m: int) -> list[SkinnyConfig]:
    """The CANDIDATES that run a batch of m rows: the CUDA-core kernel takes one row only, and a tensor-core
    config's tiles must fit shared memory at m's padded batch."""
    return [c for c in CANDIDATES
            if (c.tensor_cores or m == 1) and c.shared_memory(m) <= SMEM_BYTES]


def faster_than_cublas(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether to run y = x @ weight^T here rather than in cuBLAS: CUDA, 16-bit, at most MAX_M rows with unit
    stride in K; one row always (it beat cuBLAS on every Llama-3.1-8B shape, 1.03-1.32x on an H100), more rows
    where bench_gemv measured the weight's shape up to at least that batch (TUNED)."""
    m = x.shape[0] if x.dim() == 2 else 0
    tuned = TUNED.get((weight.shape[0], weight.shape[-1]), ())
    return (
        x.is_cuda and 0 < m <= MAX_M and x.dtype in (torch.bfloat16, torch.float16)
        and weight.dtype == x.dtype and x.stride(-1) == 1 and weight.stride(-1) == 1
        and (m == 1 or (bool(tuned) and m <= tuned[-1][0]))
    )


def pick_config(m: int, n: int, k: int) -> SkinnyConfig:
    """The config for y[m, n] = x[m, k] @ W[n, k]^T: TUNED's entry for (n, k) when there is one."""
    for max_m, config in TUNED.get((n, k), ()):
        if m <= max_m:
            return config
    return _default_config(m, n, k)


def _default_config(m: int, n: int, k: int) -> SkinnyConfig:
    # An unmeasured guess (one of CANDIDATES, so the benchmark times it): ~4 programs per SM of a 132-SM H100
    # for N = 4096 (block_n = 8 gives 512), 1 KB of each W row per chunk, 2-3 chunks in flight.
    del k  # every Llama K is long enough for any block_k here
    if m == 1:
        return SkinnyConfig(8, 512, 4, 4, False) if n <= 8192 else SkinnyConfig(16, 512, 4, 3, False)
    if m > 16:  # x's padded tile takes shared memory too: shallower K chunks
        return SkinnyConfig(32, 128, 4, 4, tensor_cores=True)
    return SkinnyConfig(16 if n <= 8192 else 32, 256, 4, 4, tensor_cores=True)


# ------------------------------------------------------------------------------------------------- kernels


@triton.jit
def _gemv_fma_kernel(
    X, W, Bias, Y,
    N, K,
    stride_wn,
    HAS_BIAS: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """y[0, n] = sum_k x[0, k] * W[n, k]: one row of x on CUDA cores."""
    wait_for_predecessor(PDL)
    n0 = tl.program_id(0) * BLOCK_N
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_n = (n0 + offs_n) < N
    # int64 for the slab's base (N * K passes 2**31 for big vocabularies); offsets within a slab fit int32.
    w_ptrs = W + n0.to(tl.int64) * stride_wn + offs_n[:, None] * stride_wn + offs_k[None, :]
    x_ptrs = X + offs_k
    # The partial sums stay spread over [BLOCK_N, BLOCK_K] and are reduced once after the loop: no
    # cross-thread reduction inside it.
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    # NOTE: num_stages on the loop itself, not only at launch: Triton software-pipelines (cp.async into shared
    # memory, NUM_STAGES - 1 chunks ahead) only the loads that feed a tl.dot unless the loop asks for it.
    for k0 in tl.range(0, K, BLOCK_K, num_stages=NUM_STAGES):
        if EVEN_K:
            x = tl.load(x_ptrs)
            if EVEN_N:
                w = tl.load(w_ptrs)
            else:
                w = tl.load(w_ptrs, mask=mask_n[:, None], other=0.0)
        else:
            mask_k = (k0 + offs_k) < K
            x = tl.load(x_ptrs, mask=mask_k, other=0.0)
            w = tl.load(w_ptrs, mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    y = tl.sum(acc, axis=1)  # [BLOCK_N]
    if HAS_BIAS:
        y += tl.load(Bias + n0 + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    tl.store(Y + n0 + offs_n, y.to(Y.dtype.element_ty), mask=mask_n)


# M only masks rows of x and y: not specializing on it (Triton specializes ints equal to 1 or divisible by 16)
# keeps one compiled variant per padded batch (BLOCK_M: 16, 32, 64, 128), so a graph capture of a new batch
# size within one compiles nothing.
@triton.jit(do_not_specialize=["M"])
def _skinny_dot_kernel(
    X, W, Bias, Y,
    M, N, K,
    stride_xm, stride_wn, stride_ym,
    HAS_BIAS: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """y[m, n] = sum_k x[m, k] * W[n, k] for m < M <= BLOCK_M, on tensor cores: acc^T = W_slab @ x^T."""
    wait_for_predecessor(PDL)
    n0 = tl.program_id(0) * BLOCK_N
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = (n0 + offs_n) < N
    # [BLOCK_N, BLOCK_K] and [BLOCK_M, BLOCK_K] tiles; int64 slab base as in _gemv_fma_kernel
    w_ptrs = W + n0.to(tl.int64) * stride_wn + offs_n[:, None] * stride_wn + offs_k[None, :]
    x_ptrs = X + offs_m[:, None] * stride_xm + offs_k[None, :]
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            x = tl.load(x_ptrs, mask=mask_m[:, None], other=0.0)
            if EVEN_N:
                w = tl.load(w_ptrs)
            else:
                w = tl.load(w_ptrs, mask=mask_n[:, None], other=0.0)
        else:
            mask_k = (k0 + offs_k) < K
            x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        if UPCAST:
            w = w.to(tl.float32)
            x = x.to(tl.float32)
        acc = tl.dot(w, tl.trans(x), acc, input_precision=PRECISION)  # [BLOCK_N, BLOCK_M]
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(Bias + n0 + offs_n, mask=mask_n, other=0.0).to(tl.float32)[:, None]
    y_ptrs = Y + offs_m[None, :] * stride_ym + (n0 + offs_n)[:, None]
    tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=mask_n[:, None] & mask_m[None, :])


# ------------------------------------------------------------------------------------------------- wrapper


def _check_inputs(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    if x.dim() != 2 or weight.dim() != 2:
        raise ValueError(
            f"x must be [M, K] and weight [N, K], got {tuple(x.shape)} and {tuple(weight.shape)}"
        )
    if x.shape[1] != weight.shape[1]:
        raise ValueError(f"x {tuple(x.shape)} and weight {tuple(weight.shape)} differ in K (their last dims)")
    if x.shape[0] > MAX_M:
        raise ValueError(f"skinny_matmul takes at most {MAX_M} rows of x, got {x.shape[0]}: use F.linear")
    if x.dtype not in DTYPES or weight.dtype != x.dtype:
        raise ValueError(f"x and weight must share one dtype of {DTYPES}, got {x.dtype} and {weight.dtype}")
    if x.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError(
            f"x and weight need unit stride in K, got strides {x.stride()} and {weight.stride()}"
        )
    if weight.device != x.device:
        raise ValueError(f"x is on {x.device} but weight on {weight.device}")
    if bias is not None:
        n = weight.shape[0]
        if bias.shape != (n,) or bias.dtype != x.dtype or bias.stride(0) != 1 or bias.device != x.device:
            raise ValueError(
                f"bias must be contiguous [{n}] {x.dtype} on {x.device}, got {tuple(bias.shape)} "
                f"{bias.dtype} strides {bias.stride()} on {bias.device}"
            )


def skinny_matmul(
    x: torch.Tensor,  # [M, K], M <= MAX_M, unit stride in K
    weight: torch.Tensor,  # [N, K] (nn.Linear layout), unit stride in K
    bias: torch.Tensor | None = None,  # [N]
    config: SkinnyConfig | None = None,  # None: pick_config(M, N, K)
) -> torch.Tensor:  # [M, N] contiguous, x's dtype
    """F.linear(x, weight, bias) for decode batches, float32 accumulation, bitwise reproducible."""
    _check_inputs(x, weight, bias)
    (m, k), n = x.shape, weight.shape[0]
    config = config if config is not None else pick_config(m, n, k)
    if not config.tensor_cores and m > 1:
        raise ValueError(f"the CUDA-core kernel ({config.name}) takes one row of x, got {m}")
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y
    grid = (triton.cdiv(n, config.block_n),)
    even_n, even_k = n % config.block_n == 0, k % config.block_k == 0
    b = bias if bias is not None else y  # a dummy pointer when HAS_BIAS is off
    pdl = pdl_enabled(x.device)
    if not config.tensor_cores:
        _gemv_fma_kernel[grid](
            x, weight, b, y,
            n, k,
            weight.stride(0),
            HAS_BIAS=bias is not None, EVEN_N=even_n, EVEN_K=even_k,
            BLOCK_N=config.block_n, BLOCK_K=config.block_k, NUM_STAGES=config.num_stages, PDL=pdl,
            num_warps=config.num_warps, num_stages=config.num_stages, launch_pdl=pdl,
        )  # fmt: skip
        return y
    # float32 tiles (float32 inputs, or any input in the interpreter) take exact "ieee" products: the default
    # tf32 would cost ~1e-3 relative error. 16-bit tiles ignore the setting.
    upcast = interpreting()
    precision = "ieee" if upcast or x.dtype == torch.float32 else "tf32"
    _skinny_dot_kernel[grid](
        x, weight, b, y,
        m, n, k,
        x.stride(0), weight.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, EVEN_N=even_n, EVEN_K=even_k,
        BLOCK_M=block_m(m), BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        UPCAST=upcast, PRECISION=precision, PDL=pdl,
        num_warps=config.num_warps, num_stages=config.num_stages, launch_pdl=pdl,
    )  # fmt: skip
    return y
