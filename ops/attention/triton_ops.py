"""Launchers of the Triton attention kernels (ops/attention/triton_kernels.py): check shapes, dtypes and
strides, pick block sizes, size the grids from host ints. Nothing here reads a device value.
"""

from __future__ import annotations

import torch
import triton

from radixserve.ops.attention.triton_kernels import (
    LOG2E,
    MAX_HEAD_BLOCK,
    MIN_HEAD_BLOCK,
    _decode_reduce_kernel,
    _decode_split_kernel,
    _extend_kernel,
)
from radixserve.ops.kv_dtype import FP8_DTYPES
from radixserve.ops.triton_launch import interpreting


def decode_head_groups(num_q_heads: int, num_kv_heads: int) -> tuple[int, int]:
    """(q heads per decode program, programs per row along heads).

    A program takes the largest divisor of the GQA group that fits MAX_HEAD_BLOCK, so every KV tile it loads
    serves all its heads (GQA ratio 4: one program per kv head, 4 q heads each).
    """
    group = num_q_heads // num_kv_heads
    heads = max(h for h in range(1, min(group, MAX_HEAD_BLOCK) + 1) if group % h == 0)
    return heads, num_q_heads // heads


def decode_workspace(
    num_rows: int, num_q_heads: int, head_dim: int, max_splits: int, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fp32 scratch of split-KV decode: mid_o [rows, Hq, splits, d] and mid_lse [rows, Hq, splits]."""
    mid_o = torch.empty((num_rows, num_q_heads, max_splits, head_dim), dtype=torch.float32, device=device)
    mid_lse = torch.empty((num_rows, num_q_heads, max_splits), dtype=torch.float32, device=device)
    return mid_o, mid_lse


def decode_num_splits(
    num_rows: int, num_q_heads: int, num_kv_heads: int, num_sms: int, max_splits: int, min_split_len: int,
    max_seq_len: int | None,
) -> int:
    """Splits of the decode grid: about two waves of programs over the SMs, none shorter than min_split_len
    keys when max_seq_len is known. None: a CUDA-graph capture, where any length may come, so the grid
    depends on the batch size and head counts only (each row then uses min(splits, cdiv(seq_len,
    min_split_len)) of them on the device, and one graph serves every length)."""
    _, head_programs = decode_head_groups(num_q_heads, num_kv_heads)
    splits = triton.cdiv(2 * num_sms, max(num_rows * head_programs, 1))
    if max_seq_len is not None:
        splits = min(splits, triton.cdiv(max_seq_len, min_split_len))
    return max(1, min(splits, max_splits))


# The default of fp8_f16 (FP8 pools under bf16 queries: dots in fp16; _query_operand in triton_kernels.py).
# Measured on an H100 (session 9, check_gpu_path --fp8-f16-check): cascade decode at the shared-prefix
# benchmark's shape 11.3 vs 13.3 ms a 32-layer step, level 0 alone 6.0 vs 7.3; relative error against the
# float32 torch backend 1.7e-3 vs 2.2e-3 (fp16 rounds the probabilities finer than bf16).
FP8_F16_DOTS = True


def _dot_mode(
    q_dtype: torch.dtype, kv_dtype: torch.dtype, fp8_f16: bool | None = None
) -> tuple[bool, bool, str]:
    """(UPCAST, F16, PRECISION) of the kernels for these query and pool dtypes (K/V tiles are widened to the
    queries' operand type).

    The interpreter keeps bf16 as raw uint16 and its tl.dot would multiply the bit patterns, so there bf16
    tiles are upcast to fp32 first; compiled kernels keep 16-bit tiles for the tensor cores. fp32 uses exact
    "ieee" dots (the default tf32 would cost ~1e-3 relative error; fp32 KV is a testing configuration).
    F16: an FP8 pool under bf16 queries, with fp8_f16 (None: FP8_F16_DOTS), runs its dots in fp16.
    """
    f16 = (FP8_F16_DOTS if fp8_f16 is None else fp8_f16) and kv_dtype.itemsize == 1
    f16 = f16 and q_dtype == torch.bfloat16
    upcast = q_dtype == torch.bfloat16 and interpreting()
    return upcast, f16, "ieee" if upcast or q_dtype == torch.float32 else "tf32"


def _check_pool(
    q: torch.Tensor,
    k_buf: torch.Tensor,
    v_buf: torch.Tensor,
    req_to_token: torch.Tensor,
    req_rows: torch.Tensor,
    seq_lens: torch.Tensor,
) -> None:
    if q.dim() != 3 or k_buf.dim() != 3 or v_buf.shape != k_buf.shape:
        raise ValueError(
            f"q {tuple(q.shape)} must be [T, Hq, d], the KV buffers {tuple(k_buf.shape)} / "
            f"{tuple(v_buf.shape)} [num_slots, Hkv, d]"
        )
    if q.shape[2] != k_buf.shape[2] or q.shape[1] % k_buf.shape[1]:
        raise ValueError(
            f"q {tuple(q.shape)} does not fit the KV buffers {tuple(k_buf.shape)}: same head_dim, "
            "and q heads a multiple of kv heads"
        )
    if k_buf.dtype != v_buf.dtype or (k_buf.dtype != q.dtype and k_buf.dtype not in FP8_DTYPES):
        raise ValueError(f"q, k_buf, v_buf dtypes do not fit (the pool: q's dtype or FP8): "
                         f"{q.dtype}, {k_buf.dtype}, {v_buf.dtype}")
    if q.stride(-1) != 1 or k_buf.stride(-1) != 1 or v_buf.stride(-1) != 1:
        raise ValueError("q and the KV buffers need unit stride in head_dim")
    if req_to_token.dim() != 2 or req_to_token.dtype != torch.int32 or req_to_token.stride(1) != 1:
        raise ValueError(
            f"req_to_token must be [rows, context] int32 with unit column stride, got "
            f"{tuple(req_to_token.shape)} {req_to_token.dtype} strides {req_to_token.stride()}"
        )
    b = req_rows.shape[0]
    for name, t in (("req_rows", req_rows), ("seq_lens", seq_lens)):
        if t.shape != (b,) or not t.is_contiguous() or t.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name} must be contiguous [{b}] int32/int64, got {tuple(t.shape)} {t.dtype}")


def decode_attention(
    q: torch.Tensor,  # [B, Hq, d]: one query per row, row b at index b
    k_buf: torch.Tensor,  # [num_slots, Hkv, d]
    v_buf: torch.Tensor,  # [num_slots, Hkv, d]
    req_to_token: torch.Tensor,  # [max_rows, max_context] int32
    req_rows: torch.Tensor,  # [B]
    seq_lens: torch.Tensor,  # [B] keys of each row, the new token's included
    scale: float,
    num_splits: int,
    *,
    min_split_len: int = 1,
    workspace: tuple[torch.Tensor, torch.Tensor] | None = None,
    out: torch.Tensor | None = None,
    block_n: int = 64,
    pdl: bool = False,
) -> torch.Tensor:  # [B, Hq, d]
    """Split-KV decode. The grid is (B, head programs, num_splits); a row uses at most
    cdiv(seq_len, min_split_len) of the splits. `workspace` (see decode_workspace) may be larger than needed:
    its split width, not num_splits, fixes the reduce kernel's compiled variant. Writes out and the workspace.
    pdl: both kernels launch with programmatic dependent launch (ops/triton_launch.py).
    """
    _check_pool(q, k_buf, v_buf, req_to_token, req_rows, seq_lens)
    num_rows, num_q_heads, head_dim = q.shape
    if num_rows != req_rows.shape[0]:
        raise ValueError(f"decode takes one query per row: {num_rows} queries for {req_rows.shape[0]} rows")
    if num_splits < 1 or min_split_len < 1:
        raise ValueError(f"num_splits ({num_splits}) and min_split_len ({min_split_len}) must be >= 1")
    if workspace is None:
        workspace = decode_workspace(num_rows, num_q_heads, head_dim, num_splits, q.device)
    check_workspace(workspace, num_rows, num_q_heads, head_dim, num_splits)
    if out is None:
        out = torch.empty((num_rows, num_q_heads, head_dim), dtype=q.dtype, device=q.device)
    elif out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError(f"out {tuple(out.shape)} {out.dtype} does not match q {tuple(q.shape)} {q.dtype}")
    if num_rows == 0:
        return out

    decode_splits(q, k_buf, v_buf, req_to_token, req_rows, seq_lens, None, scale, num_splits, 0,
                  min_split_len, workspace, block_n, pdl=pdl)
    reduce_splits(workspace, out, num_splits, pdl=pdl)
    return out


def check_workspace(
    workspace: tuple[torch.Tensor, torch.Tensor], num_rows: int, num_q_heads: int, head_dim: int, splits: int
) -> None:
    mid_o, mid_lse = workspace
    if (
        mid_o.shape[0] < num_rows
        or mid_o.shape[1:] != (num_q_heads, mid_o.shape[2], head_dim)
        or mid_o.shape[2] < splits
        or mid_lse.shape != mid_o.shape[:3]
        or mid_o.stride(-1) != 1
        or mid_lse.stride(-1) != 1
        or mid_o.dtype != torch.float32
        or mid_lse.dtype != torch.float32
    ):
        raise ValueError(
            f"workspace {tuple(mid_o.shape)} / {tuple(mid_lse.shape)} does not fit {num_rows} rows, "
            f"{num_q_heads} heads, {splits} splits, head_dim {head_dim}"
        )


def decode_splits(
    q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, req_to_token: torch.Tensor,
    req_rows: torch.Tensor, seq_lens: torch.Tensor, kv_starts: torch.Tensor | None, scale: float,
    num_splits: int, split_base: int, min_split_len: int, workspace: tuple[torch.Tensor, torch.Tensor],
    block_n: int, num_warps: int = 4, num_stages: int = 2, heads_fastest: bool = False,
    merge_into: torch.Tensor | None = None, fp8_f16: bool | None = None, pdl: bool = False,
) -> None:
    """Stage 1 of decode: row b's keys kv_starts[b] (0 when None) .. seq_lens[b]-1 into workspace splits
    split_base .. split_base + num_splits - 1. Inputs already checked.

    merge_into (cascade level 1 in one split): instead, merge the row's keys with workspace splits
    0 .. split_base-1 (level 0's) and write the output there; no reduce follows."""
    mid_o, mid_lse = workspace
    if merge_into is not None and num_splits != 1:
        raise ValueError(f"merging into the output takes one split per row, not {num_splits}")
    out = mid_o if merge_into is None else merge_into  # unused by the kernel when not merging
    heads, head_programs = decode_head_groups(q.shape[1], k_buf.shape[1])
    upcast, f16, precision = _dot_mode(q.dtype, k_buf.dtype, fp8_f16)
    rows = q.shape[0]
    grid = (head_programs, rows, num_splits) if heads_fastest else (rows, head_programs, num_splits)
    _decode_split_kernel[grid](
        q, k_buf, v_buf, req_to_token, req_rows, seq_lens, seq_lens if kv_starts is None else kv_starts,
        mid_o, mid_lse, out,
        scale * LOG2E,
        q.stride(0), q.stride(1), k_buf.stride(0), k_buf.stride(1), v_buf.stride(0), v_buf.stride(1),
        req_to_token.stride(0),
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0), mid_lse.stride(1),
        out.stride(0), out.stride(1),
        num_splits, min_split_len, split_base,
        GROUP=q.shape[1] // k_buf.shape[1], HEADS=heads, HEAD_DIM=q.shape[2],
        BLOCK_H=max(MIN_HEAD_BLOCK, triton.next_power_of_2(heads)), BLOCK_N=block_n,
        BLOCK_D=triton.next_power_of_2(q.shape[2]), HAS_START=kv_starts is not None,
        MERGE=merge_into is not None, HEADS_FASTEST=heads_fastest, UPCAST=upcast, F16=f16,
        PRECISION=precision, PDL=pdl, num_warps=num_warps, num_stages=num_stages, launch_pdl=pdl,
    )  # fmt: skip


def reduce_splits(
    workspace: tuple[torch.Tensor, torch.Tensor], out: torch.Tensor, num_splits: int, pdl: bool = False
) -> None:
    """Stage 2 of decode: out[b, h] = the lse-weighted sum of splits 0 .. num_splits-1 of row b, head h. The
    workspace's split width, not num_splits, fixes the compiled variant (one per width)."""
    mid_o, mid_lse = workspace
    _decode_reduce_kernel[(out.shape[0], out.shape[1])](
        mid_o, mid_lse, out,
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0), mid_lse.stride(1),
        out.stride(0), out.stride(1),
        num_splits,
        HEAD_DIM=out.shape[2], BLOCK_S=triton.next_power_of_2(mid_o.shape[2]),
        BLOCK_D=triton.next_power_of_2(out.shape[2]), PDL=pdl, num_warps=4, launch_pdl=pdl,
    )  # fmt: skip


def extend_attention(
    q: torch.Tensor,  # [T, Hq, d], rows one after another
    k_buf: torch.Tensor,  # [num_slots, Hkv, d], the new tokens' K/V already stored
    v_buf: torch.Tensor,
    req_to_token: torch.Tensor,  # [max_rows, max_context] int32
    req_rows: torch.Tensor,  # [B]
    seq_lens: torch.Tensor,  # [B] keys of each row after this step
    extend_lens: torch.Tensor,  # [B] new tokens of each row
    extend_starts: torch.Tensor,  # [B] index in q of each row's first new token
    scale: float,
    max_extend_len: int,  # host int >= every extend_len: sizes the grid
    *,
    out: torch.Tensor | None = None,
    block_m: int = 64,
    block_n: int = 64,
) -> torch.Tensor:  # [T, Hq, d]
    """Causal attention of each row's new queries over its cached prefix and its new tokens."""
    _check_pool(q, k_buf, v_buf, req_to_token, req_rows, seq_lens)
    num_rows = req_rows.shape[0]
    for name, t in (("extend_lens", extend_lens), ("extend_starts", extend_starts)):
        if t.shape != (num_rows,) or not t.is_contiguous() or t.dtype not in (torch.int32, torch.int64):
            raise ValueError(
                f"{name} must be contiguous [{num_rows}] int32/int64, {tuple(t.shape)} {t.dtype}"
            )
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    elif out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError(f"out {tuple(out.shape)} {out.dtype} does not match q {tuple(q.shape)} {q.dtype}")
    if num_rows == 0 or max_extend_len <= 0:
        return out

    num_q_heads, head_dim = q.shape[1], q.shape[2]
    block_d = triton.next_power_of_2(head_dim)
    if block_d > 128:  # keep the [BLOCK_M, d] and [BLOCK_N, d] tiles within registers / shared memory
        block_m, block_n = min(block_m, 32), min(block_n, 32)
    upcast, f16, precision = _dot_mode(q.dtype, k_buf.dtype)
    _extend_kernel[(num_rows, num_q_heads, triton.cdiv(max_extend_len, block_m))](
        q, k_buf, v_buf, out, req_to_token, req_rows, seq_lens, extend_lens, extend_starts,
        scale * LOG2E,
        q.stride(0), q.stride(1), k_buf.stride(0), k_buf.stride(1), v_buf.stride(0), v_buf.stride(1),
        req_to_token.stride(0), out.stride(0), out.stride(1),
        GROUP=num_q_heads // k_buf.shape[1], HEAD_DIM=head_dim,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        UPCAST=upcast, F16=f16, PRECISION=precision, num_warps=4 if block_d <= 64 else 8, num_stages=2,
    )  # fmt: skip
    return out
