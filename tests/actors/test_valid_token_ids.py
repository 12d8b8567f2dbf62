"""Ingress's check of caller-given token ids (numpy, not a Python loop per token)."""

from __future__ import annotations

import numpy as np
import pytest

from radixserve.actors.ingress import valid_token_ids
from radixserve.errors import InvalidRequestError


@pytest.mark.parametrize(
    "ids",
    [[1.0], [1, 2.5], ["a"], "abc", [[1, 2], [3, 4]], [[1], [2, 3]], [1, None], [-1], [100], [2**63], [2**70],
     {1: 2}],
)
def test_rejects_anything_but_ids_in_the_vocabulary(ids: object) -> None:
    with pytest.raises(InvalidRequestError) as info:
        valid_token_ids(ids, vocab_size=100)  # type: ignore[arg-type]
    assert info.value.field == "input_ids"


def test_returns_python_ints() -> None:
    for ids in ([0, 5, 99], np.array([0, 5, 99], dtype=np.int32), (0, 5, 99), [np.int64(0), 5, 99]):
        out = valid_token_ids(ids, vocab_size=100)  # type: ignore[arg-type]
        assert out == [0, 5, 99] and all(type(t) is int for t in out)
    assert valid_token_ids([], vocab_size=100) == []
