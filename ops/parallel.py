"""Tensor parallelism: the rank of this worker among its peers, and the two collectives the model layers need.

Every collective is a no-op at size 1, so a single-GPU (or CPU) model pays nothing for being TP-ready. On
GPUs, small all-reduces (decode steps) take the one-shot symmetric-memory path when the group has one, or,
with --enable-flashinfer-allreduce-fusion, one kernel with the residual add and RMSNorm that follow them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from radixserve.ops.allreduce_norm import FusedAllReduceRMSNorm
    from radixserve.ops.symm_all_reduce import OneShotAllReduce


@dataclass(frozen=True, slots=True)
class TPGroup:
    """This worker's place in its tensor-parallel group. `group` None means the default (world) group."""

    rank: int = 0
    size: int = 1
    group: dist.ProcessGroup | None = None
    one_shot: OneShotAllReduce | None = None  # small tensors on GPUs (ops/symm_all_reduce.py); else NCCL/gloo
    # All-reduce + residual add + RMSNorm in one kernel (ops/allreduce_norm.py; RMSNorm uses it), or None
    fused_norm: FusedAllReduceRMSNorm | None = None

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"TPGroup.size must be >= 1, got {self.size}")
        if not 0 <= self.rank < self.size:
            raise ValueError(f"TPGroup.rank must be in [0, {self.size}), got {self.rank}")

    def shard(self, total: int, what: str) -> int:
        """Size of this rank's equal share of `total` (which must divide evenly)."""
        if total % self.size:
            raise ValueError(f"{what} ({total}) is not divisible by the tensor-parallel size ({self.size})")
        return total // self.size

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of x over the ranks (in place when size > 1)."""
        if self.size == 1:
            return x
        if self.one_shot is not None and self.one_shot.fits(x):
            return self.one_shot(x)
        dist.all_reduce(x, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Every rank's x concatenated along `dim`, in rank order."""
        if self.size == 1:
            return x
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x, group=self.group)
        return torch.cat(parts, dim=dim)
