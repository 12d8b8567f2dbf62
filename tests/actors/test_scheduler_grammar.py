"""Constrained decoding in SchedulerCore without a model: a 64-token vocabulary of characters and merges,
xgrammar matchers, and the fake worker picking the first token each bitmask allows.

Every step checks that the KV the worker reads back is exactly the scheduler's tokens (jump-forward rewrites
tokens and rolls KV back), that a constrained row whose input is an unapplied sample gets its mask only after
that sample is applied (StepMask), and that the outputs are the same with and without jump-forward (it only
saves forward passes).
"""

from __future__ import annotations

import json
import re
from collections import Counter, deque
from typing import Any

import jsonschema
import numpy as np
import pytest
import xgrammar as xgr

from radixserve.actors.grammar import GrammarCache
from radixserve.actors.messages import RequestUpdate, StepPlan, StepResult, SubmitRequest
from radixserve.actors.scheduler_config import SchedulerConfig
from radixserve.actors.scheduler_core import SchedulerCore
from radixserve.outputs import FinishReason
from radixserve.sampling_params import SamplingParams
from tests.actors.fake_worker import VOCAB, FakeWorker, reference_generate

STOP = 3
# ids 0-3: characters that JSON strings only take escaped (NOTE: xgrammar's strings with maxLength would
# take other control characters raw), and EOS
SPECIAL = ["\n", "\r", "\\", "</s>"]
CHARS = ["{", "}", "[", "]", '"', ":", ",", " ", *"0123456789", *"abcdefgh"]
MERGES = ['{"', '":', '": ', '", "', ', "', '"a', "ab", "abc", "cd", "ee", "fgh", "12", "34", ' "', "b ",
          '"}', "}]", "a1", " 1", " 2", "gh", "ef", '"c', 'c"', "bc", "de", "d ", "9}", "ha", "ah", "ca",
          "a ", "1}", "0}"]
FAKE_VOCAB = SPECIAL + CHARS + MERGES
assert len(FAKE_VOCAB) == VOCAB, len(FAKE_VOCAB)


class FakeTokenizer:
    """Greedy longest-match encoding over FAKE_VOCAB: deterministic, and it re-tokenizes text differently
    from how the fake model spells it, which is what jump-forward has to cope with."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids, i = [], 0
        while i < len(text):
            token = max((t for t in range(VOCAB) if t != STOP and text.startswith(FAKE_VOCAB[t], i)),
                        key=lambda t: len(FAKE_VOCAB[t]))
            ids.append(token)
            i += len(FAKE_VOCAB[token])
        return ids

    def decode(self, ids: list[int], **_: Any) -> str:
        return "".join(FAKE_VOCAB[t] for t in ids)


TOKENIZER = FakeTokenizer()
SCHEMA = {
    "type": "object",
    "properties": {"abc": {"type": "string", "maxLength": 3}, "fgh": {"type": "integer", "minimum": 0,
                                                                        "maximum": 99},
                   "ee": {"type": "array", "items": {"enum": ["ab", "cd"]}, "maxItems": 2}},
    "required": ["abc", "fgh", "ee"],
}
REGEX = "abc(d|e)fgh(a|b){1,3}"


def grammars() -> GrammarCache:
    info = xgr.TokenizerInfo(FAKE_VOCAB, vocab_type=xgr.VocabType.RAW, vocab_size=VOCAB,
                             stop_token_ids=[STOP])
    return GrammarCache(TOKENIZER, VOCAB, [STOP], tokenizer_info=info)


def make(jump_forward: bool = True, num_slots: int = 4096, **kw: Any) -> tuple[SchedulerCore, FakeWorker]:
    cfg = SchedulerConfig(num_slots=num_slots, max_rows=64, disable_jump_forward=not jump_forward, **kw)
    return SchedulerCore(cfg, grammars()), FakeWorker(num_slots, 64, 4096)


def submit(core: SchedulerCore, rid: str, prompt: list[int], max_new: int, **params: Any) -> None:
    core.submit(SubmitRequest(rid, prompt, SamplingParams(**params), max_new, [STOP], float(len(core.reqs))))


def drive(
    core: SchedulerCore,
    worker: FakeWorker,
    steps: Counter[str] | None = None,
    masks_after: list[int] | None = None,
    max_steps: int = 5000,
) -> dict[str, list[int]]:
    """Run to the end like the scheduler actor (two steps in flight; after a result, the masks of the step in
    flight go out before the next plan is made), checking every step; outputs by rid. `steps` counts the
    forward passes each request rode in; `masks_after` gets the steps whose masks came after their plan."""
    updates: dict[str, list[RequestUpdate]] = {}
    # Steps in flight: results, or plans waiting for their masks (the worker samples once they arrive).
    inflight: deque[StepResult | tuple[StepPlan, list[list[int]]]] = deque()

    def run(plan: StepPlan, known: list[list[int]], mask: bytes | None = None) -> StepResult:
        result = worker.step(plan, mask)
        for b, context in worker.contexts.items():
            assert context[: len(known[b])] == known[b], f"row {b} read stale KV"
        return result

    for _ in range(max_steps):
        if not (core.has_work or inflight):
            return _outputs(updates)
        plan = core.schedule()
        if plan is not None:
            reqs = core._issued[-1].reqs
            seq_lens = np.frombuffer(plan.seq_lens, dtype="<i4")
            prev_rows = np.frombuffer(plan.prev_rows, dtype="<i4")
            known = [req.tokens()[: int(n)] for req, n in zip(reqs, seq_lens, strict=True)]
            for b, req in enumerate(reqs):
                if req.grammar is not None and prev_rows[b] >= 0:
                    assert plan.grammar_mask_follows, (
                        "a constrained row's mask predates the sample it follows"
                    )
                if steps is not None:
                    steps[req.rid] += 1
            inflight.append((plan, known) if plan.grammar_mask_follows else run(plan, known))
            if len(inflight) < 2 and core.has_work:
                continue
        if inflight:
            result = inflight.popleft()
            assert isinstance(result, StepResult)
            for u in core.apply(result):
                updates.setdefault(u.rid, []).append(u)
            mask = core.take_step_mask()
            if inflight and not isinstance(inflight[0], StepResult):
                assert mask is not None and mask.step == inflight[0][0].step, "a step waits for its masks"
                plan, known = inflight.popleft()
                inflight.appendleft(run(plan, known, mask.bitmask))
                if masks_after is not None:
                    masks_after.append(plan.step)
            else:
                assert mask is None
    raise AssertionError("the scheduler made no progress")


def _outputs(updates: dict[str, list[RequestUpdate]]) -> dict[str, list[int]]:
    out = {}
    for rid, us in updates.items():
        assert sum(u.finish_reason is not None for u in us) == 1 and us[-1].finish_reason is not None, rid
        assert all(u.error is None for u in us), rid
        out[rid] = [t for u in us for t in u.token_ids]
    return out


def text_of(tokens: list[int]) -> str:
    assert tokens and tokens[-1] == STOP, tokens
    return TOKENIZER.decode(tokens[:-1])


PROMPTS = [[5 + (i * 7 + j * 3) % 50 for j in range(3 + i % 5)] for i in range(12)]


def workload(core: SchedulerCore) -> None:
    for i, prompt in enumerate(PROMPTS):
        match i % 3:
            case 0:
                submit(core, f"json{i}", prompt, 80, json_schema=json.dumps(SCHEMA))
            case 1:
                submit(core, f"regex{i}", prompt, 40, regex=REGEX)
            case _:
                submit(core, f"free{i}", prompt, 30)


@pytest.mark.parametrize("overlap", [True, False])
def test_outputs_follow_grammars_and_jump_forward_only_saves_steps(overlap: bool) -> None:
    results, steps = {}, {}
    for jump_forward in (False, True):
        core, worker = make(jump_forward, overlap=overlap, chunked_prefill_size=24)
        workload(core)
        per_request: Counter[str] = Counter()
        masks_after: list[int] = []
        results[jump_forward] = drive(core, worker, per_request, masks_after)
        assert bool(masks_after) == overlap, "constrained requests ride overlapped steps"
        steps[jump_forward] = sum(n for rid, n in per_request.items() if not rid.startswith("free"))
        assert (core.num_jump_forward_tokens > 0) == jump_forward
        assert core.num_grammar_rejections == 0
        core.check_integrity()
        assert core.kv.private_slots == 0
    assert results[True] == results[False]
    assert steps[True] < steps[False], steps
    for i, prompt in enumerate(PROMPTS):
        rid = ("json", "regex", "free")[i % 3] + str(i)
        out = results[True][rid]
        if rid.startswith("json"):
            jsonschema.validate(json.loads(text_of(out)), SCHEMA)
        elif rid.startswith("regex"):
            assert re.fullmatch(REGEX, text_of(out)), text_of(out)
        else:
            assert out == reference_generate(prompt, 30, {STOP})  # unconstrained requests are unaffected


def test_retraction_keeps_constrained_outputs() -> None:
    big, worker = make()
    workload(big)
    expected = drive(big, worker)
    core, worker = make(num_slots=100, chunked_prefill_size=16, new_token_ratio=0.05, min_new_token_ratio=0.0)
    workload(core)
    assert drive(core, worker) == expected
    assert core.num_retractions > 0, "the pool was meant to force a retraction"
    core.check_integrity()


def test_kv_rollback_of_retokenized_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    """Window 2: a computed token merges with the forced text; its slot is freed and its KV recomputed."""
    core, worker = make()
    truncated: list[int] = []
    truncate = core.kv.truncate
    monkeypatch.setattr(core.kv, "truncate", lambda req, n: (truncated.append(req.planned_len - n),
                                                             truncate(req, n))[1])
    workload(core)
    drive(core, worker)  # the KV checks in drive() would catch a stale token
    assert truncated, "no jump-forward re-tokenized a computed token"
    core.check_integrity()


def test_penalty_counts_follow_jump_forward_edits() -> None:
    core, worker = make()
    for i, prompt in enumerate(PROMPTS[:4]):
        submit(core, f"p{i}", prompt, 80, json_schema=json.dumps(SCHEMA), frequency_penalty=0.5)
    out = drive(core, worker)
    assert core.num_jump_forward_tokens > 0
    held = [Counter(t) for t in (*worker.penalty_outputs.values(), *worker.released_penalty_outputs)]
    assert len(held) == len(out)
    # The worker's counts at release are the request's output plus, at most, the one sample of the step that
    # was in flight when it finished (under overlap); dropped samples and re-tokenized tokens were edited out.
    for tokens in out.values():
        want = Counter(tokens)
        match = next(h for h in held if not want - h and (h - want).total() <= 1)
        held.remove(match)


def test_rejected_token_fails_only_its_request() -> None:
    """A -inf logit_bias over everything the grammar allows makes the worker sample a token it rejects."""
    core, worker = make()
    submit(core, "bad", [5, 6, 7], 20, regex=REGEX)
    submit(core, "good", [8, 9], 5)
    plan = core.schedule()
    assert plan is not None
    result = worker.step(plan)
    tokens = np.frombuffer(result.tokens, dtype="<i4").copy()
    tokens[0] = FAKE_VOCAB.index("}")  # row 0 is "bad" (admitted first)
    updates = core.apply(StepResult(result.step, tokens.astype("<i4").tobytes()))
    [bad] = [u for u in updates if u.rid == "bad"]
    assert bad.finish_reason == FinishReason.ABORT and bad.error and bad.token_ids == []
    assert core.num_grammar_rejections == 1
    rest = drive(core, worker)
    assert rest["good"][-1:] == reference_generate([8, 9], 5, {STOP})[-1:]
    core.check_integrity()


def test_max_new_tokens_cuts_forced_text() -> None:
    results = {}
    for jump_forward in (False, True):
        core, worker = make(jump_forward)
        for n in range(1, 8):
            submit(core, f"n{n}", [5, 6], n, json_schema=json.dumps(SCHEMA))
        results[jump_forward] = drive(core, worker)
        core.check_integrity()
    assert results[True] == results[False]
    assert all(len(results[True][f"n{n}"]) == n for n in range(1, 8))


def test_constrained_rows_overlap_and_jump_forward_drops_the_sample_in_flight() -> None:
    """Under overlap a constrained request is planned while its sample is in flight: the plan says its masks
    follow, and they come once that sample is applied. When the grammar then forces text (the model wrote
    "ab" of the regex's "abc"), the in-flight step's sample is dropped and the forced text appended
    instead."""
    core, worker = make()
    submit(core, "a", [5, 6, 7], 20, regex=REGEX)
    first = core.schedule()
    assert first is not None and not first.grammar_mask_follows  # prefill: its mask needs no sample
    submit(core, "b", [8, 9], 20, regex=REGEX)
    second = core.schedule()  # "a" decodes the sample of `first` (in flight), "b" prefills
    assert second is not None and second.grammar_mask_follows and not second.grammar_bitmask
    assert [r.rid for r in core._issued[-1].reqs] == ["a", "b"]
    assert core.take_step_mask() is None
    core.apply(worker.step(first))
    a, b = core.reqs["a"], core.reqs["b"]
    assert TOKENIZER.decode(a.output_ids) == "ab"
    assert a.discard_step == second.step, "the grammar forces 'c': the sample in flight must be dropped"
    mask = core.take_step_mask()
    assert mask is not None and mask.step == second.step
    rows = np.frombuffer(mask.bitmask, dtype="<i4").reshape(2, -1)
    assert (rows[0] == -1).all(), "a dropped sample is unconstrained"
    expected = np.zeros((1, rows.shape[1]), dtype=np.int32)
    assert b.grammar is not None
    b.grammar.fill_bitmask(expected, 0)
    assert (rows[1] == expected[0]).all()
    before = list(a.output_ids)
    core.apply(worker.step(second, mask.bitmask))
    assert a.discard_step == -1 and a.pending_step == -1
    assert TOKENIZER.decode(a.output_ids).startswith("abc")  # "ab" re-tokenized with the forced "c"
    assert len(a.output_ids) >= len(before)
    out = drive(core, worker)
    assert re.fullmatch(REGEX, text_of(out["a"])) and re.fullmatch(REGEX, text_of(out["b"]))
    core.check_integrity()

