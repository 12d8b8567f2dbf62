"""The token-level KV pool, split along the actor boundary.

Scheduler side: `SlotAllocator` hands out slot ids (one slot holds one token's K and V in every layer).
Worker side: `KVCache` owns the per-layer K/V tensors and `ReqToTokenTable` the slot ids of every running
request's tokens. The two sides share nothing but slot ids, which travel in step plans.

Slot 0 is the padding slot: never handed out, so padded rows (CUDA-graph batch padding) may write it freely.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from radixserve.ops.kv_dtype import to_kv


class SlotAllocator:
    """Free list of KV slot ids 1..num_slots-1.

    Mutates only its own free list. Callers own the slots they were given until they free them; freeing a
    slot twice or freeing slot 0 is a bug that `check_integrity` (and `free` in debug) catches.
    """

    def __init__(self, num_slots: int) -> None:
        if num_slots < 2:
            raise ValueError(f"a KV pool needs at least 2 slots (slot 0 is padding), got {num_slots}")
        self.num_slots = num_slots
        # A stack: alloc pops from the end, free pushes; the lowest ids come out first.
        self._free: list[int] = list(range(num_slots - 1, 0, -1))

    @property
    def total_size(self) -> int:
        return self.num_slots - 1

    @property
    def available_size(self) -> int:
        return len(self._free)

    def alloc(self, n: int) -> np.ndarray | None:
        """n slot ids as int32, or None (and nothing taken) when fewer than n are free."""
        if n > len(self._free):
            return None
        if n == 0:
            return np.empty(0, dtype=np.int32)
        taken = self._free[-n:]
        del self._free[-n:]
        return np.asarray(taken[::-1], dtype=np.int32)

    def free(self, slots: np.ndarray | Sequence[int]) -> None:
        if len(slots) == 0:
            return
        self._free.extend(int(s) for s in slots)

    def reset(self) -> None:
        self._free = list(range(self.num_slots - 1, 0, -1))

    def check_integrity(self) -> None:
        """Raise when a slot is free twice or out of range."""
        free = np.asarray(self._free, dtype=np.int64)
        if len(np.unique(free)) != len(free):
            raise AssertionError("SlotAllocator: a slot is on the free list twice")
        if len(free) and (free.min() < 1 or free.max() >= self.num_slots):
            raise AssertionError("SlotAllocator: a free slot id is out of range")


class KVCache:
    """Per-layer K and V tensors, each [num_slots, num_kv_heads, head_dim]. Worker side."""

    def __init__(
        self,
        num_layers: int,
        num_slots: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        shape = (num_slots, num_kv_heads, head_dim)
        self.num_slots = num_slots
        self.k_buffers = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v_buffers = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    @staticmethod
    def bytes_per_slot(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    def store(self, layer_id: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write k, v ([T, kv_heads, head_dim]) into `slots` ([T] int64) of one layer (saturating into
        FP8)."""
        self.k_buffers[layer_id][slots] = to_kv(k, self.k_buffers[layer_id].dtype)
        self.v_buffers[layer_id][slots] = to_kv(v, self.v_buffers[layer_id].dtype)


class ReqToTokenTable:
    """Slot ids of each running request's tokens: row r, column p = slot of token p. Worker side.

    Rows are handed out by the scheduler (a request keeps its row while it runs); entries past a row's
    sequence length are stale and never read.
    """

    # Columns are padded to a multiple of this: Triton specializes kernels on strides divisible by 16, and the
    # attention backends warm their kernels up at start-up on a table with such a row stride. A table of
    # context_length + 1 columns compiled three cascade kernels again in the middle of a run (~4 s of
    # stalled steps on an H100).
    COLUMN_ALIGN = 16

    def __init__(self, max_rows: int, max_context: int, device: torch.device | str) -> None:
        self.max_rows = max_rows
        self.max_context = max_context
        columns = -(-max_context // self.COLUMN_ALIGN) * self.COLUMN_ALIGN
        self.table = torch.zeros((max_rows, columns), dtype=torch.int32, device=device)

    def write(self, rows: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor) -> None:
        """table[rows[i], positions[i]] = slots[i] for every i (one scatter for a whole step)."""
        self.table[rows, positions] = slots.to(torch.int32)
