"""One-shot all-reduce over torch symmetric memory, for the small tensors of decode steps.

A TP decode step all-reduces two [batch, hidden] activations per layer: 8 KiB at batch 1 for Llama-3.1-8B.
NCCL's ring spends ~10-20 us on each, 0.6-1.3 ms a step over 64 of them, which is a third of a TP=2
batch-1 step. Here every rank copies its tensor into a buffer that all ranks of the group have mapped
(peer-to-peer over NVLink), meets the others at a barrier, and reads all ranks' buffers itself: one kernel,
one barrier round, a few microseconds. torch's kernel (`symm_mem.one_shot_all_reduce*`) sums in rank order
on every rank, so all ranks hold bitwise-equal results, which the workers rely on to sample the same tokens.
It is CUDA-graph capturable. Multicast (NVLS) is neither needed nor used.

Larger tensors (prefill) go to NCCL: one-shot reads world_size x the data over the links, a ring 2x.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

# Largest tensor sent one-shot, by world size: each rank reads (world - 1) peers' copies, so the crossover
# with NCCL's ring falls as the group grows. benchmarks/bench_all_reduce.py on 4x H200 (2026-11-27): one-shot
# still ahead at 4 MiB with 2 ranks and at 2 MiB with 4 (NCCL ahead at 4 MiB); these limits stay below that.
# 8 ranks: not measured.
ONE_SHOT_MAX_BYTES = {2: 2 << 20, 4: 1 << 20, 8: 512 << 10}
_ALIGN = 16  # bytes: the kernel's widest vector; smaller alignments work but are slower


class OneShotAllReduce:
    """All-reduce (sum) of small contiguous tensors of one dtype through a rendezvoused symmetric buffer."""

    def __init__(
        self, group: dist.ProcessGroup, device: torch.device, dtype: torch.dtype, max_bytes: int
    ) -> None:
        import torch.distributed._symmetric_memory as symm_mem

        self.dtype = dtype
        self.max_bytes = max_bytes
        self.group_name = group.group_name
        self.buffer = symm_mem.empty(max_bytes // dtype.itemsize, dtype=dtype, device=device)
        self.handle = symm_mem.rendezvous(self.buffer, self.group_name)
        ops = torch.ops.symm_mem
        # NOTE: the copy variant stages the local input inside the kernel (one launch instead of two).
        self._copy_out = getattr(ops, "one_shot_all_reduce_copy_out", None)
        self._out = ops.one_shot_all_reduce_out

    def fits(self, x: torch.Tensor) -> bool:
        nbytes = x.numel() * x.element_size()
        fits = 0 < nbytes <= self.max_bytes and nbytes % _ALIGN == 0
        return fits and x.dtype == self.dtype and x.is_contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x summed over the ranks, in place. The caller checked `fits(x)`."""
        flat = x.view(-1)
        staged = self.buffer[: flat.numel()]
        if self._copy_out is not None:
            self._copy_out(staged, flat, "sum", self.group_name, flat)
        else:
            staged.copy_(flat)
            self._out(staged, "sum", self.group_name, flat)
        return x


def make_one_shot_all_reduce(
    group: dist.ProcessGroup, device: torch.device, dtype: torch.dtype
) -> OneShotAllReduce | None:
    """The one-shot path for this group, or None (NCCL for everything) where the platform lacks it: no
    symmetric memory in this torch, no peer access between the GPUs, or a world size without a threshold."""
    world = group.size()
    max_bytes = ONE_SHOT_MAX_BYTES.get(world)
    if max_bytes is None or device.type != "cuda" or dtype not in (torch.bfloat16, torch.float32):
        return None
    peers = [r for r in range(torch.cuda.device_count()) if r != device.index]
    if not all(torch.cuda.can_device_access_peer(device.index, p) for p in peers):
        log.warning("GPUs without peer access: tensor-parallel all-reduce stays on NCCL")
        return None
    try:
        return OneShotAllReduce(group, device, dtype, max_bytes)
    except (ImportError, AttributeError, RuntimeError) as e:
        log.warning("no symmetric-memory all-reduce (%s): tensor-parallel all-reduce stays on NCCL", e)
        return None
