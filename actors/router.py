"""Data-parallel routing: which replica (scheduler + worker group, each with its own radix tree and KV pool)
serves a request. Cache-aware, after SGLang's router:

    best  = the live replica whose prefix index holds the longest prefix of the prompt
    least = the live replica with the fewest outstanding requests (ties: the smaller index, i.e. more room)
    route to best   if best's match >= cache_threshold * prompt length
                    and load(best) - load(least) <= balance_threshold
    else     least

The router does not read the schedulers' radix trees (they belong to other actors): it keeps its own
approximate `PrefixIndex` per replica of the prompts it routed there, trimmed least-recently-used to the
replica's KV pool size, as SGLang's router keeps a tree of the texts it routed. Load is the router's own count
of requests routed to a replica and not yet finished (waiting + running there).

Owned by the ingress actor and mutated only from it (route on submit, `finished` when a request's last output
passes, `mark_dead` when a replica's workers die), so it needs no lock.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

from radixserve.actors.mailbox import Outbox
from radixserve.actors.messages import SchedulerInbox
from radixserve.errors import EngineDeadError


class _Node:
    __slots__ = ("children", "parent", "key", "last_access")

    def __init__(self, key: np.ndarray, parent: _Node | None, last_access: int) -> None:
        self.children: dict[int, _Node] = {}  # keyed by the child's first token
        self.parent = parent
        self.key = key  # the edge's tokens, non-empty except at the root
        self.last_access = last_access


def _common_len(a: np.ndarray, b: np.ndarray) -> int:
    m = min(len(a), len(b))
    diff = np.flatnonzero(a[:m] != b[:m])
    return int(diff[0]) if len(diff) else m


class PrefixIndex:
    """Token sequences routed to one replica, as a radix tree without values; at most `capacity` tokens.

    Mutates only itself. `insert` refreshes the access time of the whole path; past `capacity` the least
    recently used leaves go first (down to 90% of it, so that eviction is amortized), never the path just
    inserted (so one prompt longer than `capacity` may stay over it until the next insert).
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"PrefixIndex capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.size = 0  # tokens held
        self._clock = itertools.count(1)
        self.root = _Node(np.empty(0, dtype=np.int64), None, 0)

    def match_len(self, tokens: Sequence[int]) -> int:
        """Length of the longest prefix of `tokens` in the index (read-only)."""
        key = np.asarray(tokens, dtype=np.int64)
        node, matched = self.root, 0
        while matched < len(key):
            child = node.children.get(int(key[matched]))
            if child is None:
                break
            n = _common_len(child.key, key[matched:])
            matched += n
            if n < len(child.key):
                break
            node = child
        return matched

    def insert(self, tokens: Sequence[int]) -> None:
        key = np.asarray(tokens, dtype=np.int64)
        now = next(self._clock)
        node, i = self.root, 0
        node.last_access = now
        while i < len(key):
            child = node.children.get(int(key[i]))
            if child is None:
                node.children[int(key[i])] = _Node(key[i:].copy(), node, now)
                self.size += len(key) - i
                break
            n = _common_len(child.key, key[i:])
            if n < len(child.key):  # split: a new upper node takes the common part
                upper = _Node(child.key[:n], node, now)
                node.children[int(key[i])] = upper
                child.key = child.key[n:]
                child.parent = upper
                upper.children[int(child.key[0])] = child
                child = upper
            child.last_access = now
            node, i = child, i + n
        if self.size > self.capacity:
            self._evict(self.size - int(self.capacity * 0.9), keep=now)

    def _evict(self, tokens: int, keep: int) -> None:
        while tokens > 0:
            leaves = sorted((n for n in self._leaves() if n.last_access != keep), key=lambda n: n.last_access)
            if not leaves:
                return
            for leaf in leaves:
                if tokens <= 0:
                    break
                assert leaf.parent is not None
                del leaf.parent.children[int(leaf.key[0])]
                self.size -= len(leaf.key)
                tokens -= len(leaf.key)

    def _leaves(self) -> list[_Node]:
        out, stack = [], list(self.root.children.values())
        while stack:
            node = stack.pop()
            if node.children:
                stack.extend(node.children.values())
            else:
                out.append(node)
        return out


class Router:
    """Picks a live replica for each request and remembers it until the request finishes (for aborts)."""

    def __init__(
        self,
        schedulers: Sequence[Outbox[SchedulerInbox]],
        index_capacity: Sequence[int] | None = None,
        balance_threshold: int = 32,
        cache_threshold: float = 0.3,
    ) -> None:
        if not schedulers:
            raise ValueError("a router needs at least one replica")
        n = len(schedulers)
        self.schedulers = list(schedulers)
        self.balance_threshold = balance_threshold
        self.cache_threshold = cache_threshold
        # With one replica there is nothing to choose: no index is kept.
        capacity = list(index_capacity) if index_capacity is not None else [1 << 20] * n
        self.indexes = [PrefixIndex(c) for c in capacity] if n > 1 else []
        self.load = [0] * n  # outstanding requests per replica
        self.routed = [0] * n  # requests ever routed per replica
        self.dead = [False] * n
        self._owner: dict[str, int] = {}

    @property
    def num_replicas(self) -> int:
        return len(self.schedulers)

    @property
    def all_dead(self) -> bool:
        return all(self.dead)

    def is_dead(self, replica: int) -> bool:
        return self.dead[replica]

    def route(self, rid: str, tokens: Sequence[int]) -> int:
        """The replica for `rid`; counts it as outstanding there until `finished(rid)`."""
        live = [i for i, d in enumerate(self.dead) if not d]
        if not live:
            raise EngineDeadError("every data-parallel replica has died")
        replica = live[0] if len(self.schedulers) == 1 else self._choose(live, tokens)
        self._owner[rid] = replica
        self.load[replica] += 1
        self.routed[replica] += 1
        return replica

    def _choose(self, live: list[int], tokens: Sequence[int]) -> int:
        least = min(live, key=lambda i: (self.load[i], self.indexes[i].size, i))
        matches = {i: self.indexes[i].match_len(tokens) for i in live}
        best = max(live, key=lambda i: (matches[i], -self.load[i], -i))
        cached = matches[best] > 0 and matches[best] >= self.cache_threshold * len(tokens)
        replica = best if cached and self.load[best] - self.load[least] <= self.balance_threshold else least
        self.indexes[replica].insert(tokens)
        return replica

    def owner(self, rid: str) -> int | None:
        return self._owner.get(rid)

    def scheduler(self, replica: int) -> Outbox[SchedulerInbox]:
        return self.schedulers[replica]

    def finished(self, rid: str) -> None:
        """`rid` is over (finished, failed or never submitted): it no longer loads its replica."""
        replica = self._owner.pop(rid, None)
        if replica is not None:
            self.load[replica] -= 1

    def mark_dead(self, replica: int) -> list[str]:
        """No request goes to `replica` any more; returns the ids of the requests it still owned."""
        self.dead[replica] = True
        if self.indexes:
            self.indexes[replica] = PrefixIndex(1)
        return [rid for rid, r in self._owner.items() if r == replica]

    def stats(self, replica: int) -> dict[str, int | bool]:
        return {
            "routed_requests": self.routed[replica],
            "outstanding_requests": self.load[replica],
            "index_tokens": self.indexes[replica].size if self.indexes else 0,
            "dead": self.dead[replica],
        }
