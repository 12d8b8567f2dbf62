"""Skinny GEMM (ops/triton_gemv.py) against a float32 x @ W^T, and the GEMVs with a fused prologue
(ops/fused_decode.py) against the unfused ops and float32 torch, run by Triton's interpreter on the CPU
(TRITON_INTERPRET=1; set TRITON_INTERPRET=0 on a CUDA machine to run the compiled kernels on the GPU
instead)."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: kernels are built at import

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip(
    "triton", reason="triton is not installed or fails to import", exc_type=ImportError
)

from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from radixserve.ops import fused_decode, triton_gemv  # noqa: E402
from radixserve.ops.fused_decode import rms_norm_matmul, silu_mul_matmul  # noqa: E402
from radixserve.ops.triton_fused import interpreting, rms_norm, silu_and_mul  # noqa: E402
from radixserve.ops.triton_gemv import (  # noqa: E402
    CANDIDATES,
    MAX_M,
    SkinnyConfig,
    candidate_configs,
    pick_config,
    pick_fma_config,
    skinny_matmul,
)

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

# Small blocks, so the test shapes have several programs, several K chunks and ragged edges in both.
TENSOR_CORES = SkinnyConfig(32, 64, 4, 2, tensor_cores=True)
CUDA_CORES = SkinnyConfig(32, 64, 4, 2, tensor_cores=False)
# bf16 output rounding is 2**-8 relative (2**-7 in the interpreter, which truncates fp32 -> bf16).
MAX_REL_ERR = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def _randn(*shape: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype).to(DEVICE)


def _rel_err(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> float:
    """max |y - ref| / max |ref| against the float32 product of the same (rounded) inputs."""
    ref = x.float() @ w.float().T
    if bias is not None:
        ref += bias.float()
    return ((y.float() - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize(("m", "n", "k"), [(1, 48, 64), (3, 80, 200), (16, 96, 256)])
def test_matches_float32_reference(m: int, n: int, k: int, dtype: torch.dtype, with_bias: bool) -> None:
    # x as a column slice of a wider tensor (strided rows), W as rows of a wider weight (row stride > K)
    x = _randn(m, k + 16, dtype=dtype, seed=1)[:, :k]
    w = _randn(n, k + 8, dtype=dtype, seed=2)[:, :k]
    bias = _randn(n, dtype=dtype, seed=3) if with_bias else None
    configs = [None, TENSOR_CORES] + ([CUDA_CORES] if m == 1 else [])  # None: pick_config's guess
    for config in configs:
        y = skinny_matmul(x, w, bias, config)
        assert y.shape == (m, n) and y.dtype == dtype and y.is_contiguous()
        assert _rel_err(y, x, w, bias) < MAX_REL_ERR[dtype], config
        # Deterministic: no atomics, one fixed summation order per output.
        assert torch.equal(skinny_matmul(x, w, bias, config), y)


def test_every_candidate_config() -> None:
    n, k = 72, 160  # ragged against every candidate's blocks
    w = _randn(n, k, dtype=torch.bfloat16, seed=4)
    bias = _randn(n, dtype=torch.bfloat16, seed=5)
    for m in (1, 5):
        x = _randn(m, k, dtype=torch.bfloat16, seed=6)
        for config in candidate_configs(m):
            assert _rel_err(skinny_matmul(x, w, bias, config), x, w, bias) < 1e-2, config.name


def test_float16() -> None:
    x, w = _randn(2, 96, dtype=torch.float16, seed=7), _randn(40, 96, dtype=torch.float16, seed=8)
    assert _rel_err(skinny_matmul(x, w, config=TENSOR_CORES), x, w, None) < MAX_REL_ERR[torch.float16]


def test_empty_inputs() -> None:
    w = _randn(24, 32, dtype=torch.float32, seed=9)
    assert skinny_matmul(torch.empty(0, 32, device=DEVICE), w).shape == (0, 24)
    # K = 0: the sum is empty, so y is the bias
    bias = _randn(24, dtype=torch.float32, seed=10)
    y = skinny_matmul(torch.empty(2, 0, device=DEVICE), torch.empty(24, 0, device=DEVICE), bias, TENSOR_CORES)
    torch.testing.assert_close(y, bias.expand(2, 24))


def test_rejects_bad_inputs() -> None:
    x = _randn(2, 32, dtype=torch.float32, seed=11)
    w = _randn(24, 32, dtype=torch.float32, seed=12)
    with pytest.raises(ValueError, match=r"\[M, K\]"):
        skinny_matmul(x[0], w)
    with pytest.raises(ValueError, match="differ in K"):
        skinny_matmul(x[:, :16], w)
    with pytest.raises(ValueError, match="at most 16 rows"):
        skinny_matmul(_randn(MAX_M + 1, 32, dtype=torch.float32, seed=13), w)
    with pytest.raises(ValueError, match="dtype"):
        skinny_matmul(x, w.to(torch.bfloat16))
    with pytest.raises(ValueError, match="dtype"):
        skinny_matmul(x.double(), w.double())
    with pytest.raises(ValueError, match="unit stride"):
        skinny_matmul(_randn(32, 2, dtype=torch.float32, seed=14).t(), w)
    with pytest.raises(ValueError, match="unit stride"):
        skinny_matmul(x, _randn(32, 24, dtype=torch.float32, seed=15).t())
    with pytest.raises(ValueError, match="bias"):
        skinny_matmul(x, w, torch.zeros(23, device=DEVICE))
    with pytest.raises(ValueError, match="bias"):
        skinny_matmul(x, w, torch.zeros(24, dtype=torch.bfloat16, device=DEVICE))
    with pytest.raises(ValueError, match="one row"):
        skinny_matmul(x, w, config=CUDA_CORES)


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="power of two"):
        SkinnyConfig(24, 64, 4, 2, tensor_cores=False)
    with pytest.raises(ValueError, match=">= 16"):
        SkinnyConfig(8, 64, 4, 2, tensor_cores=True)
    with pytest.raises(ValueError, match="num_stages"):
        SkinnyConfig(16, 64, 4, 0, tensor_cores=True)
    assert len({c.name for c in CANDIDATES}) == len(CANDIDATES)
    # The untuned defaults are candidates, so the GPU benchmark measures them too.
    for m, n in [(1, 4096), (1, 128256), (4, 4096), (16, 28672)]:
        assert pick_config(m, n, 4096) in CANDIDATES


def test_pick_config(monkeypatch: pytest.MonkeyPatch) -> None:
    for m in range(1, MAX_M + 1):
        config = pick_config(m, 4096, 4096)
        assert config.tensor_cores or m == 1
        assert all(c.tensor_cores for c in candidate_configs(m)) or m == 1
    tuned = ((1, CUDA_CORES), (MAX_M, TENSOR_CORES))
    monkeypatch.setitem(triton_gemv.TUNED, (4096, 4096), tuned)
    assert pick_config(1, 4096, 4096) == CUDA_CORES
    assert pick_config(7, 4096, 4096) == TENSOR_CORES


# ----------------------------------------------------------------------- GEMVs with a fused prologue (M == 1)

# N against CUDA_CORES' block_n 32: ragged, ragged, even; K against its block_k 64: even, ragged, ragged.
FUSED_SHAPES = [(24, 64), (72, 200), (96, 330)]
EPS = 1e-5
# Against float32 torch: the activation is rounded twice to the model dtype before the dot (the interpreter's
# truncation biases both roundings the same way): 2 bf16 ulps.
FUSED_REL_ERR = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _max_diff(y: torch.Tensor, ref: torch.Tensor) -> float:
    """max |y - ref| / max |ref|."""
    return ((y.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("n", "k"), FUSED_SHAPES)
def test_silu_mul_matmul(n: int, k: int, dtype: torch.dtype) -> None:
    gate_up = _randn(1, 2 * k + 16, dtype=dtype, seed=20)[:, : 2 * k]  # a column slice, as the row of a view
    w = _randn(n, k + 8, dtype=dtype, seed=21)[:, :k]  # rows of a wider weight (row stride > K)
    gate, up = gate_up.float().chunk(2, dim=-1)
    ref = (torch.nn.functional.silu(gate) * up) @ w.float().T
    for config in (None, CUDA_CORES):
        y = silu_mul_matmul(gate_up, w, config)
        assert y.shape == (1, n) and y.dtype == dtype and y.is_contiguous()
        # The activation is elementwise and rounded where silu_and_mul rounds, and the dot sums in
        # skinny_matmul's order: bitwise the unfused pair's output.
        unfused = skinny_matmul(silu_and_mul(gate_up), w, config=config or pick_fma_config(n, k))
        assert torch.equal(y, unfused), config
        assert _max_diff(y, ref) < FUSED_REL_ERR[dtype], config
        assert torch.equal(silu_mul_matmul(gate_up, w, config), y)  # deterministic


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("n", "k"), FUSED_SHAPES)
@pytest.mark.parametrize("with_residual", [True, False])
def test_rms_norm_matmul(
    n: int, k: int, dtype: torch.dtype, with_residual: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    x = _randn(1, k + 16, dtype=dtype, seed=22)[:, :k]
    residual = _randn(1, k, dtype=dtype, seed=23) if with_residual else None
    norm_w = _randn(k, dtype=dtype, seed=24)
    w = _randn(n, k + 8, dtype=dtype, seed=25)[:, :k]
    bias = _randn(n, dtype=dtype, seed=26) if n == 72 else None  # Qwen2's qkv has one
    inputs = (x.clone(), residual.clone() if residual is not None else None)
    # float32 reference of the same rounded residual sum
    summed = (x + residual) if residual is not None else x
    s = summed.float()
    ref = (s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + EPS) * norm_w.float()) @ w.float().T
    ref += bias.float() if bias is not None else 0.0
    # pass 1 (the sum of squares) over the whole row at once, then (one value a thread per chunk) in chunks of
    # 32 * num_warps = 128, ragged for K 200 and 330
    for config, sum_elems in ((None, fused_decode.SUM_ELEMS_PER_THREAD), (CUDA_CORES, 1)):
        monkeypatch.setattr(fused_decode, "SUM_ELEMS_PER_THREAD", sum_elems)
        y, residual_out = rms_norm_matmul(x, residual, norm_w, EPS, w, bias, config)
        assert y.shape == (1, n) and y.dtype == dtype and y.is_contiguous()
        if residual is None:
            normed, unfused_residual = rms_norm(x, norm_w, EPS), x
            assert residual_out is x
        else:
            normed, unfused_residual = rms_norm(x, norm_w, EPS, residual)
            # a fresh tensor: aliasing x or residual would race with the programs still reading them
            assert residual_out.data_ptr() not in (x.data_ptr(), residual.data_ptr())
        assert torch.equal(residual_out, unfused_residual), config
        unfused = skinny_matmul(normed, w, bias, config=config or pick_fma_config(n, k))
        # Equal up to the order of the sum of squares (an ulp of rstd, an ulp of y at worst in bf16); bitwise
        # when that order happens to agree.
        assert _max_diff(y, unfused) <= {torch.float32: 1e-6, torch.bfloat16: 2**-7}[dtype], config
        assert _max_diff(y, ref) < FUSED_REL_ERR[dtype], config
        again = rms_norm_matmul(x, residual, norm_w, EPS, w, bias, config)
        assert torch.equal(again[0], y) and torch.equal(again[1], residual_out)  # deterministic
    assert torch.equal(x, inputs[0]) and (residual is None or torch.equal(residual, inputs[1]))


def test_fused_config_never_uses_tensor_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    n, k = 40, 96
    monkeypatch.setitem(triton_gemv.TUNED, (n, k), ((MAX_M, TENSOR_CORES),))
    config = pick_fma_config(n, k)
    assert not config.tensor_cores and config in CANDIDATES
    monkeypatch.setitem(triton_gemv.TUNED, (n, k), ((1, CUDA_CORES), (MAX_M, TENSOR_CORES)))
    assert pick_fma_config(n, k) == CUDA_CORES
    gate_up, w = _randn(1, 2 * k, dtype=torch.float32, seed=27), _randn(n, k, dtype=torch.float32, seed=28)
    unfused = skinny_matmul(silu_and_mul(gate_up), w, config=CUDA_CORES)
    assert torch.equal(silu_mul_matmul(gate_up, w), unfused)


def test_fused_rejects_bad_inputs() -> None:
    f32 = torch.float32
    x, r = _randn(1, 32, dtype=f32, seed=29), _randn(1, 32, dtype=f32, seed=30)
    norm_w, w = _randn(32, dtype=f32, seed=31), _randn(24, 32, dtype=f32, seed=32)
    gate_up = _randn(1, 64, dtype=f32, seed=33)
    with pytest.raises(ValueError, match="one row"):
        silu_mul_matmul(_randn(2, 64, dtype=f32, seed=34), w)
    with pytest.raises(ValueError, match="one row"):
        rms_norm_matmul(_randn(2, 32, dtype=f32, seed=35), None, norm_w, EPS, w)
    with pytest.raises(ValueError, match="does not fit"):
        silu_mul_matmul(gate_up[:, :32], w)
    with pytest.raises(ValueError, match="does not fit"):
        rms_norm_matmul(x[:, :16], None, norm_w, EPS, w)
    with pytest.raises(ValueError, match="2-D"):
        silu_mul_matmul(gate_up[0], w)
    with pytest.raises(ValueError, match="dtype"):
        silu_mul_matmul(gate_up, w.to(torch.bfloat16))
    with pytest.raises(ValueError, match="unit stride"):
        rms_norm_matmul(x, None, norm_w, EPS, _randn(32, 24, dtype=f32, seed=36).t())
    with pytest.raises(ValueError, match="non-empty"):
        silu_mul_matmul(torch.empty(1, 0, device=DEVICE), torch.empty(24, 0, device=DEVICE))
    with pytest.raises(ValueError, match="CUDA cores only"):
        silu_mul_matmul(gate_up, w, TENSOR_CORES)
    with pytest.raises(ValueError, match="CUDA cores only"):
        rms_norm_matmul(x, r, norm_w, EPS, w, config=TENSOR_CORES)
    with pytest.raises(ValueError, match="residual"):
        rms_norm_matmul(x, r.to(torch.bfloat16), norm_w, EPS, w)
    with pytest.raises(ValueError, match="residual"):
        rms_norm_matmul(x, _randn(1, 64, dtype=f32, seed=37)[:, ::2], norm_w, EPS, w)
    with pytest.raises(ValueError, match="norm_weight"):
        rms_norm_matmul(x, r, norm_w[:16], EPS, w)
    with pytest.raises(ValueError, match="bias"):
        rms_norm_matmul(x, r, norm_w, EPS, w, torch.zeros(23, device=DEVICE))
