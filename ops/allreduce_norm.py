"""All-reduce, residual add and RMSNorm in one kernel, for tensor-parallel decode on one host.

A TP layer ends in a row-parallel projection whose partial sums are all-reduced, then added to the residual
stream and normalized for the next block: two kernels a block (the all-reduce, the fused add + norm), 64
a Llama-3.1-8B step. TensorRT-LLM's fused kernel, built by FlashInfer (`flashinfer.comm`,
`--enable-flashinfer-allreduce-fusion` in SGLang), does all three in one: each rank writes its rows into
every peer's buffer over CUDA IPC (one-shot, Lamport flags instead of a barrier; two-shot for larger
messages), and every rank sums them in rank order, adds the residual and normalizes in float32. It is
CUDA-graph capturable and launches with programmatic dependent launch.

Rows past `max_tokens` (long prefill chunks) take the unfused path (ops/parallel.TPGroup.all_reduce, then
the add + norm kernel); the caller checks `fits`. The IPC buffers live as long as the worker process
(freeing them is a collective, which a group that lost a rank cannot run). `flashinfer` is imported lazily.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from radixserve.errors import UnsupportedFeatureError

MAX_TOKENS = 2048  # rows the IPC workspace holds: every decode batch, short prefill chunks


class FusedAllReduceRMSNorm:
    """(norm(sum over ranks of x + residual) * weight, sum + residual) for [T <= max_tokens, hidden] x."""

    def __init__(
        self, group: dist.ProcessGroup, rank: int, world: int, hidden: int, dtype: torch.dtype,
        device: torch.device, max_tokens: int = MAX_TOKENS, pdl: bool = False,
    ) -> None:
        from flashinfer.comm import trtllm_ar

        if dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"the fused all-reduce takes bf16 or fp16 activations, not {dtype}")
        self._ar: Any = trtllm_ar
        self.rank, self.world = rank, world
        self.hidden, self.dtype, self.device = hidden, dtype, device
        self.max_tokens = max_tokens
        self.pdl = pdl
        with torch.cuda.device(device):
            self._ipc_handles, self._workspace = trtllm_ar.trtllm_create_ipc_workspace_for_all_reduce_fusion(
                rank, world, max_tokens, hidden, group=group)

    def fits(self, x: torch.Tensor, residual: torch.Tensor) -> bool:
        return (
            x.dim() == 2 and 0 < x.shape[0] <= self.max_tokens and x.shape[1] == self.hidden
            and x.dtype == residual.dtype == self.dtype and x.is_contiguous() and residual.is_contiguous()
            and residual.shape == x.shape
        )

    def __call__(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        norm_out, residual_out = torch.empty_like(x), torch.empty_like(residual)
        self._ar.trtllm_allreduce_fusion(
            allreduce_in=x, world_size=self.world, world_rank=self.rank, token_num=x.shape[0],
            hidden_dim=self.hidden, workspace_ptrs=self._workspace, launch_with_pdl=self.pdl,
            trigger_completion_at_end=True, fp32_acc=True,
            pattern_code=self._ar.AllReduceFusionPattern.kARResidualRMSNorm, use_oneshot=None,
            allreduce_out=None, residual_in=residual, residual_out=residual_out, norm_out=norm_out,
            quant_out=None, scale_out=None, rms_gamma=weight, rms_eps=eps, scale_factor=None,
            layout_code=None,
        )
        return norm_out, residual_out


def make_fused_all_reduce_norm(
    group: dist.ProcessGroup, rank: int, world: int, hidden: int, dtype: torch.dtype, device: torch.device,
    pdl: bool,
) -> FusedAllReduceRMSNorm:
    """The fused kernel for this TP group; a clear error where the platform cannot run it (asked for
    explicitly with --enable-flashinfer-allreduce-fusion, so no silent fallback)."""
    if device.type != "cuda":
        raise UnsupportedFeatureError("--enable-flashinfer-allreduce-fusion needs CUDA GPUs")
    peers = [r for r in range(torch.cuda.device_count()) if r != device.index]
    if not all(torch.cuda.can_device_access_peer(device.index, p) for p in peers):
        raise UnsupportedFeatureError(
            "--enable-flashinfer-allreduce-fusion needs peer access between the GPUs")
    try:  # NOTE: flashinfer.comm asserts at import that libcudart is loaded (it calls it through ctypes)
        import flashinfer.comm  # noqa: F401
    except (ImportError, AssertionError, OSError) as e:
        raise UnsupportedFeatureError(
            f"--enable-flashinfer-allreduce-fusion needs flashinfer.comm ({type(e).__name__}: {e})") from e
    return FusedAllReduceRMSNorm(group, rank, world, hidden, dtype, device, pdl=pdl)
