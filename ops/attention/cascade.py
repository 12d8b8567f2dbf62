"""Two-level (cascade) decode attention for rows that share a cached prefix: the host-side plan.

A decode step whose rows share a long prefix (one system prompt under many requests: the radix tree hands
them the same KV slots) reads that prefix's KV once per row with plain batch decode. Cascade attention reads
it once per group:

    level 0  per group g of neighbouring rows: every query of the group attends, unmasked, to the group's
             shared prefix slots req_to_token[first row of g, 0 : P_g]   (a prefill-shaped problem whose
             queries are the group's rows)
    level 1  per row b: its query attends to the rest of its row, req_to_token[row b, P_g : seq_len_b]
    merge    out = softmax-weighted union of the two partial results, from their log-sum-exps

A row in no group is a group of one whose "prefix" is all but its last token, so every row has at least one
key in each level (decode rows have seq_len >= 2, checked) and the merge never sees an empty side.

Which rows share what comes from the scheduler (StepPlan.shared_lens: row b's first shared_lens[b] slots are
row b-1's), which knows it from the radix tree without looking at the slots on the device.
"""

from __future__ import annotations

from dataclasses import dataclass

# A row joins its predecessor's group when they share at least this many tokens...
MIN_SHARED_TOKENS = 64
# ...and no less than half of what the group shares so far (a group's prefix is the least any two of its
# neighbours share: one row sharing little with the rest would cut everyone's saving).
KEEP_FRACTION = 0.5
# Cascade costs a second attention kernel and a merge per layer; take it only when it skips reading at least
# this share of the step's KV tokens, and this many of them (~0.5 ms of an H100's bandwidth at Llama-8B's
# 128 KiB per token over all layers).
MIN_SAVED_FRACTION = 0.1
MIN_SAVED_TOKENS = 12_288


@dataclass(frozen=True, slots=True)
class CascadePlan:
    """Index ranges on the host. Level 0 has one entry per group, level 1 one per row (plan order)."""

    group_starts: tuple[int, ...]  # [G + 1] first row of each group, then B: level 0's query offsets
    prefix_lens: tuple[int, ...]  # [G] P_g: KV tokens of level 0
    row_prefix_lens: tuple[int, ...]  # [B] P of the row's group: where its level-1 KV starts
    saved_tokens: int  # KV tokens per layer not read compared with plain decode

    @property
    def num_groups(self) -> int:
        return len(self.prefix_lens)

    def suffix_lens(self, seq_lens: tuple[int, ...]) -> tuple[int, ...]:
        """[B] level-1 KV tokens of each row."""
        return tuple(s - p for s, p in zip(seq_lens, self.row_prefix_lens, strict=True))


def plan_cascade(seq_lens: tuple[int, ...], shared_lens: tuple[int, ...]) -> CascadePlan | None:
    """Group neighbouring decode rows by their shared prefix; None when cascade would not pay (or cannot
    run: a row with a single KV token has nothing to put in level 0)."""
    if len(shared_lens) != len(seq_lens) or len(seq_lens) < 2 or min(seq_lens) < 2:
        return None
    bounds: list[tuple[int, int, int]] = []  # (first row, end row, shared prefix or 0 for a single row)
    first, prefix = 0, 0
    for b in range(1, len(seq_lens)):
        s = shared_lens[b]
        assert s < seq_lens[b] and s < seq_lens[b - 1], "a row shares its own new token"
        if s >= MIN_SHARED_TOKENS and (prefix == 0 or s >= KEEP_FRACTION * prefix):
            prefix = s if prefix == 0 else min(prefix, s)
            continue
        bounds.append((first, b, prefix))
        first, prefix = b, 0
    bounds.append((first, len(seq_lens), prefix))

    group_starts, prefix_lens, row_prefix = [], [], []
    saved = 0
    for first, end, shared in bounds:
        p = shared if shared else seq_lens[first] - 1  # a single row: all but its new token
        group_starts.append(first)
        prefix_lens.append(p)
        row_prefix.extend([p] * (end - first))
        saved += (end - first - 1) * p
    group_starts.append(len(seq_lens))
    if saved < max(MIN_SAVED_TOKENS, MIN_SAVED_FRACTION * sum(seq_lens)):
        return None
    return CascadePlan(tuple(group_starts), tuple(prefix_lens), tuple(row_prefix), saved)
