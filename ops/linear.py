"""Tensor-parallel linear layers (Megatron style).

Column-parallel layers split the output features across ranks and need no communication; row-parallel
layers split the input features and all-reduce their partial outputs. An attention block or an MLP is one
column layer followed by one row layer, so each costs exactly one all-reduce.

Every layer's `weight_loader(param, full, shard_id)` takes the FULL checkpoint tensor and copies out only this
rank's shard, so no rank ever holds more of another rank's weights than the one tensor being loaded.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from radixserve.ops.parallel import TPGroup


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, or the Triton skinny GEMM for decode batches on the GPU where it beats cuBLAS."""
    if x.is_cuda:
        from radixserve.ops import triton_gemv

        if triton_gemv.faster_than_cublas(x, weight):
            return triton_gemv.skinny_matmul(x, weight, bias)
    return F.linear(x, weight, bias)


def _copy_shard(dst: torch.Tensor, full: torch.Tensor, dim: int, start: int, full_size: int) -> None:
    """dst <- full.narrow(dim, start, dst.shape[dim]), after checking that `full` has the expected shape."""
    if full.dim() != dst.dim() or full.shape[dim] != full_size:
        raise ValueError(
            f"checkpoint tensor {tuple(full.shape)} does not fit: expected size {full_size} on dim {dim}"
        )
    src = full.narrow(dim, start, dst.shape[dim])
    if src.shape != dst.shape:
        raise ValueError(f"checkpoint shard {tuple(src.shape)} does not match parameter {tuple(dst.shape)}")
    with torch.no_grad():
        dst.copy_(src)


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W split by rows (output features): this rank computes y[:, rank's slice]."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool, tp: TPGroup, dtype: torch.dtype
    ) -> None:
        super().__init__()
        self.tp = tp
        self.in_features = in_features
        self.out_features = out_features
        self.out_local = tp.shard(out_features, "output features")
        self.weight = nn.Parameter(torch.empty(self.out_local, in_features, dtype=dtype), requires_grad=False)
        self.bias = (
            nn.Parameter(torch.empty(self.out_local, dtype=dtype), requires_grad=False) if bias else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, in] -> [T, out / tp]
        return linear(x, self.weight, self.bias)

    def weight_loader(
        self, param: nn.Parameter, full: torch.Tensor, shard_id: str | int | None = None
    ) -> None:
        if shard_id is not None:
            raise ValueError(f"{type(self).__name__} takes no shard_id, got {shard_id!r}")
        _copy_shard(param.data, full, 0, self.tp.rank * self.out_local, self.out_features)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs in one matmul (gate and up of an MLP); shard_id indexes output_sizes.

    Local layout on each rank: [out_0 / tp | out_1 / tp | ...], so a split by local sizes recovers each part.
    """

    def __init__(
        self, in_features: int, output_sizes: Sequence[int], bias: bool, tp: TPGroup, dtype: torch.dtype
    ) -> None:
        super().__init__(in_features, sum(output_sizes), bias, tp, dtype)
        self.output_sizes = tuple(output_sizes)
        self.local_sizes = tuple(tp.shard(s, "merged output features") for s in output_sizes)

    def weight_loader(
        self, param: nn.Parameter, full: torch.Tensor, shard_id: str | int | None = None
    ) -> None:
        if shard_id is None:  # an already-merged checkpoint tensor
            for i, part in enumerate(full.split(self.output_sizes, dim=0)):
                self.weight_loader(param, part, i)
            return
        assert isinstance(shard_id, int), shard_id
        size = self.local_sizes[shard_id]
        dst = param.data.narrow(0, sum(self.local_sizes[:shard_id]), size)
        _copy_shard(dst, full, 0, self.tp.rank * size, self.output_sizes[shard_id])


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections in one matmul; shard_id is "q", "k" or "v".

    Query heads are split across ranks. KV heads are split too when there are at least tp of them; otherwise
    each KV head is replicated on tp / num_kv_heads consecutive ranks (rank r holds head r // replicas).

    Local output layout: [q: q_heads_local * d | k: kv_heads_local * d | v: kv_heads_local * d].
    """

    def __init__(
        self,
        hidden_size: int,
        head_dim: int,
        num_heads: int,
        num_kv_heads: int,
        bias: bool,
        tp: TPGroup,
        dtype: torch.dtype,
    ) -> None:
        self.head_dim = head_dim
        self.num_heads_local = tp.shard(num_heads, "num_heads")
        if num_kv_heads >= tp.size:
            self.num_kv_heads_local = tp.shard(num_kv_heads, "num_kv_heads")
            self.kv_head_start = tp.rank * self.num_kv_heads_local
        else:
            if tp.size % num_kv_heads:
                raise ValueError(
                    f"tensor-parallel size {tp.size} is not a multiple of num_kv_heads {num_kv_heads}"
                )
            self.num_kv_heads_local = 1
            self.kv_head_start = tp.rank // (tp.size // num_kv_heads)
        self.q_size = self.num_heads_local * head_dim  # local
        self.kv_size = self.num_kv_heads_local * head_dim  # local
        self.full_sizes = {
            "q": num_heads * head_dim,
            "k": num_kv_heads * head_dim,
            "v": num_kv_heads * head_dim,
        }
        # The parent's output split is replaced by our own layout, so give it the size it would split to.
        super().__init__(hidden_size, (self.q_size + 2 * self.kv_size) * tp.size, bias, tp, dtype)

    def split(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[T, qkv_local] -> q [T, q_local], k [T, kv_local], v [T, kv_local]."""
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        return q, k, v

    def weight_loader(
        self, param: nn.Parameter, full: torch.Tensor, shard_id: str | int | None = None
    ) -> None:
        if shard_id is None:  # an already-fused checkpoint tensor
            parts = full.split([self.full_sizes["q"], self.full_sizes["k"], self.full_sizes["v"]], dim=0)
            for sid, part in zip("qkv", parts, strict=True):
                self.weight_loader(param, part, sid)
            return
        d = self.head_dim
        match shard_id:
            case "q":
                dst_start, size, src_start = 0, self.q_size, self.tp.rank * self.q_size
            case "k":
                dst_start, size, src_start = self.q_size, self.kv_size, self.kv_head_start * d
            case "v":
                dst_start, size, src_start = self.q_size + self.kv_size, self.kv_size, self.kv_head_start * d
            case _:
                raise ValueError(f"QKVParallelLinear shard_id must be 'q', 'k' or 'v', got {shard_id!r}")
        _copy_shard(param.data.narrow(0, dst_start, size), full, 0, src_start, self.full_sizes[shard_id])


class RowParallelLinear(nn.Module):
    """y = x W^T + b with W split by columns (input features).

    x arrives split (from a column layer), each rank computes a partial sum, and one all-reduce completes it.
    The bias is added on rank 0 only, before the sum. reduce_results=False returns the partial sum, for a
    consumer that completes it (an RMSNorm with reduce_tp, which can fuse the all-reduce in).
    """

    def __init__(
        self, in_features: int, out_features: int, bias: bool, tp: TPGroup, dtype: torch.dtype,
        reduce_results: bool = True,
    ) -> None:
        super().__init__()
        self.tp = tp
        self.reduce_results = reduce_results
        self.in_features = in_features
        self.out_features = out_features
        self.in_local = tp.shard(in_features, "input features")
        self.weight = nn.Parameter(torch.empty(out_features, self.in_local, dtype=dtype), requires_grad=False)
        self.bias = (
            nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False) if bias else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, in / tp] -> [T, out]
        y = linear(x, self.weight, self.bias if self.tp.rank == 0 else None)
        return self.tp.all_reduce(y) if self.reduce_results else y

    def weight_loader(
        self, param: nn.Parameter, full: torch.Tensor, shard_id: str | int | None = None
    ) -> None:
        if shard_id is not None:
            raise ValueError(f"RowParallelLinear takes no shard_id, got {shard_id!r}")
        if param is self.bias:  # replicated
            _copy_shard(param.data, full, 0, 0, self.out_features)
        else:
            _copy_shard(param.data, full, 1, self.tp.rank * self.in_local, self.in_features)
