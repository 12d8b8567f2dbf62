"""Grammar masks on the device: packed token bitmasks (xgrammar's layout) applied to rows of logits.

A bitmask row has ceil(V / 32) int32 words; bit j of word w set means token 32 w + j is allowed. Applying one
sets every other logit to -inf. Sync-free on the GPU (ops/triton_bitmask.py): shapes come from the host,
values never leave the device.
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
    if logits.is_cuda:  # one kernel, in place
        from radixserve.ops.triton_bitmask import apply_token_bitmask_triton

        apply_token_bitmask_triton(logits, rows, bitmask)
        return
    # Host: unpack the bits with numpy (little-endian words: byte order is bit order), then fill each row in
    # place (a gathered copy of the rows costs more than the fill on a host: fresh pages for [G, V] floats).
    bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, count=V, bitorder="little")  # [G, V] 0/1
    blocked = torch.from_numpy(bits == 0)
    for g, row in enumerate(rows.tolist()):
        logits[row].masked_fill_(blocked[g], -math.inf)


def bitmask_allows(bitmask: np.ndarray, token: int) -> bool:
    """Host-side check of one token against one bitmask row (tests, debugging)."""
    return bool((int(bitmask[token // 32]) >> (token % 32)) & 1)
