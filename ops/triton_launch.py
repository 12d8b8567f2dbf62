"""How radixserve's Triton kernels are launched: compiled or in the CPU interpreter, and with programmatic
dependent launch (PDL, Hopper and later).

A batch-1 decode step is ~330 small kernels in one CUDA graph, and the GPU idles ~1.5 us between each pair
while the next grid is launched. A kernel launched with PDL (`launch_pdl=True`) may be scheduled while the
kernel before it is still running; it must then execute `griddepcontrol.wait` (Triton's `gdc_wait`) before it
reads or writes anything another kernel touches, which blocks until the previous grid has completed and its
writes are visible. Our kernels wait first thing, before any load or store, then let their own dependents
launch (`gdc_launch_dependents`): what overlaps is launch and scheduling, never memory traffic. (Session 11
tried more: the skinny GEMMs asked the L2 for the first 16 MB of their weights before the wait, and the fused
all-reduce let them launch as it started. Batch-1 decode on H200s got slower, TP1 4.27 -> 4.34 ms a token,
TP2 2.71 -> 2.81, so it was taken out.)

Safety in a chain mixing PDL and ordinary launches (cuBLAS, torch, FlashInfer's merge): an ordinary launch
is fully serialized behind its predecessor, and a PDL kernel that waits cannot complete before its own
predecessor has, so the order of completions is the stream order. The wait sits before every loop: Triton's
software pipeliner may hoist loads out of a loop above a wait inside it.

RADIXSERVE_DISABLE_PDL=1 turns it off (for A/B measurements).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

DISABLE_ENV = "RADIXSERVE_DISABLE_PDL"


def interpreting() -> bool:
    """Whether Triton runs kernels in its numpy interpreter (TRITON_INTERPRET=1) instead of compiling them."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@functools.cache
def _capability_major(index: int) -> int:
    """A device's compute capability never changes: asked once, not at every launch of an eager step."""
    return torch.cuda.get_device_capability(index)[0]


def pdl_enabled(device: torch.device) -> bool:
    """Whether kernels on `device` are launched with PDL: compute capability 9.0+, compiled (not the CPU
    interpreter), and not switched off through the environment."""
    if device.type != "cuda" or os.environ.get(DISABLE_ENV, "0") == "1" or interpreting():
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _capability_major(index) >= 9


@triton.jit
def wait_for_predecessor(PDL: tl.constexpr):  # type: ignore[no-untyped-def]
    """Call first in a kernel launched with launch_pdl=PDL: the previous grid's writes are visible after it,
    and the next grid may start launching."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
