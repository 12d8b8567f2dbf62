"""ops/argmax.row_argmax (two-stage greedy argmax) against torch.argmax, ties and NaNs included."""

from __future__ import annotations

import pytest
import torch

from radixserve.ops.argmax import CHUNK_RANGE, argmax_chunk, row_argmax


@pytest.mark.parametrize("vocab", [128256, 152064, 32000, 49152, 50257, 4096])
def test_chunk_divides_the_vocabulary(vocab: int) -> None:
    chunk = argmax_chunk(vocab)
    assert chunk is not None and vocab % chunk == 0 and CHUNK_RANGE[0] <= chunk <= CHUNK_RANGE[1]


def test_no_chunk_for_a_prime_vocabulary() -> None:
    assert argmax_chunk(32003) is None  # prime: the plain argmax runs
    x = torch.randn(2, 32003)
    assert torch.equal(row_argmax(x, split=True), x.argmax(-1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 16])
def test_matches_argmax_with_ties(dtype: torch.dtype, rows: int) -> None:
    g = torch.Generator().manual_seed(rows)
    vocab = 32000
    # few distinct values: every row's maximum occurs many times, in many chunks
    x = torch.randint(0, 8, (rows, vocab), generator=g).to(dtype)
    assert (x == x.max(-1, keepdim=True).values).sum(-1).min() > 10
    assert torch.equal(row_argmax(x, split=True), x.argmax(-1))
    y = torch.randn(rows, vocab, generator=g).to(dtype)
    assert torch.equal(row_argmax(y, split=True), y.argmax(-1))


def test_padded_columns_view_nan_and_minus_inf_rows() -> None:
    vocab, padded = 49152, 49280
    x = torch.randn(4, padded)
    x[1, 7000] = float("nan")  # a NaN is the maximum for argmax and max alike
    x[2, :] = float("-inf")
    x[3, 1023] = x[3, 1024] = 100.0  # a tie across the first two chunks
    view = x[:, :vocab]  # the sampler's view of a padded LM head's logits
    assert torch.equal(row_argmax(view, split=True), view.argmax(-1))
    assert row_argmax(view, split=True)[3] == 1023


def test_plain_argmax_off_cuda_by_default() -> None:
    x = torch.randn(2, 32000)
    assert torch.equal(row_argmax(x), x.argmax(-1))
