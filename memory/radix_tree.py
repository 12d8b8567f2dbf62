"""RadixAttention prefix cache: a radix tree from token sequences to KV slot ids (token-level, page size 1).

Every non-root node holds a non-empty run of tokens (`key`) and the slots of their KV (`value`, same length);
a path from the root spells a cached prefix. Nodes in use by running requests are locked (`lock_ref > 0` on
the node and all its ancestors); unlocked leaves are evicted least-recently-used, their slots going back to
the `SlotAllocator`. Every slot in the tree is owned by the tree and counted once, in `evictable_size`
(unlocked nodes) or in `locked_size` (locked nodes), so that when idle: free + evictable + locked == total.

NOTE: a node object keeps its identity as the *deeper* half when split, so a `last_node` a caller holds (and
locked) stays valid: the new upper half inherits its lock_ref and access time.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from radixserve.memory.kv_pool import SlotAllocator

_TOKEN_DTYPE = np.int64
_SLOT_DTYPE = np.int32


class TreeNode:
    """One edge of the tree: `key` tokens [n] int64 and their `value` slots [n] int32 (empty only at root)."""

    __slots__ = ("children", "parent", "key", "value", "lock_ref", "last_access")

    def __init__(self, key: np.ndarray, value: np.ndarray, parent: TreeNode | None, last_access: int) -> None:
        self.children: dict[int, TreeNode] = {}  # keyed by the child's first token
        self.parent = parent
        self.key = key
        self.value = value
        self.lock_ref = 0
        self.last_access = last_access

    def __repr__(self) -> str:
        return f"TreeNode(len={len(self.key)}, lock_ref={self.lock_ref}, children={len(self.children)})"


class MatchResult(NamedTuple):
    slots: np.ndarray  # [matched] int32 slot ids of the matched prefix (a fresh array the caller may keep)
    last_node: TreeNode  # deepest node of the match (root when nothing matched); pass to lock/unlock


def _common_len(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the common prefix of a and b, O(min(len)) in numpy."""
    m = min(len(a), len(b))
    diff = np.flatnonzero(a[:m] != b[:m])
    return int(diff[0]) if len(diff) else m


class RadixTree:
    """Prefix cache over a `SlotAllocator`. Scheduler side, single-threaded; not safe to share across tasks
    that interleave a match and its lock with other mutations.

    Ownership: slots passed to `insert` past the returned prefix length become the tree's; the tree frees
    them to the allocator only in `evict` and `reset`. Slots the tree returns from `match_prefix` stay the
    tree's: a caller that keeps using them must `lock` the returned `last_node` before anything else can
    evict (i.e. right after the match, before any `insert` or `evict`) and `unlock` it when done.
    """

    def __init__(self, allocator: SlotAllocator) -> None:
        self.allocator = allocator
        self._clock = itertools.count(1)  # logical LRU clock: deterministic, no ties between operations
        self.root = TreeNode(np.empty(0, _TOKEN_DTYPE), np.empty(0, _SLOT_DTYPE), None, 0)
        self._evictable = 0
        self._locked = 0

    @property
    def evictable_size(self) -> int:
        """Tokens (= slots) held in unlocked nodes."""
        return self._evictable

    @property
    def locked_size(self) -> int:
        """Tokens (= slots) held in locked nodes."""
        return self._locked

    # ---- lookup and insertion ------------------------------------------------------------------------------

    def match_prefix(self, tokens: Sequence[int] | np.ndarray) -> MatchResult:
        """Longest cached prefix of `tokens`.

        Mutates: splits the node where the match ends inside it (sizes unchanged), and refreshes the access
        time of every node on the matched path. Requires no lock; lock `last_node` before the next mutation
        if the slots are to be used.
        """
        key = np.asarray(tokens, dtype=_TOKEN_DTYPE)
        now = next(self._clock)
        node, pos, values = self.root, 0, []
        while pos < len(key):
            child = node.children.get(int(key[pos]))
            if child is None:
                break
            n = _common_len(child.key, key[pos:])
            if n < len(child.key):
                child = self._split(child, n)  # the unmatched lower half keeps its old access time
            child.last_access = now
            values.append(child.value)
            pos += n
            node = child
        slots = np.concatenate(values) if values else np.empty(0, _SLOT_DTYPE)
        return MatchResult(slots, node)

    def insert(self, tokens: Sequence[int] | np.ndarray, slots: np.ndarray | Sequence[int]) -> int:
        """Cache `tokens` -> `slots` (equal lengths); return how many leading tokens were already cached.

        Ownership: the tree takes slots[prefix_len:]. Positions [:prefix_len] were cached already: whatever
        the caller passed there stays the caller's. Its own slots there are duplicates it must free; slots it
        got from `match_prefix` for those positions are the tree's and must not be freed.
        Mutates: may split one node, adds at most one leaf (unlocked, counted evictable), refreshes access
        times along the path. Requires no lock (a caller passing matched slots keeps that match locked).
        """
        key = np.asarray(tokens, dtype=_TOKEN_DTYPE)
        value = np.asarray(slots, dtype=_SLOT_DTYPE)
        if key.ndim != 1 or key.shape != value.shape:
            raise ValueError(
                f"insert needs 1-D tokens and slots of equal length, got {key.shape}, {value.shape}"
            )
        now = next(self._clock)
        node, pos = self.root, 0
        while pos < len(key):
            child = node.children.get(int(key[pos]))
            if child is None:
                # Copies: the tree must not alias the caller's arrays.
                leaf = TreeNode(key[pos:].copy(), value[pos:].copy(), node, now)
                node.children[int(key[pos])] = leaf
                self._evictable += len(leaf.key)
                return pos
            n = _common_len(child.key, key[pos:])
            if n < len(child.key):
                child = self._split(child, n)
            child.last_access = now
            pos += n
            node = child
        return pos

    def _split(self, child: TreeNode, n: int) -> TreeNode:
        """Cut `child` after its first n tokens (0 < n < len); return the new upper node. Sizes unchanged."""
        parent = child.parent
        assert parent is not None and 0 < n < len(child.key)
        upper = TreeNode(child.key[:n], child.value[:n], parent, child.last_access)
        upper.lock_ref = child.lock_ref
        child.key, child.value = child.key[n:], child.value[n:]
        child.parent = upper
        upper.children[int(child.key[0])] = child
        parent.children[int(upper.key[0])] = upper
        return upper

    # ---- locking -------------------------------------------------------------------------------------------

    def lock(self, node: TreeNode) -> None:
        """lock_ref += 1 on `node` and each ancestor except the root (a no-op for the root).

        Mutates lock refs; a node going 0 -> 1 moves its size from evictable to locked. `node` must be in
        the tree (a `last_node` from a match with no eviction since).
        """
        if node is not self.root and node.parent is None:
            raise RuntimeError(f"lock of a node that is no longer in the tree: {node!r}")
        while node is not self.root:
            if node.lock_ref == 0:
                self._evictable -= len(node.key)
                self._locked += len(node.key)
            node.lock_ref += 1
            assert node.parent is not None
            node = node.parent

    def unlock(self, node: TreeNode) -> None:
        """Undo one `lock(node)`: lock_ref -= 1 on `node` and each ancestor except the root.

        Mutates lock refs; a node going 1 -> 0 moves its size from locked to evictable. Raises RuntimeError
        (changing nothing) when `node` is not locked: ancestors are locked at least as often as descendants.
        """
        if node is not self.root and node.lock_ref <= 0:
            raise RuntimeError(f"unlock of a node that is not locked: {node!r}")
        while node is not self.root:
            node.lock_ref -= 1
            if node.lock_ref == 0:
                self._locked -= len(node.key)
                self._evictable += len(node.key)
            assert node.parent is not None
            node = node.parent

    # ---- eviction ------------------------------------------------------------------------------------------

    def evict(self, num_tokens: int) -> int:
        """Free at least `num_tokens` slots to the allocator if the unlocked leaves allow; return slots freed.

        Evicts whole unlocked leaves, least recently used first; a parent left childless and unlocked becomes
        a candidate in turn. Never touches locked nodes. Mutates: removes nodes, evictable_size, allocator.
        """
        if num_tokens <= 0:
            return 0
        tie = itertools.count()  # nodes do not compare; equal access times pop in discovery order
        heap = [(leaf.last_access, next(tie), leaf) for leaf in self._unlocked_leaves()]
        heapq.heapify(heap)
        freed: list[np.ndarray] = []
        num_freed = 0
        while num_freed < num_tokens and heap:
            _, _, leaf = heapq.heappop(heap)
            parent = leaf.parent
            assert parent is not None
            del parent.children[int(leaf.key[0])]
            leaf.parent = None  # marks it detached, see lock()
            freed.append(leaf.value)
            num_freed += len(leaf.value)
            self._evictable -= len(leaf.value)
            if parent is not self.root and not parent.children and parent.lock_ref == 0:
                heapq.heappush(heap, (parent.last_access, next(tie), parent))
        if freed:
            self.allocator.free(np.concatenate(freed))
        return num_freed

    def _unlocked_leaves(self) -> list[TreeNode]:
        leaves, stack = [], list(self.root.children.values())
        while stack:
            node = stack.pop()
            if node.children:
                stack.extend(node.children.values())
            elif node.lock_ref == 0:
                leaves.append(node)
        return leaves

    def reset(self) -> None:
        """Flush the cache: free every slot to the allocator. Raises RuntimeError when anything is locked."""
        if self._locked:
            raise RuntimeError(f"reset of a radix tree with {self._locked} locked tokens")
        values = [node.value for node in self._walk()]
        if values:
            self.allocator.free(np.concatenate(values))
        for node in self._walk():
            node.parent = None
        self.root.children = {}
        self._evictable = 0

    def _walk(self) -> list[TreeNode]:
        """Every non-root node, parents before children."""
        out, stack = [], list(self.root.children.values())
        while stack:
            node = stack.pop()
            out.append(node)
            stack.extend(node.children.values())
        return out

    # ---- integrity -----------------------------------------------------------------------------------------

    def check_integrity(self, slots_held_outside: int = 0) -> None:
        """Raise AssertionError unless the tree's invariants and free + evictable + locked + held == total.

        `slots_held_outside`: slots callers hold that are neither free nor in the tree (e.g. running requests'
        uncached tokens). Mutates nothing.
        """
        self.allocator.check_integrity()
        evictable = locked = 0
        values: list[np.ndarray] = []
        for node in self._walk():
            parent = node.parent
            if parent is None:
                raise AssertionError(f"RadixTree: {node!r} in the tree has no parent")
            if len(node.key) == 0:
                raise AssertionError(f"RadixTree: empty non-root node {node!r}")
            if len(node.key) != len(node.value):
                raise AssertionError(
                    f"RadixTree: {node!r} has {len(node.key)} tokens, {len(node.value)} slots"
                )
            if parent.children.get(int(node.key[0])) is not node:
                raise AssertionError(f"RadixTree: {node!r} is not keyed by its first token in its parent")
            if node.lock_ref < 0:
                raise AssertionError(f"RadixTree: negative lock_ref on {node!r}")
            if sum(c.lock_ref for c in node.children.values()) > node.lock_ref:
                raise AssertionError(f"RadixTree: {node!r} is locked less than its children together")
            if node.lock_ref:
                locked += len(node.key)
            else:
                evictable += len(node.key)
            values.append(node.value)
        if (evictable, locked) != (self._evictable, self._locked):
            raise AssertionError(
                f"RadixTree: walk finds evictable={evictable} locked={locked}, "
                f"counters say evictable={self._evictable} locked={self._locked}"
            )
        in_tree = np.concatenate(values) if values else np.empty(0, _SLOT_DTYPE)
        if len(np.unique(in_tree)) != len(in_tree):
            raise AssertionError("RadixTree: a slot appears twice in the tree")
        if len(in_tree) and (in_tree.min() < 1 or in_tree.max() >= self.allocator.num_slots):
            raise AssertionError("RadixTree: a slot id in the tree is out of range (or the padding slot 0)")
        both = np.intersect1d(in_tree, np.asarray(self.allocator._free, dtype=_SLOT_DTYPE))
        if len(both):
            raise AssertionError(
                f"RadixTree: slots both in the tree and on the free list: {both[:8].tolist()}"
            )
        free, total = self.allocator.available_size, self.allocator.total_size
        if free + evictable + locked + slots_held_outside != total:
            raise AssertionError(
                f"RadixTree: free {free} + evictable {evictable} + locked {locked} + held outside "
                f"{slots_held_outside} = {free + evictable + locked + slots_held_outside} != total {total}"
            )
