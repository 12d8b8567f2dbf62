"""The torch bitmask kernel against xgrammar's own, on random masks, rows and a padded vocabulary."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import xgrammar as xgr

from radixserve.ops.token_bitmask import apply_token_bitmask, bitmask_allows, bitmask_words


def test_matches_xgrammar() -> None:
    rng = np.random.default_rng(0)
    V, padded, B = 1000, 1024, 6
    rows = [1, 4, 5]
    words = rng.integers(-(2**31), 2**31, size=(len(rows), bitmask_words(V)), dtype=np.int64)
    bitmask = words.astype(np.int32)
    logits = torch.randn(B, padded)
    ours = logits.clone()
    apply_token_bitmask(ours[:, :V], torch.tensor(rows), torch.from_numpy(bitmask))
    full = torch.full((B, bitmask_words(V)), -1, dtype=torch.int32)
    full[rows] = torch.from_numpy(bitmask)
    theirs = logits.clone()
    xgr.apply_token_bitmask_inplace(theirs, full, vocab_size=V, indices=rows)
    assert torch.equal(ours, theirs)
    for g, row in enumerate(rows):
        for token in (0, 31, 32, 999):
            assert (ours[row, token] == -math.inf) != bitmask_allows(bitmask[g], token)
    assert torch.equal(ours[:, V:], logits[:, V:]) and torch.equal(ours[[0, 2, 3]], logits[[0, 2, 3]])


def test_triton_kernel_matches_host_path() -> None:
    """The GPU path's Triton kernel (in the interpreter) equals the host path, with a vocabulary that is not a
    multiple of the kernel's block and rows in any order."""
    pytest.importorskip("triton")
    from radixserve.ops.triton_bitmask import BLOCK, apply_token_bitmask_triton

    rng = np.random.default_rng(1)
    V, B = BLOCK + 77, 5
    rows = torch.tensor([4, 0, 2])
    bitmask = torch.from_numpy(
        rng.integers(-(2**31), 2**31, size=(3, bitmask_words(V)), dtype=np.int64).astype(np.int32)
    )
    logits = torch.randn(B, V + 3)[:, :V]  # a strided view, as the sampler may hold
    ours = logits.clone()
    apply_token_bitmask_triton(ours, rows, bitmask)
    ref = logits.clone()
    apply_token_bitmask(ref, rows, bitmask)
    assert torch.equal(ours, ref)
