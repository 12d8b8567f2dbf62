"""RMSNorm, with the residual add fused in (vLLM's interface), computed in float32 like HF Llama/Qwen2."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype), requires_grad=False)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:  # [T, hidden], float32
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """norm(x), or with a residual: (norm(x + residual), x + residual), the sum kept in x's dtype."""
        if x.is_cuda:  # one fused kernel instead of ~7 (matters for CUDA-graph decode)
            from radixserve.ops.triton_fused import rms_norm

            return rms_norm(x, self.weight, self.eps, residual)
        dtype = x.dtype
        if residual is None:
            return self.weight * self._norm(x.float()).to(dtype)
        summed = x + residual
        return self.weight * self._norm(summed.float()).to(dtype), summed
