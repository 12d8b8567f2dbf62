"""Skinny GEMM (ops/triton_gemv.py) against a float32 x @ W^T, run by Triton's interpreter on the CPU
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

from radixserve.ops import triton_gemv  # noqa: E402
from radixserve.ops.triton_gemv import (  # noqa: E402
    CANDIDATES,
    MAX_M,
    SMEM_BYTES,
    SkinnyConfig,
    candidate_configs,
    pick_config,
    skinny_matmul,
)
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
@pytest.mark.parametrize(
    ("m", "n", "k"), [(1, 48, 64), (3, 80, 200), (16, 96, 256), (40, 48, 96), (100, 40, 64)])
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
    for m in (1, 5, 33):
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
    with pytest.raises(ValueError, match=f"at most {MAX_M} rows"):
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
    for m in (17, 64, 128):  # untuned larger batches: a default whose tiles fit at m's padded batch
        assert pick_config(m, 28672, 4096).shared_memory(m) <= SMEM_BYTES


def test_larger_batches_only_where_measured(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past one row, the kernel replaces cuBLAS only for a shape and batch bench_gemv measured (TUNED up to
    that batch); the CUDA check comes first, so fake the device with a stand-in tensor type."""

    class FakeCuda(torch.Tensor):
        is_cuda = True

    w = torch.empty(4096, 4096, dtype=torch.bfloat16)

    def x(m: int) -> torch.Tensor:
        return torch.empty(m, 4096, dtype=torch.bfloat16).as_subclass(FakeCuda)

    monkeypatch.setitem(triton_gemv.TUNED, (4096, 4096), ((1, CUDA_CORES), (16, TENSOR_CORES)))
    assert triton_gemv.faster_than_cublas(x(1), w) and triton_gemv.faster_than_cublas(x(16), w)
    assert not triton_gemv.faster_than_cublas(x(17), w)
    monkeypatch.setitem(triton_gemv.TUNED, (4096, 4096), ((1, CUDA_CORES), (64, TENSOR_CORES)))
    assert triton_gemv.faster_than_cublas(x(64), w) and not triton_gemv.faster_than_cublas(x(65), w)
    assert not triton_gemv.faster_than_cublas(x(MAX_M + 1), w)
    monkeypatch.delitem(triton_gemv.TUNED, (4096, 4096))
    assert triton_gemv.faster_than_cublas(x(1), w) and not triton_gemv.faster_than_cublas(x(2), w)
