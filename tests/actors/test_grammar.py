"""GrammarCache and GrammarState without an engine: compile errors, the LRU, masks, jump-forward."""

from __future__ import annotations

import json

import numpy as np
import pytest

from radixserve.errors import InvalidRequestError
from radixserve.ops.token_bitmask import bitmask_allows
from radixserve.sampling_params import SamplingParams
from tests.actors.test_scheduler_grammar import FAKE_VOCAB, REGEX, STOP, TOKENIZER, grammars


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"regex": "[a-"}, "regex"),
        ({"ebnf": "root ::= ("}, "ebnf"),
        ({"json_schema": "{not json"}, "json_schema"),
        ({"json_schema": json.dumps({"type": "nope"})}, "json_schema"),
    ],
)
def test_bad_specs_name_their_field(params: dict[str, str], field: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        grammars().new_state(SamplingParams(**params))  # type: ignore[arg-type]
    assert info.value.field == field
    assert "/project/" not in info.value.message  # xgrammar's source location is stripped


def test_lru_evicts_and_compiles_again_late() -> None:
    cache = grammars()
    cache.capacity = 2
    specs = [SamplingParams(regex=r) for r in ("ab", "cd", "ee")]
    for params in specs:
        cache.new_state(params)
    assert cache.num_compiles == 3 and cache.num_late_compiles == 3  # nothing was prepared ahead
    cache.new_state(specs[2])  # still cached
    assert cache.num_compiles == 3
    cache.new_state(specs[0])  # evicted
    assert cache.num_compiles == 4


async def test_prepare_compiles_off_the_loop_once() -> None:
    cache = grammars()
    params = SamplingParams(json_object=True)
    await cache.prepare(params)
    await cache.prepare(params)
    cache.new_state(params)
    assert cache.num_compiles == 1 and cache.num_late_compiles == 0


def test_jump_forward_retokenizes_the_tail_and_keeps_the_last_token_for_the_model() -> None:
    state = grammars().new_state(SamplingParams(regex=REGEX))  # abc(d|e)fgh(a|b){1,3}
    # Nothing is forced but one token ("abc"): it is left to the model.
    assert state.jump_forward([], 10) is None
    for token in TOKENIZER.encode("abcd"):
        assert state.accept(token)
    # Forced "fgh": the tail "d" is re-tokenized with it; "fgh" is the last token, so nothing is appended.
    jump = state.jump_forward([FAKE_VOCAB.index("d")], 10)
    assert jump is None
    bitmask = np.zeros((1, 2), dtype=np.int32)
    state.fill_bitmask(bitmask, 0)
    assert bitmask_allows(bitmask[0], FAKE_VOCAB.index("fgh")) and not bitmask_allows(bitmask[0], STOP)


def test_force_masks_one_token_at_a_time() -> None:
    state = grammars().new_state(SamplingParams(json_schema=json.dumps(
        {"type": "object", "properties": {"abc": {"type": "integer"}}, "required": ["abc"]})))
    jump = state.jump_forward([], 20)
    assert jump is not None and TOKENIZER.decode(jump.tokens) == '{"abc'  # `": ` is left to the model
    state.force(jump.tokens)
    bitmask = np.zeros((1, 2), dtype=np.int32)
    for token in jump.tokens:
        state.fill_bitmask(bitmask, 0)
        assert [t for t in range(64) if bitmask_allows(bitmask[0], t)] == [token]
        assert state.accept(token) and state.last_was_forced
    state.fill_bitmask(bitmask, 0)
    assert sum(bitmask_allows(bitmask[0], t) for t in range(64)) > 1  # the model chooses again
