"""Fused Triton ops (RMSNorm + residual, SiLU-and-mul, KV store) against the torch modules they replace, run
by Triton's interpreter on the CPU (TRITON_INTERPRET=1; set TRITON_INTERPRET=0 on a CUDA machine to run the
compiled kernels on the GPU instead)."""

from __future__ import annotations

import os
from typing import Any

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: kernels are built at import

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

triton = pytest.importorskip(
    "triton", reason="triton is not installed or fails to import", exc_type=ImportError
)

from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from radixserve.ops.norm import RMSNorm  # noqa: E402
from radixserve.ops.triton_fused import rms_norm, silu_and_mul, store_kv  # noqa: E402
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

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _tol(dtype: torch.dtype) -> dict[str, Any]:
    # The kernels round where the reference rounds, so half types land within an ulp or two. NOTE: Triton's
    # interpreter truncates fp32 -> bf16 (compiled kernels round to nearest even like torch): 2 bf16 ulps.
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    return {"atol": tol, "rtol": tol}


def _randn(*shape: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype).to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [64, 96])
def test_rms_norm_with_and_without_residual(dtype: torch.dtype, hidden: int) -> None:
    norm = RMSNorm(hidden, eps=1e-6, dtype=dtype).to(DEVICE)
    with torch.no_grad():
        norm.weight.copy_(_randn(hidden, dtype=dtype, seed=1))
    # x as a column slice of a wider tensor: rows are strided
    x = _randn(5, hidden + 32, dtype=dtype, seed=2)[:, :hidden]
    residual = _randn(5, hidden, dtype=dtype, seed=3)

    out = rms_norm(x, norm.weight, norm.eps)
    assert isinstance(out, torch.Tensor)
    torch.testing.assert_close(out, norm(x), **_tol(dtype))

    fused = rms_norm(x, norm.weight, norm.eps, residual)
    assert isinstance(fused, tuple)
    expected_out, expected_sum = norm(x, residual)
    torch.testing.assert_close(fused[0], expected_out, **_tol(dtype))
    torch.testing.assert_close(fused[1], expected_sum, **_tol(dtype))


def test_rms_norm_rejects_bad_inputs() -> None:
    x = _randn(3, 16, dtype=torch.float32, seed=0)
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, torch.ones(16, dtype=torch.bfloat16, device=DEVICE), 1e-6)
    with pytest.raises(ValueError, match="residual"):
        rms_norm(x, torch.ones(16, device=DEVICE), 1e-6, x[:2])
    with pytest.raises(ValueError, match="unit stride"):
        rms_norm(x.t(), torch.ones(3, device=DEVICE), 1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [64, 40])
def test_silu_and_mul(dtype: torch.dtype, d: int) -> None:
    x = _randn(4, 2 * d, dtype=torch.float32, seed=4)
    x[0, :4] = torch.tensor([-100.0, 100.0, -30.0, 0.0])  # the sigmoid must not overflow
    x = x.to(dtype)
    gate, up = x.float().chunk(2, dim=-1)  # float32 reference on any device
    torch.testing.assert_close(silu_and_mul(x), (F.silu(gate) * up).to(dtype), **_tol(dtype))
    with pytest.raises(ValueError, match="even"):
        silu_and_mul(x[:, :-1])


@pytest.mark.parametrize(
    ("src", "dst"),
    [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16)],
)
@pytest.mark.parametrize("slot_dtype", [torch.int64, torch.int32])
def test_store_kv_scattered_slots(src: torch.dtype, dst: torch.dtype, slot_dtype: torch.dtype) -> None:
    num_slots, kv_heads, head_dim, q_heads = 50, 2, 80, 8
    k_buf = torch.zeros(num_slots, kv_heads, head_dim, dtype=dst, device=DEVICE)
    v_buf = torch.zeros_like(k_buf)
    # k and v as views of one fused QKV output: strided rows
    qkv = _randn(6, q_heads + 2 * kv_heads, head_dim, dtype=src, seed=5)
    k, v = qkv[:, q_heads : q_heads + kv_heads], qkv[:, q_heads + kv_heads :]
    slots = torch.tensor([17, 3, 44, 9, 30, 1], dtype=slot_dtype, device=DEVICE)

    store_kv(k, v, k_buf, v_buf, slots)

    expected_k, expected_v = torch.zeros_like(k_buf), torch.zeros_like(v_buf)
    expected_k[slots.long()], expected_v[slots.long()] = k.to(dst), v.to(dst)
    torch.testing.assert_close(k_buf, expected_k, atol=0, rtol=1e-2 if src != dst else 0)
    torch.testing.assert_close(v_buf, expected_v, atol=0, rtol=1e-2 if src != dst else 0)


def test_store_kv_rejects_bad_inputs() -> None:
    k_buf = torch.zeros(10, 2, 16, device=DEVICE)
    k = _randn(3, 2, 16, dtype=torch.float32, seed=6)
    slots = torch.tensor([1, 2, 3], device=DEVICE)
    with pytest.raises(ValueError, match="do not fit"):
        store_kv(k[:, :1], k[:, :1], k_buf, k_buf.clone(), slots)
    with pytest.raises(ValueError, match="slots"):
        store_kv(k, k, k_buf, k_buf.clone(), slots.float())
    with pytest.raises(ValueError, match="unit stride"):
        store_kv(k.transpose(1, 2).contiguous().transpose(1, 2), k, k_buf, k_buf.clone(), slots)
    store_kv(k[:0], k[:0], k_buf, k_buf.clone(), slots[:0])  # no tokens: nothing to do
