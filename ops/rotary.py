"""Rotary position embedding, neox style (rotate halves) as HF Llama/Qwen2/Mistral use it.

Supported rope types: "default", "linear" (position interpolation) and "llama3" (Llama 3.1's frequency-band
scaling). They differ only in the inverse frequencies; every other type raises UnsupportedFeatureError.
cos/sin are computed once for every position in float32, then cast to the model dtype, exactly as HF does
per step, so the float32 path matches HF bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from radixserve.errors import UnsupportedFeatureError
from radixserve.ops.forward_batch import KVStore
from radixserve.ops.kv_dtype import to_kv

ROPE_TYPES = ("default", "linear", "llama3")
_REQUIRED_KEYS = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


def rope_type_of(scaling: Mapping[str, Any] | None) -> str:
    """The rope type a scaling dict asks for (HF spells the key "rope_type", or "type" before 4.45).

    Raises UnsupportedFeatureError for a type we have not built, ValueError for a missing parameter.
    """
    if not scaling:
        return "default"
    rope_type = str(scaling.get("rope_type", scaling.get("type", "default")))
    if rope_type not in ROPE_TYPES:
        raise UnsupportedFeatureError(
            f"rope type {rope_type!r} is not supported (supported: {', '.join(ROPE_TYPES)})"
        )
    missing = [key for key in _REQUIRED_KEYS[rope_type] if key not in scaling]
    if missing:
        raise ValueError(f"rope type {rope_type!r} needs {', '.join(missing)} in its rope scaling parameters")
    return rope_type


def rope_inv_freq(head_dim: int, base: float, scaling: Mapping[str, Any] | None) -> torch.Tensor:
    """[head_dim / 2] float32 inverse frequencies (the formulas of transformers' modeling_rope_utils)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    match rope_type_of(scaling):
        case "default":
            return inv_freq
        case "linear":
            assert scaling is not None
            return inv_freq / float(scaling["factor"])
        case "llama3":
            assert scaling is not None
            return _llama3_inv_freq(inv_freq, scaling)
        case other:
            raise AssertionError(other)


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: Mapping[str, Any]) -> torch.Tensor:
    # Long wavelengths (low frequencies) are slowed by `factor`, short ones kept, and the band between the two
    # wavelength thresholds interpolated smoothly.
    factor = float(scaling["factor"])
    low_freq_factor = float(scaling["low_freq_factor"])
    high_freq_factor = float(scaling["high_freq_factor"])
    old_context_len = float(scaling["original_max_position_embeddings"])
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor

    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    def __init__(
        self,
        head_dim: int,
        max_position: int,
        base: float,
        scaling: Mapping[str, Any] | None,
        dtype: torch.dtype,
    ) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary embedding needs an even head_dim, got {head_dim}")
        self.head_dim = head_dim
        inv_freq = rope_inv_freq(head_dim, base, scaling)
        freqs = torch.outer(torch.arange(max_position, dtype=torch.float32, device=inv_freq.device), inv_freq)
        # [max_position, head_dim]: cos of each frequency, then sin
        self.cos_sin_cache: torch.Tensor
        self.register_buffer("cos_sin_cache", torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(dtype), False)

    def forward(
        self,
        positions: torch.Tensor,  # [T] int64
        q: torch.Tensor,  # [T, q_heads, head_dim]
        k: torch.Tensor,  # [T, kv_heads, head_dim]
        v: torch.Tensor | None = None,  # [T, kv_heads, head_dim], with kv_store
        kv_store: KVStore | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotated q and k; with `kv_store`, the rotated k and v are also written into the KV pool there."""
        if q.is_cuda:
            from radixserve.ops import triton_rotary

            if triton_rotary.supported(self.head_dim):
                triton_rotary.apply_rotary_inplace(positions, q, k, self.cos_sin_cache, v, kv_store)
                return q, k
        cos, sin = self.cos_sin_cache[positions].unsqueeze(-2).chunk(2, dim=-1)  # [T, 1, head_dim / 2] each
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        if kv_store is not None:
            assert v is not None, "storing K/V needs v"
            kv_store.k_buffer[kv_store.slots] = to_kv(k, kv_store.k_buffer.dtype)
            kv_store.v_buffer[kv_store.slots] = to_kv(v, kv_store.v_buffer.dtype)
        return q, k


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # neox style: the two halves of head_dim form the (real, imaginary) pairs
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
