"""Grammar masks on the device: packed token bitmasks (xgrammar's layout) applied to rows of logits.

A bitmask row has ceil(V / 32) int32 words; bit j of word w set means token 32 w + j is allowed. Applying one
sets every other logit to -inf. Sync-free: shapes come from the host, values never leave the device.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor


def bitmask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def apply_token_bitmask(logits: Tensor, rows: Tensor, bitmask: Tensor) -> None:
    """Mask `logits` [B, V] in place: row rows[g] keeps only the tokens that bitmask[g] [G, W] allows."""
    G, W = bitmask.shape
    B, V = logits.shape
    assert rows.shape == (G,) and bitmask.dtype == torch.int32 and W * 32 >= V, (rows.shape, bitmask.shape, V)
    assert rows.device == bitmask.device == logits.device, (rows.device, bitmask.device, logits.device)
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    # [G, W, 32] -> [G, W * 32]: bit j of word w at column 32 w + j (an arithmetic shift keeps bit 31 right).
    allowed = ((bitmask.unsqueeze(-1) >> shifts) & 1).view(G, W * 32)[:, :V].bool()
    masked = logits.index_select(0, rows).masked_fill_(~allowed, -math.inf)
    logits.index_copy_(0, rows, masked)


def bitmask_allows(bitmask: np.ndarray, token: int) -> bool:
    """Host-side check of one token against one bitmask row (tests, debugging)."""
    return bool((int(bitmask[token // 32]) >> (token % 32)) & 1)
