"""Requests that share a prompt head: admission's key for them, and how many KV slots each decode row shares
with the row before it (the StepPlan's `shared_lens`).

Two requests hold the same slot at position i only through the radix tree, and a tree slot sits at one depth
of one path: requests that share the slot at position i share every slot before it. So the shared length of
two rows is the largest L with a.slots[L - 1] == b.slots[L - 1], found by bisection over their tree-owned
heads (private slots are never shared). It changes only when a neighbour or a cached prefix does, so each
request remembers its last answer, and two slot comparisons tell whether it still holds.
"""

from __future__ import annotations

import numpy as np

from radixserve.actors.request_state import Req

# Prompt tokens that identify a shared head (a system prompt) for admission's hold-back (see
# SchedulerCore._prompt_heads_being_computed); SGLang checks in-batch prefixes at 32 tokens too.
HEAD = 32


def prompt_head(req: Req) -> tuple[int, ...] | None:
    """The key under which admission holds back requests sharing a prompt head (None: too short to tell)."""
    if len(req.prompt_ids) <= HEAD or req.params.prompt_logprobs is not None:
        return None
    return tuple(req.prompt_ids[:HEAD])


def shared_len(a: Req, b: Req) -> int:
    """KV slots at the head of both requests' rows (0 when none)."""
    lo, hi = 0, min(a.prefix_len, b.prefix_len)
    sa, sb = a.slots, b.slots
    while lo < hi:  # invariant: the first lo slots are shared; none past hi is
        mid = (lo + hi + 1) // 2
        if sa[mid - 1] == sb[mid - 1]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _still_shared(a: Req, b: Req, length: int) -> bool:
    """Whether `length` is still the shared length of a and b (by the prefix property above)."""
    hi = min(a.prefix_len, b.prefix_len)
    if length > hi or (length and a.slots[length - 1] != b.slots[length - 1]):
        return False
    return length == hi or a.slots[length] != b.slots[length]


def shared_prefix_lens(reqs: list[Req]) -> list[int]:
    """[B] for rows in plan order: slots row b shares with row b - 1 (0 for the first row)."""
    out = [0] * len(reqs)
    for b in range(1, len(reqs)):
        prev, req = reqs[b - 1], reqs[b]
        if not _still_shared(prev, req, req.shared_with_prev):
            req.shared_with_prev = shared_len(prev, req)
        out[b] = req.shared_with_prev
    return out


def decode_shared_lens(rows: list[tuple[Req, int]]) -> bytes:
    """StepPlan.shared_lens of a step whose rows are (request, new tokens): int32, one per leading row that
    decodes one token (all rows of a decode step; a mixed step's decode rows come first); empty when fewer
    than two rows lead."""
    d = 0
    while d < len(rows) and rows[d][1] == 1:
        d += 1
    if d < 2:
        return b""
    return np.asarray(shared_prefix_lens([req for req, _ in rows[:d]]), dtype="<i4").tobytes()
