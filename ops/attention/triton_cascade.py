"""Cascade decode attention on the Triton kernels: the shared prefix read once per group of rows.

A CascadePlan (cascade.py, host) becomes CascadeTensors once per step: level 0's blocks of rows and each row's
first level-1 key, copied to the device in one non-blocking copy from pinned memory (a copy from pageable
memory would wait for the step in flight, the host gap FlashInfer's plan costs a large eager step). Each layer
then runs two or three kernels (triton_kernels.py): the prefix kernel over the blocks, split decode over each
row's own keys, and the reduce over both levels' splits. No merge kernel: both levels write partial results to
one workspace; when level 1 runs in one split, it reads level 0's partials and writes the output itself.

This is the FP8 pools' cascade on the GPU: FlashInfer's cascade runs both levels on FA2's prefill kernels,
which widen one-byte pages slowly (a 1,000-row shared-prefix step spent 24 ms of ~55 in them on an H200).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from radixserve.ops.attention.cascade import CascadePlan
from radixserve.ops.attention.triton_kernels import LOG2E, _prefix_split_kernel
from radixserve.ops.attention.triton_ops import (
    _check_pool,
    _dot_mode,
    check_workspace,
    decode_head_groups,
    decode_splits,
    decode_workspace,
    reduce_splits,
)

PREFIX_BLOCK_M = 64  # level-0 queries a program holds: 16 rows of a GQA-4 group (each prefix tile read once)
MAX_LEVEL_SPLITS = 4  # per level; the workspace is 2 * 4 splits wide, one reduce variant for every step
CASCADE_MIN_SPLIT_LEN = 128  # keys: no split shorter


@dataclass(frozen=True, slots=True)
class CascadeTensors:
    """One step's cascade plan on the device, and its grid sizes."""

    # [4, capacity] int32: first row, rows, the group's first row, prefix length; the first block_count
    # columns are the step's blocks
    blocks: torch.Tensor
    block_count: torch.Tensor  # [1] int32
    block_programs: int  # level-0 programs a kv head along the blocks (each takes every block_programs-th)
    kv_starts: torch.Tensor  # [B] int32: row b's first level-1 key (its group's prefix length)
    prefix_splits: int  # S0: level-0 splits of each block's prefix
    suffix_splits: int  # S1: level-1 splits of each row's own keys
    prefix_block_m: int  # level-0 queries a program holds (rows of a block x q heads per kv head)

    @property
    def num_splits(self) -> int:
        return self.prefix_splits + self.suffix_splits


def _splits(
    programs: int, longest: int, num_sms: int, min_split_len: int, max_splits: int, waves: int
) -> int:
    """About `waves` waves of programs over the SMs, no split shorter than min_split_len keys."""
    splits = triton.cdiv(waves * num_sms, max(programs, 1))
    return max(1, min(splits, triton.cdiv(longest, min_split_len), max_splits))


def check_block_m(prefix_block_m: int, group: int) -> int:
    """Rows a level-0 block holds: prefix_block_m queries of `group` q heads each."""
    if prefix_block_m < 16 or prefix_block_m & (prefix_block_m - 1):
        raise ValueError(f"prefix_block_m must be a power of two >= 16 (tl.dot's least M): {prefix_block_m}")
    if group > prefix_block_m:
        raise ValueError(f"cascade attention takes at most {prefix_block_m} q heads per kv head, not {group}")
    return prefix_block_m // group


def level0_blocks(
    plan: CascadePlan, rows_per_block: int
) -> tuple[list[int], list[int], list[int], list[int]]:
    """Each group cut into blocks of at most rows_per_block rows: (first row, rows, the group's first row,
    prefix length) of every block, as four columns."""
    firsts: list[int] = []
    counts: list[int] = []
    owners: list[int] = []
    lens: list[int] = []
    for g, prefix_len in enumerate(plan.prefix_lens):
        start, end = plan.group_starts[g], plan.group_starts[g + 1]
        for row0 in range(start, end, rows_per_block):
            firsts.append(row0)
            counts.append(min(rows_per_block, end - row0))
            owners.append(start)
            lens.append(prefix_len)
    return firsts, counts, owners, lens


def cascade_tensors(
    plan: CascadePlan, seq_lens: tuple[int, ...], num_q_heads: int, num_kv_heads: int, device: torch.device,
    *, num_sms: int, min_split_len: int = CASCADE_MIN_SPLIT_LEN, max_splits: int = MAX_LEVEL_SPLITS,
    prefix_block_m: int = PREFIX_BLOCK_M, prefix_waves: int = 2,
) -> CascadeTensors:
    """The step's CascadeTensors: each group cut into blocks of prefix_block_m // GQA rows; level 0 split
    over about `prefix_waves` waves of programs, level 1 over two (prefix_block_m and prefix_waves are for
    tuning: check_gpu_path --tune-cascade)."""
    rows_per_block = check_block_m(prefix_block_m, num_q_heads // num_kv_heads)
    firsts, counts, owners, lens = level0_blocks(plan, rows_per_block)
    host = [len(firsts)] + firsts + counts + owners + lens + list(plan.row_prefix_lens)
    packed = torch.tensor(host, dtype=torch.int32)
    if device.type == "cuda":  # the caching host allocator keeps the pinned block until the copy has run
        packed = packed.pin_memory().to(device, non_blocking=True)
    nb = len(firsts)
    _, head_programs = decode_head_groups(num_q_heads, num_kv_heads)
    suffix_lens = plan.suffix_lens(seq_lens)
    return CascadeTensors(
        blocks=packed[1 : 1 + 4 * nb].view(4, nb),
        block_count=packed[:1],
        block_programs=nb,
        kv_starts=packed[1 + 4 * nb :],
        prefix_splits=_splits(nb * num_kv_heads, max(plan.prefix_lens), num_sms, min_split_len, max_splits,
                              prefix_waves),
        suffix_splits=_splits(len(seq_lens) * head_programs, max(suffix_lens), num_sms, min_split_len,
                              max_splits, 2),
        prefix_block_m=prefix_block_m,
    )


def cascade_workspace(
    num_rows: int, num_q_heads: int, head_dim: int, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """A step's partial results: room for both levels' splits at most (see decode_workspace)."""
    return decode_workspace(num_rows, num_q_heads, head_dim, 2 * MAX_LEVEL_SPLITS, device)


def cascade_decode_attention(
    q: torch.Tensor,  # [B, Hq, d]: one query per row
    k_buf: torch.Tensor,  # [num_slots, Hkv, d]
    v_buf: torch.Tensor,
    req_to_token: torch.Tensor,  # [max_rows, max_context] int32
    req_rows: torch.Tensor,  # [B]
    seq_lens: torch.Tensor,  # [B]
    scale: float,
    cascade: CascadeTensors,
    *,
    min_split_len: int = CASCADE_MIN_SPLIT_LEN,
    workspace: tuple[torch.Tensor, torch.Tensor] | None = None,
    out: torch.Tensor | None = None,
    block_n: tuple[int, int] = (128, 32),  # level 0, level 1
    num_warps: tuple[int, int] = (4, 1),
    num_stages: tuple[int, int] = (2, 2),
    heads_fastest: bool = True,
    fuse_merge: bool = True,  # False: level 1 writes partials and the reduce kernel merges (for A/B)
    fp8_f16: bool | None = None,  # an FP8 pool's dots in fp16 (None: triton_ops.FP8_F16_DOTS)
) -> torch.Tensor:  # [B, Hq, d]
    """Decode attention of rows grouped by a shared prefix: level 0 per block of a group's rows, level 1 per
    row, reduced over both levels' splits. Writes out and the workspace. block_n, num_warps and num_stages
    are for tuning (benchmarks/check_gpu_path.py --tune-cascade). Level 1's small programs (32-key tiles, one
    warp) measured best on an H100 for own keys of 1 to 256 (session 8: 13.1 vs 14.7 ms for 128 keys and 4
    warps at the benchmark's shape): a row's few tiles leave little to pipeline, so what pays is programs
    resident at once (168 registers a thread: 12 one-warp programs an SM against 3 of four warps)."""
    _check_pool(q, k_buf, v_buf, req_to_token, req_rows, seq_lens)
    num_rows, num_q_heads, head_dim = q.shape
    if cascade.kv_starts.shape != (num_rows,):
        raise ValueError(f"the cascade plan has {cascade.kv_starts.shape[0]} rows, the step {num_rows}")
    s0, splits = cascade.prefix_splits, cascade.num_splits
    if workspace is None:
        workspace = decode_workspace(num_rows, num_q_heads, head_dim, splits, q.device)
    check_workspace(workspace, num_rows, num_q_heads, head_dim, splits)
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # contiguous, even for a strided q
    elif out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError(f"out {tuple(out.shape)} {out.dtype} does not match q {tuple(q.shape)} {q.dtype}")
    mid_o, mid_lse = workspace
    group = num_q_heads // k_buf.shape[1]
    upcast, f16, precision = _dot_mode(q.dtype, k_buf.dtype, fp8_f16)
    hkv, nb = k_buf.shape[1], cascade.block_programs
    _prefix_split_kernel[(hkv, nb, s0) if heads_fastest else (nb, hkv, s0)](
        q, k_buf, v_buf, req_to_token, req_rows, cascade.blocks, cascade.block_count, mid_o, mid_lse,
        scale * LOG2E,
        q.stride(0), q.stride(1), k_buf.stride(0), k_buf.stride(1), v_buf.stride(0), v_buf.stride(1),
        req_to_token.stride(0),
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0), mid_lse.stride(1),
        cascade.blocks.stride(0), s0,
        GROUP=group, HEAD_DIM=head_dim, BLOCK_M=cascade.prefix_block_m, BLOCK_N=block_n[0],
        BLOCK_D=triton.next_power_of_2(head_dim), HEADS_FASTEST=heads_fastest, UPCAST=upcast, F16=f16,
        PRECISION=precision,
        num_warps=num_warps[0], num_stages=num_stages[0],
    )  # fmt: skip
    # Level 1 in one split (the usual case: ~a thousand rows fill the GPU without splitting) merges level
    # 0's partials itself: no reduce kernel, and no partials of its own written and read back.
    merge = cascade.suffix_splits == 1 and fuse_merge
    decode_splits(q, k_buf, v_buf, req_to_token, req_rows, seq_lens, cascade.kv_starts, scale,
                  cascade.suffix_splits, s0, min_split_len, workspace, block_n[1], num_warps[1],
                  num_stages[1], heads_fastest, merge_into=out if merge else None, fp8_f16=fp8_f16)
    if not merge:
        reduce_splits(workspace, out, splits)
    return out
