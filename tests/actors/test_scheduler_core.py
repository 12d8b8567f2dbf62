"""SchedulerCore without a model: fabricated worker results (tests/actors/fake_worker.py)."""

from __future__ import annotations

import random
from collections import deque

import pytest

from radixserve.actors.messages import AbortReason, RequestUpdate, SubmitRequest
from radixserve.actors.scheduler_config import SchedulerConfig
from radixserve.actors.scheduler_core import SchedulerCore
from radixserve.outputs import FinishReason
from radixserve.sampling_params import SamplingParams
from tests.actors.fake_worker import VOCAB, FakeWorker, reference_generate

STOP = 3


def submit(
    core: SchedulerCore, rid: str, prompt: list[int], max_new: int, t: float, **params: object
) -> None:
    core.submit(SubmitRequest(rid, prompt, SamplingParams(**params), max_new, [STOP], t))  # type: ignore[arg-type]


def run(
    core: SchedulerCore,
    worker: FakeWorker,
    arrivals: dict[int, list[tuple[str, list[int], int]]] | None = None,
    max_steps: int = 10_000,
) -> dict[str, list[RequestUpdate]]:
    """Drive the core like the scheduler actor does: up to 2 steps in flight, results applied in order."""
    arrivals = dict(arrivals or {})
    updates: dict[str, list[RequestUpdate]] = {}
    inflight: deque = deque()
    tick = 0
    while core.has_work or inflight or arrivals:
        for rid, prompt, max_new in arrivals.pop(tick, []):
            submit(core, rid, prompt, max_new, float(tick))
        tick += 1
        assert tick < max_steps, "scheduler made no progress"
        plan = core.schedule()
        if plan is not None:
            inflight.append(worker.step(plan))
            if len(inflight) < 2 and core.has_work:
                continue
        if inflight:
            for u in core.apply(inflight.popleft()):
                updates.setdefault(u.rid, []).append(u)
    return updates


def outputs(updates: dict[str, list[RequestUpdate]]) -> dict[str, list[int]]:
    out = {}
    for rid, us in updates.items():
        assert sum(u.finish_reason is not None for u in us) == 1, f"{rid}: exactly one final update"
        assert us[-1].finish_reason is not None
        out[rid] = [t for u in us for t in u.token_ids]
    return out


def make(num_slots: int = 4096, **kw: object) -> tuple[SchedulerCore, FakeWorker]:
    cfg = SchedulerConfig(num_slots=num_slots, max_rows=64, **kw)  # type: ignore[arg-type]
    return SchedulerCore(cfg), FakeWorker(num_slots, 64, 4096)


def test_single_request_matches_reference() -> None:
    core, worker = make()
    prompt = [5, 9, 11, 2, 40]
    got = outputs(run(core, worker, {0: [("a", prompt, 20)]}))
    assert got["a"] == reference_generate(prompt, 20, {STOP})
    core.check_integrity()


@pytest.mark.parametrize("overlap", [True, False])
@pytest.mark.parametrize("policy", ["lpm", "fcfs"])
def test_staggered_batch_with_chunks_and_retraction(overlap: bool, policy: str) -> None:
    rng = random.Random(0)
    shared = [rng.randrange(4, VOCAB) for _ in range(40)]
    reqs = {}
    arrivals: dict[int, list] = {}
    for i in range(12):
        prompt = (shared if i % 2 else []) + [rng.randrange(4, VOCAB) for _ in range(rng.randrange(1, 90))]
        reqs[f"r{i}"] = (prompt, rng.randrange(1, 60))
        arrivals.setdefault(rng.randrange(0, 30), []).append((f"r{i}", prompt, reqs[f"r{i}"][1]))
    core, worker = make(num_slots=260, chunked_prefill_size=48, overlap=overlap, schedule_policy=policy,
                        new_token_ratio=0.05, min_new_token_ratio=0.0)  # over-admit: forces retraction
    got = outputs(run(core, worker, arrivals))
    for rid, (prompt, max_new) in reqs.items():
        assert got[rid] == reference_generate(prompt, max_new, {STOP}), rid
    assert core.num_retractions > 0, "the pool was meant to be small enough to force a retraction"
    core.check_integrity()
    assert core.kv.private_slots == 0


def test_retraction_leaves_room_for_many_steps() -> None:
    """Over-admitted requests run out of slots while decoding: each round of retractions (a pipeline drain)
    frees room for RETRACT_HEADROOM_STEPS steps of the rest, rather than the one step that ran short."""
    rng = random.Random(5)
    prompts = {f"r{i}": [rng.randrange(4, VOCAB) for _ in range(20)] for i in range(32)}
    core, worker = make(num_slots=900, chunked_prefill_size=256, new_token_ratio=0.05,
                        min_new_token_ratio=0.0)
    got = outputs(run(core, worker, {0: [(rid, p, 100) for rid, p in prompts.items()]}))
    assert got == {rid: reference_generate(p, 100, {STOP}) for rid, p in prompts.items()}
    assert core.num_retraction_rounds > 0, "the pool was meant to run short"
    assert core.num_retractions >= 3 * core.num_retraction_rounds, (
        core.num_retractions, core.num_retraction_rounds)
    core.check_integrity()
    assert core.kv.private_slots == 0


def test_prefix_hit_skips_recomputation() -> None:
    core, worker = make()
    prefix = [random.Random(1).randrange(4, VOCAB) for _ in range(1000)]
    run(core, worker, {0: [("first", prefix + [7, 8], 4)]})
    before = worker.tokens_computed
    got = outputs(run(core, worker, {0: [("second", prefix + [9, 10, 11], 1)]}))
    assert worker.tokens_computed - before == 3  # only the 3 new prompt tokens
    assert got["second"] == reference_generate(prefix + [9, 10, 11], 1, {STOP})
    core.check_integrity()


@pytest.mark.parametrize("policy", ["lpm", "fcfs"])
def test_concurrent_requests_share_a_system_prompt_computed_once(policy: str) -> None:
    """16 requests with one 300-token system prompt arrive together: admission holds back those whose head
    another request is computing, and the prompt enters the tree once prefilled (not at the finish), so
    the system prompt is computed about once, while the requests still run concurrently."""
    rng = random.Random(2)
    system = [rng.randrange(4, VOCAB) for _ in range(300)]
    prompts = {f"r{i}": system + [rng.randrange(4, VOCAB) for _ in range(10)] for i in range(16)}
    core, worker = make(schedule_policy=policy, chunked_prefill_size=1024)
    got = outputs(run(core, worker, {0: [(rid, p, 40) for rid, p in prompts.items()]}))
    assert got == {rid: reference_generate(p, 40, {STOP}) for rid, p in prompts.items()}
    prompt_tokens = core.num_prefill_tokens
    assert prompt_tokens <= 300 + 16 * 11, f"{prompt_tokens} prompt tokens computed"
    assert core.num_cached_prompt_tokens >= 15 * 299
    assert core.num_forward_steps <= 45, "the others waited for the first to finish, not to prefill"
    # Decode plans said which rows share the system prompt's slots (the fake worker checks every value).
    assert worker.shared_rows >= 15 * 20
    core.check_integrity()


def test_mixed_steps_say_which_decode_rows_share_a_prefix() -> None:
    """Requests under one system prompt decode while later ones prefill: the mixed steps' leading decode rows
    carry shared_lens too (the attention backend may cascade them apart from the prompt rows); the fake
    worker checks every value against its table."""
    rng = random.Random(3)
    system = [rng.randrange(4, VOCAB) for _ in range(200)]

    def prompt() -> list[int]:
        return system + [rng.randrange(4, VOCAB) for _ in range(30)]

    arrivals = {tick: [(f"r{tick}-{i}", prompt(), 30) for i in range(4)] for tick in (0, 6, 12, 18)}
    core, worker = make(chunked_prefill_size=64)
    got = outputs(run(core, worker, arrivals))
    assert got == {rid: reference_generate(p, n, {STOP}) for wave in arrivals.values() for rid, p, n in wave}
    assert worker.shared_mixed_steps >= 3, worker.shared_mixed_steps
    core.check_integrity()


def test_a_prompt_cached_by_another_request_is_not_retried_every_step() -> None:
    """Two requests with one 20-token prompt (too short for admission's hold-back) prefill in the same step:
    the first hands the prompt to the tree, the second's copy is a duplicate. It tries once, not at every
    decode step (that cost a tree walk per row and step)."""
    prompt = list(range(4, 24))
    core, worker = make()
    walks = 0
    match = core.kv.tree.match_prefix

    def counting_match(tokens: list[int]) -> object:
        nonlocal walks
        walks += 1
        return match(tokens)

    core.kv.tree.match_prefix = counting_match  # type: ignore[method-assign]
    got = outputs(run(core, worker, {0: [("a", prompt, 30), ("b", prompt, 30)]}))
    assert got["a"] == got["b"] == reference_generate(prompt, 30, {STOP})
    assert walks <= 8, f"{walks} tree walks for two requests"
    core.check_integrity()


def test_disabled_cache_recomputes() -> None:
    core, worker = make(disable_radix_cache=True)
    prefix = list(range(4, 60))
    run(core, worker, {0: [("a", prefix, 2)]})
    before = worker.tokens_computed
    run(core, worker, {0: [("b", prefix + [5], 1)]})
    assert worker.tokens_computed - before == len(prefix) + 1
    core.check_integrity()
    assert core.kv.tree.evictable_size == 0


def test_abort_waiting_and_running() -> None:
    core, worker = make()
    submit(core, "run", list(range(4, 30)), 1000, 0.0)
    plan = core.schedule()
    assert plan is not None
    result = worker.step(plan)
    submit(core, "wait", [4, 5, 6], 10, 1.0)
    [u] = core.abort("wait", AbortReason.CLIENT)
    assert u.finish_reason == FinishReason.ABORT
    plan2 = core.schedule()  # "run" decodes while step 0 is still in flight
    [u] = core.abort("run", AbortReason.CLIENT)
    assert u.finish_reason == FinishReason.ABORT
    assert core.abort("run", AbortReason.CLIENT) == []  # idempotent
    assert core.apply(result) == []  # its token is dropped: the request already finished
    assert plan2 is not None
    assert core.apply(worker.step(plan2)) == []
    assert not core.has_work
    core.check_integrity()


def test_max_new_tokens_zero_is_prefill_only() -> None:
    core, worker = make(chunked_prefill_size=16)
    got = run(core, worker, {0: [("p", list(range(4, 50)), 0)]})
    [u] = got["p"]
    assert u.token_ids == [] and u.finish_reason == FinishReason.LENGTH
    assert worker.tokens_computed == 46
    core.check_integrity()


def test_stop_token_reports_matched_stop() -> None:
    core, worker = make()
    prompt = next(p for p in ([i, i + 1] for i in range(4, 60)) if STOP in reference_generate(p, 50, {STOP}))
    got = run(core, worker, {0: [("s", prompt, 50)]})
    assert got["s"][-1].finish_reason == FinishReason.STOP and got["s"][-1].matched_stop == STOP
    assert [t for u in got["s"] for t in u.token_ids][-1] == STOP


def test_overlap_keeps_every_decoding_request_in_every_step() -> None:
    """With two steps in flight, a decode row refers to the previous step's sample: no request sits out."""
    core, worker = make()
    for i in range(8):  # no stop ids: every request runs its 40 tokens
        core.submit(SubmitRequest(f"r{i}", [5 + i, 6, 7], SamplingParams(), 40, [], 0.0))
    sizes: list[int] = []
    inflight: deque = deque()
    while core.has_work or inflight:
        plan = core.schedule()
        if plan is not None:
            sizes.append(len(plan.req_rows) // 4)
            inflight.append(worker.step(plan))
            if len(inflight) < 2:
                continue
        core.apply(inflight.popleft())
    # One prefill step for all 8, then 39 decode steps of all 8 rows (the 40th token comes from step 39).
    assert sizes[0] == 8 and all(n == 8 for n in sizes[1:39]), sizes


@pytest.mark.parametrize("seed", range(12))
def test_random_workloads_match_the_reference(seed: int) -> None:
    """Random arrivals, prompts under a few shared heads, small pools (retraction rounds), chunk budgets and
    both policies, with and without overlap: every output equals the reference model's, and the fake worker
    checks each plan's shared_lens against its table."""
    rng = random.Random(seed)
    heads = [[rng.randrange(4, VOCAB) for _ in range(rng.randrange(20, 120))] for _ in range(3)]
    reqs: dict[str, tuple[list[int], int]] = {}
    arrivals: dict[int, list] = {}
    for i in range(rng.randrange(16, 40)):
        head = rng.choice(heads) if rng.random() < 0.7 else []
        prompt = head + [rng.randrange(4, VOCAB) for _ in range(rng.randrange(1, 60))]
        reqs[f"r{i}"] = (prompt, rng.randrange(1, 80))
        arrivals.setdefault(rng.randrange(0, 40), []).append((f"r{i}", prompt, reqs[f"r{i}"][1]))
    core, worker = make(
        num_slots=rng.choice([300, 400, 4096]), chunked_prefill_size=rng.choice([16, 48, 256]),
        overlap=rng.random() < 0.8, schedule_policy=rng.choice(["lpm", "fcfs"]),
        new_token_ratio=rng.choice([0.0, 0.7]), min_new_token_ratio=0.0,
    )
    got = outputs(run(core, worker, arrivals))
    assert got == {rid: reference_generate(p, n, {STOP}) for rid, (p, n) in reqs.items()}
    core.check_integrity()
    assert core.kv.private_slots == 0
