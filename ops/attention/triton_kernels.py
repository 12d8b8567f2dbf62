"""Triton attention over the token-level KV pool: split-KV decode (flash-decoding) and extend (prefill with a
cached prefix). Both read every key and value through req_to_token, one slot per token:

    row b:  keys k_buf[req_to_token[req_rows[b], 0 : seq_lens[b]]]   (k_buf: [num_slots, kv_heads, d])

Decode, two kernels (grid sizes are host ints, so both are CUDA-graph safe):

    stage 1, grid (B, head_blocks, num_splits):  one program = one row x a group of q heads that share one kv
             head x one chunk of the row's keys. Partial output (already divided by its softmax sum) and its
             log-sum-exp go to the fp32 workspace mid_o [B, Hq, S, d], mid_lse [B, Hq, S].
    stage 2, grid (B, Hq):  out = sum_s exp(lse_s - max) * o_s / sum_s exp(lse_s - max)

    Each row uses min(num_splits, cdiv(seq_len, min_split_len)) of the splits, decided on the device, so short
    rows of a mixed batch are not cut into slivers; unused splits write lse = -inf and weigh nothing.

Cascade decode (ops/attention/cascade.py, rows sharing a cached prefix) fills the same workspace from two
kernels, then runs the same reduce over all S0 + S1 splits:

    level 0, grid (blocks, Hkv, S0):  one program = the queries of up to BLOCK_M // GROUP rows of a group (all
             q heads of one kv head) x one chunk of the group's prefix: splits 0 .. S0-1
    level 1, the decode kernel from each row's kv_start (where its group's prefix ends): splits S0 .. S0+S1-1;
             in one split (S1 = 1) it merges level 0's splits itself and writes the output (no reduce)

Extend, grid (B, Hq, cdiv(max_extend_len, BLOCK_M)): one program = BLOCK_M new queries of one row and head,
an online softmax over keys 0 .. prefix_len + last query, causal within the new tokens:

    keys:          0 ......... prefix_len-1 | prefix_len ......... seq_len-1
    query i sees:  x ......... x            | x ... x (up to prefix_len + i)

Scores are kept in base 2: q.k * scale * log2(e), then exp2, which is what the hardware computes natively.
All accumulation is fp32; head_dim need not be a power of two (it is padded to one and masked).
"""

from __future__ import annotations

import math

import triton
import triton.language as tl

from radixserve.ops.triton_launch import wait_for_predecessor

LOG2E = math.log2(math.e)
MIN_HEAD_BLOCK = 16  # tl.dot needs at least 16 rows: a head group is padded up to this
MAX_HEAD_BLOCK = 16  # q heads sharing one kv head that one decode program handles at most


@triton.jit
def _attend_keys(
    q, table, start, end, KBuf, VBuf, kv_head,
    stride_ks, stride_kh, stride_vs, stride_vh, qk_scale,
    M: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """Online softmax of the queries q [M, BLOCK_D] over keys start .. end-1 of one kv head (slots from
    `table`), unmasked: (m_i, l_i, acc) in base 2, acc not yet divided by l_i (l_i = 0 when there are no
    keys)."""
    m_i = tl.full([M], float("-inf"), tl.float32)
    l_i = tl.zeros([M], tl.float32)
    acc = tl.zeros([M, BLOCK_D], tl.float32)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < end
        # int64: slot * slot_stride passes 2**31 in large pools.
        slots = tl.load(table + offs_n, mask=mask_n, other=0).to(tl.int64)
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(KBuf + slots[:, None] * stride_ks + kv_head * stride_kh + offs_d[None, :], mask=kv_mask,
                    other=0.0)
        v = tl.load(VBuf + slots[:, None] * stride_vs + kv_head * stride_vh + offs_d[None, :], mask=kv_mask,
                    other=0.0)
        # Widened to q's type (fp16 under F16): a no-op for a pool of the model's dtype, the dequantization
        # of an FP8 one.
        k = k.to(q.dtype)
        v = v.to(q.dtype)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [M, BLOCK_N]
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: the chunk's first key is always valid
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    return m_i, l_i, acc


@triton.jit
def _query_operand(q, qk_scale, UPCAST: tl.constexpr, F16: tl.constexpr):
    """The queries as the dots' left operand, and the scale the scores still need. F16 (an FP8 pool under
    bf16 queries): e4m3 tiles widen to fp16 in one instruction per pair (to bf16 in several), so the dots
    run in fp16, q pre-scaled (its range: |q| * scale past 65504 would need |q| > 5e5) and clamped."""
    if UPCAST:
        q = q.to(tl.float32)
    if F16:
        q = tl.clamp(q.to(tl.float32) * qk_scale, -65504.0, 65504.0).to(tl.float16)
        qk_scale = 1.0
    return q, qk_scale


@triton.jit
def _store_partial(
    MidO, MidLse, rows, heads, mask, slot, m_i, l_i, acc,
    stride_mo_b, stride_mo_h, stride_mo_s, stride_ml_b, stride_ml_h,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """One split's partial result of queries (rows, heads) [M]: o = acc / l and its base-2 lse, at `slot`.
    An empty split (no keys: a short row) stores o = 0, lse = -inf, which weighs nothing in the reduce."""
    offs_d = tl.arange(0, BLOCK_D)
    nonempty = l_i > 0
    l_safe = tl.where(nonempty, l_i, 1.0)
    lse = tl.where(nonempty, m_i + tl.log2(l_safe), float("-inf"))
    rows = rows.to(tl.int64)
    heads = heads.to(tl.int64)
    mo_ptrs = MidO + rows[:, None] * stride_mo_b + heads[:, None] * stride_mo_h + slot * stride_mo_s
    o_mask = mask[:, None] & (offs_d < HEAD_DIM)[None, :]
    tl.store(mo_ptrs + offs_d[None, :], acc / l_safe[:, None], mask=o_mask)
    tl.store(MidLse + rows * stride_ml_b + heads * stride_ml_h + slot, lse, mask=mask)


@triton.jit
def _fold_split(m_i, l_i, acc, lse, o):
    """The running state (m_i, l_i, acc) with one more split's result (normalized o [M, BLOCK_D], its
    base-2 lse [M]) folded in, as if it were one more block of keys. lse = -inf (no keys) weighs nothing."""
    m_new = tl.maximum(m_i, lse)
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # both empty: no inf - inf
    alpha = tl.exp2(m_i - m_ref)
    beta = tl.exp2(lse - m_ref)
    return m_new, l_i * alpha + beta, acc * alpha[:, None] + o * beta[:, None]


# Split counts vary from step to step: not specializing on them (Triton specializes ints equal to 1 or
# divisible by 16) keeps one compiled variant, so no compile can fall inside a CUDA-graph capture. The
# table's row stride stays specialized (divisible by 16, ReqToTokenTable pads its rows: aligned slot loads),
# and the start-up warm-up compiles that variant.
@triton.jit(do_not_specialize=["num_splits", "min_split_len", "split_base"])
def _decode_split_kernel(
    Q, KBuf, VBuf, ReqToToken, ReqRows, SeqLens, KvStarts, MidO, MidLse, Out,
    qk_scale,
    stride_qt, stride_qh, stride_ks, stride_kh, stride_vs, stride_vh, stride_rt,
    stride_mo_b, stride_mo_h, stride_mo_s, stride_ml_b, stride_ml_h, stride_ot, stride_oh,
    num_splits, min_split_len, split_base,
    GROUP: tl.constexpr, HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_START: tl.constexpr, MERGE: tl.constexpr, HEADS_FASTEST: tl.constexpr, UPCAST: tl.constexpr,
    F16: tl.constexpr, PRECISION: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    wait_for_predecessor(PDL)
    # MERGE (cascade level 1 in one split, num_splits == 1): the row's keys are all in this program, so it
    # folds in level 0's splits 0 .. split_base-1 from the workspace and writes the final output to Out,
    # instead of a partial for the reduce kernel.
    # HEADS_FASTEST: grid (head programs, B, splits), so the programs of one row's kv heads run side by side
    # and read each token's K/V (all kv heads contiguous) at about the same time; else grid (B, ...).
    b = tl.program_id(1 if HEADS_FASTEST else 0)
    head0 = tl.program_id(0 if HEADS_FASTEST else 1) * HEADS  # HEADS q heads, all of one kv head's group
    split = tl.program_id(2)
    kv_head = head0 // GROUP
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask_h = offs_h < HEADS
    mask_d = offs_d < HEAD_DIM

    seq_len = tl.load(SeqLens + b)
    kv_start = 0
    if HAS_START:  # cascade level 1: the row's keys from kv_start on (the rest is its group's prefix)
        kv_start = tl.load(KvStarts + b)
    table = ReqToToken + tl.load(ReqRows + b).to(tl.int64) * stride_rt
    # This row's share of the grid's splits, and the chunk of keys this split owns (BLOCK_N aligned).
    num_keys = seq_len - kv_start
    row_splits = tl.maximum(tl.minimum(num_splits, tl.cdiv(num_keys, min_split_len)), 1)
    chunk = tl.cdiv(tl.cdiv(num_keys, row_splits), BLOCK_N) * BLOCK_N
    start = kv_start + split * chunk
    end = tl.minimum(start + chunk, seq_len)

    q_ptrs = Q + b.to(tl.int64) * stride_qt + (head0 + offs_h)[:, None] * stride_qh + offs_d[None, :]
    hd_mask = mask_h[:, None] & mask_d[None, :]
    q = tl.load(q_ptrs, mask=hd_mask, other=0.0)  # [BLOCK_H, BLOCK_D]
    q, qk_scale = _query_operand(q, qk_scale, UPCAST, F16)
    m_i, l_i, acc = _attend_keys(
        q, table, start, end, KBuf, VBuf, kv_head, stride_ks, stride_kh, stride_vs, stride_vh, qk_scale,
        BLOCK_H, HEAD_DIM, BLOCK_N, BLOCK_D, PRECISION)
    if MERGE:  # fold in level 0's splits (loaded now: loaded early, they held registers through the keys)
        heads = (head0 + offs_h).to(tl.int64)
        lse_ptrs = MidLse + b.to(tl.int64) * stride_ml_b + heads * stride_ml_h
        mo_ptrs = MidO + b.to(tl.int64) * stride_mo_b + heads[:, None] * stride_mo_h + offs_d[None, :]
        for s in range(0, split_base):  # split_base: level 0's split count
            lse = tl.load(lse_ptrs + s, mask=mask_h, other=float("-inf"))
            o = tl.load(mo_ptrs + s * stride_mo_s, mask=hd_mask, other=0.0)
            m_i, l_i, acc = _fold_split(m_i, l_i, acc, lse, o)
        out = acc / tl.maximum(l_i, 1e-30)[:, None]
        o_ptrs = Out + b.to(tl.int64) * stride_ot + (head0 + offs_h)[:, None] * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=hd_mask)
    else:
        _store_partial(
            MidO, MidLse, b + 0 * offs_h, head0 + offs_h, mask_h, split_base + split, m_i, l_i, acc,
            stride_mo_b, stride_mo_h, stride_mo_s, stride_ml_b, stride_ml_h, HEAD_DIM, BLOCK_D)


# Cascade level 0 (ops/attention/cascade.py): the queries of up to BLOCK_M // GROUP rows of one group, every
# q head of one kv head, against one chunk of the group's shared prefix, each prefix tile loaded once for
# them all. Blocks [4, stride_blk] int32: first row, rows, the group's first row (whose table row holds the
# prefix slots), prefix length; BlockCount [1]: how many blocks there are. The programs along axis 1 take the
# blocks in turn (block pid, pid + programs, ...): eager steps launch one program a block, CUDA graphs a fixed
# grid for any count (GraphCascade), rather than a program for every block the worst case could have.
@triton.jit(do_not_specialize=["stride_blk", "num_splits"])
def _prefix_split_kernel(
    Q, KBuf, VBuf, ReqToToken, ReqRows, Blocks, BlockCount, MidO, MidLse,
    qk_scale,
    stride_qt, stride_qh, stride_ks, stride_kh, stride_vs, stride_vh, stride_rt,
    stride_mo_b, stride_mo_h, stride_mo_s, stride_ml_b, stride_ml_h,
    stride_blk, num_splits,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, HEADS_FASTEST: tl.constexpr, UPCAST: tl.constexpr, F16: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    blk_axis: tl.constexpr = 1 if HEADS_FASTEST else 0  # grid (Hkv, programs, S0) or (programs, Hkv, S0)
    kv_head = tl.program_id(1 - blk_axis)
    split = tl.program_id(2)
    offs_m = tl.arange(0, BLOCK_M)  # query m: row row0 + m // GROUP, q head kv_head * GROUP + m % GROUP
    offs_d = tl.arange(0, BLOCK_D)
    heads = kv_head * GROUP + offs_m % GROUP
    mask_d = offs_d < HEAD_DIM
    for blk in range(tl.program_id(blk_axis), tl.load(BlockCount), tl.num_programs(blk_axis)):
        row0 = tl.load(Blocks + blk)
        num_rows = tl.load(Blocks + stride_blk + blk)
        first = tl.load(Blocks + 2 * stride_blk + blk)
        prefix_len = tl.load(Blocks + 3 * stride_blk + blk)
        rows = row0 + offs_m // GROUP
        mask_m = offs_m // GROUP < num_rows
        q_ptrs = Q + rows.to(tl.int64)[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :]
        q = tl.load(q_ptrs, mask=mask_m[:, None] & mask_d[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
        q, scale = _query_operand(q, qk_scale, UPCAST, F16)
        table = ReqToToken + tl.load(ReqRows + first).to(tl.int64) * stride_rt
        chunk = tl.cdiv(tl.cdiv(prefix_len, num_splits), BLOCK_N) * BLOCK_N
        start = split * chunk
        end = tl.minimum(start + chunk, prefix_len)
        m_i, l_i, acc = _attend_keys(
            q, table, start, end, KBuf, VBuf, kv_head, stride_ks, stride_kh, stride_vs, stride_vh, scale,
            BLOCK_M, HEAD_DIM, BLOCK_N, BLOCK_D, PRECISION)
        _store_partial(
            MidO, MidLse, rows, heads, mask_m, split, m_i, l_i, acc,
            stride_mo_b, stride_mo_h, stride_mo_s, stride_ml_b, stride_ml_h, HEAD_DIM, BLOCK_D)


@triton.jit(do_not_specialize=["num_splits"])
def _decode_reduce_kernel(
    MidO, MidLse, Out,
    stride_mo_b, stride_mo_h, stride_mo_s, stride_ml_b, stride_ml_h, stride_ot, stride_oh,
    num_splits,
    HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    wait_for_predecessor(PDL)
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    mask_s = offs_s < num_splits
    mask_d = offs_d < HEAD_DIM
    lse = tl.load(MidLse + b * stride_ml_b + h * stride_ml_h + offs_s, mask=mask_s, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)  # a row with no keys: all weights 0, output 0 (and no inf - inf)
    w = tl.exp2(lse - m)  # [BLOCK_S]
    o_ptrs = MidO + b * stride_mo_b + h * stride_mo_h + offs_s[:, None] * stride_mo_s + offs_d[None, :]
    o = tl.load(o_ptrs, mask=mask_s[:, None] & mask_d[None, :], other=0.0)  # [BLOCK_S, BLOCK_D]
    out = tl.sum(w[:, None] * o, 0) / tl.maximum(tl.sum(w, 0), 1e-30)
    tl.store(Out + b * stride_ot + h * stride_oh + offs_d, out.to(Out.dtype.element_ty), mask=mask_d)


@triton.jit
def _extend_kernel(
    Q, KBuf, VBuf, Out, ReqToToken, ReqRows, SeqLens, ExtendLens, ExtendStarts,
    qk_scale,
    stride_qt, stride_qh, stride_ks, stride_kh, stride_vs, stride_vh, stride_rt, stride_ot, stride_oh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, F16: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    r = tl.program_id(0)
    h = tl.program_id(1)
    m0 = tl.program_id(2) * BLOCK_M
    extend_len = tl.load(ExtendLens + r)
    if m0 >= extend_len:  # the grid is sized for the longest row
        return
    seq_len = tl.load(SeqLens + r)
    prefix_len = seq_len - extend_len
    first = tl.load(ExtendStarts + r).to(tl.int64)
    table = ReqToToken + tl.load(ReqRows + r).to(tl.int64) * stride_rt
    kv_head = h // GROUP

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < extend_len
    mask_d = offs_d < HEAD_DIM
    q_ptrs = Q + (first + offs_m)[:, None] * stride_qt + h * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=mask_m[:, None] & mask_d[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
    q, qk_scale = _query_operand(q, qk_scale, UPCAST, F16)
    q_pos = prefix_len + offs_m

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    kv_end = tl.minimum(seq_len, prefix_len + m0 + BLOCK_M)  # the block's last query sees no further
    # NOTE: key 0 is visible to every query, so each row's max is finite after the first tile (no inf - inf).
    for n0 in range(0, kv_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < kv_end
        slots = tl.load(table + offs_n, mask=mask_n, other=0).to(tl.int64)  # int64: see the decode kernel
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k_ptrs = KBuf + slots[:, None] * stride_ks + kv_head * stride_kh + offs_d[None, :]
        k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
        v_ptrs = VBuf + slots[:, None] * stride_vs + kv_head * stride_vh + offs_d[None, :]
        v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
        # Widened to q's type (fp16 under F16): a no-op for a pool of the model's dtype, the dequantization
        # of an FP8 one.
        k = k.to(q.dtype)
        v = v.to(q.dtype)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
        visible = mask_n[None, :] & (offs_n[None, :] <= q_pos[:, None])
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    out = acc / l_i[:, None]
    o_ptrs = Out + (first + offs_m)[:, None] * stride_ot + h * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])
