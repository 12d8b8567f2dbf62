"""Greedy argmax over a few long rows of logits, in two stages.

torch reduces each row of `x.argmax(-1)` in one thread block: one row of 128,256 bf16 logits took 37 us on
an H200 (a batch-1 decode step's trace, session 10), on the GPU's critical path between two CUDA-graph
replays, while the other SMs idled. Split each row into chunks of a divisor of the vocabulary (~1,024
entries), take every chunk's maximum in parallel, then the first chunk holding the row's maximum:

    vals, idx = x.view(B, chunks, chunk).max(-1)      # [B, chunks]: first index of each chunk's maximum
    best = vals.argmax(-1)                            # the first chunk that holds the row's maximum
    token = best * chunk + idx[best]

torch.max(dim) and argmax both return the first index of a tied maximum, so the result is x.argmax(-1)
exactly, NaN rows included (a NaN is the maximum of both). Past 16 rows, torch's one block a row already
spreads over the SMs, and the plain argmax is kept. RADIXSERVE_DISABLE_SPLIT_ARGMAX=1 keeps it always (A/B).
"""

from __future__ import annotations

import functools
import os

from torch import Tensor

DISABLE_ENV = "RADIXSERVE_DISABLE_SPLIT_ARGMAX"
# More rows: one block a row already fills the GPU. Read once, at import (worker processes inherit it).
SPLIT_MAX_ROWS = 0 if os.environ.get(DISABLE_ENV, "0") == "1" else 16
CHUNK_RANGE = (512, 2048)  # a first-stage chunk: long enough to amortize a block, short enough to spread


@functools.cache
def argmax_chunk(vocab: int) -> int | None:
    """The divisor of `vocab` in CHUNK_RANGE closest to 1,024 (None: there is none; 128,256 -> 1,002,
    152,064 -> 1,056, 32,000 -> 1,000)."""
    lo, hi = CHUNK_RANGE
    divisors = [d for d in range(lo, hi + 1) if vocab % d == 0]
    return min(divisors, key=lambda d: abs(d - 1024)) if divisors else None


def row_argmax(x: Tensor, split: bool | None = None) -> Tensor:
    """x.argmax(-1) for [B, V] x, in two stages where that spreads the work (split None: on CUDA, up to
    SPLIT_MAX_ROWS rows, when V has a chunk divisor). Sync-free; [B] int64 on x's device."""
    rows, vocab = x.shape
    chunk = argmax_chunk(vocab)
    if split is None:
        split = x.is_cuda and rows <= SPLIT_MAX_ROWS
    if not split or chunk is None or x.stride(-1) != 1:
        return x.argmax(dim=-1)
    vals, idx = x.unflatten(1, (vocab // chunk, chunk)).max(dim=-1)  # [B, chunks]
    best = vals.argmax(dim=-1, keepdim=True)  # [B, 1]
    return (best * chunk + idx.gather(1, best)).squeeze(1)
