"""The KV pool's element type: the model's dtype ("auto") or FP8 (`--kv-cache-dtype fp8_e5m2 | fp8_e4m3`).

An FP8 pool holds twice the tokens of a bf16 one in the same memory and halves the bytes a decode step reads
per token of context. K and V are cast on the way in (saturating: a value past the format's largest finite
one is stored as that value, where a plain cast would give inf or NaN) and widened to the query's dtype
inside the attention kernels; the scale is 1.0, as in SGLang and vLLM when a checkpoint carries no KV scales.
e4m3 keeps 3 mantissa bits and a range of +-448; e5m2 keeps 2 bits and a range of +-57344.
"""

from __future__ import annotations

import torch

KV_CACHE_DTYPES: dict[str, torch.dtype] = {
    "fp8_e5m2": torch.float8_e5m2,
    "fp8_e4m3": torch.float8_e4m3fn,
}
FP8_DTYPES = frozenset(KV_CACHE_DTYPES.values())


def resolve_kv_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """The pool's dtype for `--kv-cache-dtype name` ("auto": the model's)."""
    if name == "auto":
        return model_dtype
    if name not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be auto or one of {', '.join(KV_CACHE_DTYPES)}; got {name!r}")
    return KV_CACHE_DTYPES[name]


def saturation(dtype: torch.dtype) -> float:
    """The bound a value is clamped to before the cast into a pool of `dtype` (0.0: no clamp needed)."""
    return float(torch.finfo(dtype).max) if dtype in FP8_DTYPES else 0.0


def to_kv(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x cast to the pool's dtype, saturating for FP8."""
    bound = saturation(dtype)
    if bound:
        x = x.float().clamp(-bound, bound)
    return x.to(dtype)
