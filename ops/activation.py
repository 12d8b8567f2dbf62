"""Gated activations of the MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """[T, 2 * d] (gate | up) -> [T, d]: silu(gate) * up (one Triton kernel on the GPU)."""
    if x.is_cuda:
        from radixserve.ops import triton_fused

        return triton_fused.silu_and_mul(x)
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up

