"""Triton cascade decode in a CUDA graph: fixed grids, the step's plan in static buffers.

A captured graph replays its kernels with the arguments they had at capture, grid sizes included, so a
graph-shaped cascade sizes everything for the worst case of `max_rows` rows once:

    level 0  room for max_rows blocks (a block holds at least one row), one split each, and a fixed grid of
             about LEVEL0_WAVES waves of programs, each taking the blocks in turn up to the count the plan
             buffer holds (session 9: a program for each of the max_rows possible blocks, nearly all of them
             empty, cost ~1.2 ms of a 1,000-row step's 7 ms of level 0 on an H100)
    level 1  max_rows rows, one split, merging level 0's partial itself (no reduce kernel)

and each step's plan is copied into the same buffers before the replay. Rows past the step's (a graph's
padding rows) get blocks with a prefix of 0 keys, so their level-0 partial is empty (weight 0) rather than
whatever an earlier step left in the workspace.

Where this pays: eager 1,000-row cascade steps are paced by the host's ~500 launches (session 8 on an H100:
~36-41 ms of host time a step against a ~44 ms device period); replayed, the host does one copy.
"""

from __future__ import annotations

import numpy as np
import torch

from radixserve.ops.attention.cascade import CascadePlan
from radixserve.ops.attention.triton_cascade import (
    PREFIX_BLOCK_M,
    CascadeTensors,
    check_block_m,
    level0_blocks,
)
from radixserve.ops.attention.triton_ops import decode_workspace

LEVEL0_WAVES = 2  # level-0 programs in a graph: about this many waves over the SMs (two fit an SM at once)


class GraphCascade:
    """Static plan buffers and workspace for cascade decode of up to `max_rows` rows (one CUDA-graph size)."""

    def __init__(
        self, max_rows: int, num_q_heads: int, num_kv_heads: int, head_dim: int, device: torch.device,
        num_sms: int, prefix_block_m: int = PREFIX_BLOCK_M,
    ) -> None:
        self.max_rows = max_rows
        self.rows_per_block = check_block_m(prefix_block_m, num_q_heads // num_kv_heads)
        self.device = device
        # the block count, [4, max_rows] blocks (first row, rows, the group's first row, prefix length), then
        # [max_rows] kv_starts: one buffer, so one copy a step
        n = max_rows
        self.buffer = torch.zeros(1 + 5 * n, dtype=torch.int32, device=device)
        self.tensors = CascadeTensors(
            blocks=self.buffer[1 : 1 + 4 * n].view(4, n), block_count=self.buffer[:1],
            block_programs=min(n, -(-LEVEL0_WAVES * num_sms // num_kv_heads)),
            kv_starts=self.buffer[1 + 4 * n :], prefix_splits=1, suffix_splits=1,
            prefix_block_m=prefix_block_m,
        )
        # both levels' split columns (level 1 merges instead of writing its own: the second stays unused)
        self.workspace = decode_workspace(max_rows, num_q_heads, head_dim, 2, device)

    def host_plan(self, plan: CascadePlan | None, num_rows: int) -> np.ndarray:
        """The buffer's contents for a step of num_rows rows (the rest padding) planned as `plan` (None with
        num_rows 0: every row padding, as at capture)."""
        planned = len(plan.row_prefix_lens) if plan is not None else 0
        if planned != num_rows or not 0 <= num_rows <= self.max_rows:
            raise ValueError(
                f"a plan for {planned} rows, a step of {num_rows} rows, a graph of {self.max_rows}")
        blocks = ([], [], [], []) if plan is None else level0_blocks(plan, self.rows_per_block)
        firsts, counts, owners, lens = blocks
        for row0 in range(num_rows, self.max_rows, self.rows_per_block):  # padding rows: empty prefixes
            firsts.append(row0)
            counts.append(min(self.rows_per_block, self.max_rows - row0))
            owners.append(row0)
            lens.append(0)
        n, nb = self.max_rows, len(firsts)
        assert nb <= n, "a block holds at least one row"
        host = np.zeros(1 + 5 * n, dtype=np.int32)
        host[0] = nb
        for k, column in enumerate((firsts, counts, owners, lens)):
            host[1 + k * n : 1 + k * n + nb] = column
        if plan is not None:
            host[1 + 4 * n : 1 + 4 * n + num_rows] = plan.row_prefix_lens
        return host

    def load_padding(self) -> None:
        """Every row a padding row (a CUDA-graph capture's batch)."""
        self.load(None, 0)

    def load(self, plan: CascadePlan | None, num_rows: int) -> None:
        """Copy a step's plan into the buffers: one copy, stream-ordered before the graph's replay (from
        pinned memory on a GPU, so the host does not wait for the step in flight)."""
        host = torch.from_numpy(self.host_plan(plan, num_rows))
        if self.device.type == "cuda":  # the caching allocator keeps the pinned block until the copy has run
            host = host.pin_memory()
        self.buffer.copy_(host, non_blocking=self.device.type == "cuda")
