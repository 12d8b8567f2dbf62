"""Cascade decode attention's host plan: grouping, and that its two levels merged equal plain attention.

The merge here is the log-sum-exp merge FlashInfer's merge_state computes; the GPU run (benchmarks/
check_gpu_path.py) checks FlashInfer's cascade against its plain decode."""

from __future__ import annotations

import torch

from radixserve.ops.attention.cascade import MIN_SAVED_TOKENS, plan_cascade
from radixserve.ops.attention.flashinfer_backend import gather_row_ranges


def test_rows_sharing_a_prefix_form_one_group_and_others_stand_alone() -> None:
    seq_lens = (3000, 3001, 3002, 2999, 3000, 3000, 3000, 3000, 500, 4000, 4001)
    shared = (0,) + (2048,) * 7 + (0, 0, 3990)
    plan = plan_cascade(seq_lens, shared)
    assert plan is not None
    assert plan.group_starts == (0, 8, 9, 11)
    assert plan.prefix_lens == (2048, 499, 3990)  # the single row keeps its new token for level 1
    assert plan.row_prefix_lens == (2048,) * 8 + (499, 3990, 3990)
    assert plan.saved_tokens == 7 * 2048 + 3990
    assert plan.suffix_lens(seq_lens) == (952, 953, 954, 951, 952, 952, 952, 952, 1, 10, 11)


def test_a_row_sharing_much_less_starts_a_new_group() -> None:
    seq_lens = (3000,) * 12
    shared = (0,) + (2048,) * 7 + (200,) + (1000,) * 3
    plan = plan_cascade(seq_lens, shared)
    assert plan is not None
    assert plan.group_starts == (0, 8, 12)
    assert plan.prefix_lens == (2048, 1000)


def test_no_cascade_when_it_saves_little_or_cannot_run() -> None:
    assert plan_cascade((3000, 3000), (0, 2048)) is None  # saves 2048 < MIN_SAVED_TOKENS
    assert plan_cascade((1000,) * 200, (0,) + (70,) * 199) is None  # saves under a tenth of the KV
    many = (2100,) * 16
    assert plan_cascade(many, (0,) + (2048,) * 15) is not None
    assert plan_cascade(many[:-1] + (1,), (0,) + (2048,) * 14 + (0,)) is None  # a row with one KV token
    assert plan_cascade(many, ()) is None


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [n, Hq, D] over k/v [L, Hkv, D]: (out [n, Hq, D], natural-log lse [n, Hq]), GQA by repetition."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = torch.einsum("nhd,lhd->nhl", q, k) * scale
    return torch.einsum("nhl,lhd->nhd", scores.softmax(-1), v), scores.logsumexp(-1)


def test_two_levels_merged_equal_plain_attention() -> None:
    torch.manual_seed(0)
    q_heads, kv_heads, dim, system = 4, 2, 16, 2048
    num_rows = MIN_SAVED_TOKENS // system + 3
    tails = torch.randint(2, 60, (num_rows,)).tolist()
    num_slots = 1 + system + sum(tails) + 50
    k_pool, v_pool = torch.randn(num_slots, kv_heads, dim), torch.randn(num_slots, kv_heads, dim)
    table = torch.zeros(num_rows + 2, 4096, dtype=torch.int32)
    perm = torch.randperm(num_slots - 1) + 1
    prefix, rest = perm[:system], perm[system:]
    rows = torch.arange(num_rows) + 1  # table rows of the plan rows, in order
    seq_lens, shared = [], []
    for b, tail in enumerate(tails):
        own = system - 10 * (b == num_rows - 1)  # the last row shares 10 tokens less
        table[rows[b], :own] = prefix[:own].to(torch.int32)
        table[rows[b], own : own + tail] = rest[:tail].to(torch.int32)
        rest = rest[tail:]
        seq_lens.append(own + tail)
        shared.append(0 if b == 0 else min(own, system - 10 * (b - 1 == num_rows - 1)))
    plan = plan_cascade(tuple(seq_lens), tuple(shared))
    assert plan is not None and plan.num_groups == 1 and plan.prefix_lens == (system - 10,)
    q = torch.randn(num_rows, q_heads, dim)
    scale = dim**-0.5

    # level 0: each group's queries over its first row's prefix; level 1: each row over the rest
    G = plan.num_groups
    firsts = torch.tensor(plan.group_starts[:-1])
    prefix_lens = torch.tensor(plan.prefix_lens)
    idx0 = gather_row_ranges(table, rows[firsts], None, prefix_lens, sum(plan.prefix_lens))
    row_prefix = torch.tensor(plan.row_prefix_lens)
    suffix = plan.suffix_lens(tuple(seq_lens))
    idx1 = gather_row_ranges(table, rows, row_prefix, torch.tensor(seq_lens) - row_prefix, sum(suffix))
    kv0 = torch.cumsum(torch.tensor((0,) + plan.prefix_lens), 0)
    kv1 = torch.cumsum(torch.tensor([0] + list(suffix)), 0)
    for g in range(G):
        q_rows = range(plan.group_starts[g], plan.group_starts[g + 1])
        slots0 = idx0[kv0[g] : kv0[g + 1]].long()
        out0, lse0 = _attend(q[list(q_rows)], k_pool[slots0], v_pool[slots0], scale)
        for i, b in enumerate(q_rows):
            slots1 = idx1[kv1[b] : kv1[b + 1]].long()
            out1, lse1 = _attend(q[b : b + 1], k_pool[slots1], v_pool[slots1], scale)
            lse = torch.logaddexp(lse0[i], lse1[0])
            merged = out0[i] * (lse0[i] - lse).exp()[:, None] + out1[0] * (lse1[0] - lse).exp()[:, None]
            whole = table[rows[b], : seq_lens[b]].long()
            expected, _ = _attend(q[b : b + 1], k_pool[whole], v_pool[whole], scale)
            torch.testing.assert_close(merged, expected[0], rtol=1e-5, atol=1e-5)
