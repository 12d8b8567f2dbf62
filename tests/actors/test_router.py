"""The data-parallel router alone: its prefix index, the cache-aware choice, the load-balance override."""

from __future__ import annotations

import random

import anyio
import pytest

from radixserve.actors.mailbox import mailbox
from radixserve.actors.messages import SchedulerInbox
from radixserve.actors.router import PrefixIndex, Router
from radixserve.errors import EngineDeadError


def make_router(n: int, **kwargs: object) -> Router:
    return Router([mailbox(SchedulerInbox, 8)[0] for _ in range(n)], **kwargs)  # type: ignore[arg-type]


def test_prefix_index_matches_splits_and_evicts_lru() -> None:
    index = PrefixIndex(capacity=95)
    index.insert([1, 2, 3, 4, 5])
    index.insert([1, 2, 3, 9])  # splits the first edge after 1, 2, 3
    assert index.size == 6
    assert index.match_len([1, 2, 3, 4, 5, 6]) == 5
    assert index.match_len([1, 2, 3, 9]) == 4
    assert index.match_len([1, 2, 7]) == 2
    assert index.match_len([8]) == 0
    index.insert(list(range(100, 190)))  # 96 tokens > 95: the old leaves go, never the newest path
    assert index.size == 90  # down to 85 at most: [4, 5], [9], then [1, 2, 3] once it became a leaf
    assert index.match_len(list(range(100, 190))) == 90
    assert index.match_len([1, 2, 3, 4, 5]) == 0


def test_prefix_index_against_brute_force() -> None:
    rng = random.Random(0)
    index = PrefixIndex(capacity=10**6)
    seqs: list[list[int]] = []
    for _ in range(200):
        base = rng.choice(seqs) if seqs and rng.random() < 0.7 else []
        seq = base[: rng.randint(0, len(base))] + [rng.randrange(5) for _ in range(rng.randint(1, 8))]
        seqs.append(seq)
        index.insert(seq)
        probe = rng.choice(seqs)[: rng.randint(1, 10)] + [rng.randrange(5)]

        def common(a: list[int], b: list[int]) -> int:
            n = 0
            while n < min(len(a), len(b)) and a[n] == b[n]:
                n += 1
            return n

        assert index.match_len(probe) == max(common(probe, s) for s in seqs)


def test_shared_prefix_goes_to_the_replica_that_has_it() -> None:
    router = make_router(2)
    prefix = list(range(1000, 1100))
    first = router.route("a", prefix + [1])
    others = [router.route(f"x{i}", [i, i + 1, i + 2]) for i in range(6)]
    assert set(others) == {0, 1}  # no shared prefix: least loaded, alternating
    assert router.route("b", prefix + [2]) == first


def test_short_matches_do_not_pull_requests() -> None:
    router = make_router(2, cache_threshold=0.5)
    router.route("a", [7, 1, 2, 3])
    # Shares only the first token (1/4 of the prompt): goes to the least loaded, the other replica.
    assert router.route("b", [7, 9, 9, 9]) != router.owner("a")


def test_overloaded_cache_holder_loses_to_the_least_loaded() -> None:
    router = make_router(2, balance_threshold=3)
    prefix = list(range(50))
    home = router.route("a", prefix + [0])
    for i in range(3):
        assert router.route(f"p{i}", prefix + [i + 1]) == home  # load gap 1, 2, 3: still within the threshold
    assert router.route("p3", prefix + [9]) != home  # gap 4 > 3
    for rid in ("a", "p0", "p1", "p2"):
        router.finished(rid)
    assert router.route("p4", prefix + [10]) == home  # load came back down


def test_dead_replicas_get_nothing_and_aborts_find_the_owner() -> None:
    router = make_router(3)
    rids = [f"r{i}" for i in range(6)]
    for rid in rids:
        router.route(rid, [hash(rid) % 100, 1, 2])
    owned = router.mark_dead(1)
    assert owned == [rid for rid in rids if router.owner(rid) == 1] and owned
    assert all(router.route(f"n{i}", [i]) != 1 for i in range(10))
    router.mark_dead(0)
    router.mark_dead(2)
    with pytest.raises(EngineDeadError):
        router.route("z", [1])


def test_stop_string_abort_goes_to_the_owning_replica(smollm_tokenizer) -> None:
    """The detokenizer finishes a request on a stop string and tells the scheduler of its own replica."""
    from radixserve.actors.detokenizer import Detokenizer
    from radixserve.actors.messages import (
        AbortReason,
        AbortRequest,
        DetokenizerInbox,
        IngressInbox,
        RegisterRequest,
        RequestUpdate,
        TokenBatch,
    )
    from radixserve.sampling_params import SamplingParams

    async def main() -> None:
        to_detok, detok_inbox = mailbox(DetokenizerInbox, 8)
        to_ingress, ingress_inbox = mailbox(IngressInbox, 8)
        schedulers = [mailbox(SchedulerInbox, 8) for _ in range(2)]
        detok = Detokenizer(smollm_tokenizer, detok_inbox, to_ingress, [s[0] for s in schedulers])
        prompt = smollm_tokenizer.encode("Say hi")
        await to_detok.send(RegisterRequest("r", prompt, SamplingParams(stop=["world"]), replica=1))
        await to_detok.send(TokenBatch([RequestUpdate("r", smollm_tokenizer.encode(" hello world again"))]))
        to_detok.close()
        await detok.run()
        assert schedulers[1][1].drain() == [AbortRequest("r", AbortReason.STOP_STRING)]
        assert schedulers[0][1].drain() == []
        assert ingress_inbox.drain()[0].outputs[0].matched_stop == "world"

    anyio.run(main)
