"""RMSNorm, with the residual add fused in (vLLM's interface), computed in float32 like HF Llama/Qwen2.

Under tensor parallelism a norm may also complete the row-parallel layer before it: constructed with
`reduce_tp`, it takes that layer's unsummed output whenever a residual comes with it, and sums it over the
ranks first, in one kernel with the add and the norm where the group has one (ops/allreduce_norm.py).
"""

from __future__ import annotations

import torch
from torch import nn

from radixserve.ops.parallel import TPGroup


class RMSNorm(nn.Module):
    def __init__(
        self, hidden_size: int, eps: float, dtype: torch.dtype, reduce_tp: TPGroup | None = None
    ) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype), requires_grad=False)
        self.reduce_tp = reduce_tp if reduce_tp is not None and reduce_tp.size > 1 else None

    def _norm(self, x: torch.Tensor) -> torch.Tensor:  # [T, hidden], float32
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """norm(x), or with a residual: (norm(x + residual), x + residual), the sum kept in x's dtype. With
        `reduce_tp` and a residual, x is summed over the ranks first."""
        tp = self.reduce_tp
        if tp is not None and residual is not None:
            if tp.fused_norm is not None and tp.fused_norm.fits(x, residual):
                return tp.fused_norm(x, residual, self.weight, self.eps)
            x = tp.all_reduce(x)
        if x.is_cuda:  # one fused kernel instead of ~7 (matters for CUDA-graph decode)
            from radixserve.ops.triton_fused import rms_norm

            return rms_norm(x, self.weight, self.eps, residual)
        dtype = x.dtype
        if residual is None:
            return self.weight * self._norm(x.float()).to(dtype)
        summed = x + residual
        return self.weight * self._norm(summed.float()).to(dtype), summed
