from __future__ import annotations

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from radixserve.memory.kv_pool import SlotAllocator
from radixserve.memory.radix_tree import MatchResult, RadixTree, TreeNode


def make(num_slots: int = 64) -> tuple[SlotAllocator, RadixTree]:
    alloc = SlotAllocator(num_slots)
    return alloc, RadixTree(alloc)


def put(alloc: SlotAllocator, tree: RadixTree, tokens: list[int]) -> np.ndarray:
    """Insert as a caller would: fresh slots, free the duplicated prefix. Returns the slots allocated."""
    slots = alloc.alloc(len(tokens))
    assert slots is not None
    prefix = tree.insert(tokens, slots)
    alloc.free(slots[:prefix])
    return slots


def nodes(tree: RadixTree) -> list[TreeNode]:
    out, stack = [], [tree.root]
    while stack:
        node = stack.pop()
        out.append(node)
        stack.extend(node.children.values())
    return out


# ---- match / insert / split --------------------------------------------------------------------------------


def test_empty_tree_matches_nothing() -> None:
    _, tree = make()
    res = tree.match_prefix([1, 2, 3])
    assert isinstance(res, MatchResult)
    assert res.slots.dtype == np.int32 and len(res.slots) == 0
    assert res.last_node is tree.root
    assert tree.match_prefix([]).last_node is tree.root
    tree.check_integrity()


def test_insert_then_match_full_and_longer() -> None:
    alloc, tree = make()
    slots = put(alloc, tree, [1, 2, 3, 4])
    assert tree.evictable_size == 4 and tree.locked_size == 0
    res = tree.match_prefix([1, 2, 3, 4])
    assert res.slots.tolist() == slots.tolist()
    res = tree.match_prefix(np.array([1, 2, 3, 4, 5, 6], dtype=np.int32))
    assert res.slots.tolist() == slots.tolist()
    assert res.last_node.key.tolist() == [1, 2, 3, 4]
    assert tree.match_prefix([2, 1]).last_node is tree.root
    tree.check_integrity()


def test_match_ending_inside_a_node_splits_it() -> None:
    alloc, tree = make()
    slots = put(alloc, tree, [1, 2, 3, 4, 5])
    res = tree.match_prefix([1, 2, 9])
    assert res.slots.tolist() == slots[:2].tolist()
    assert res.last_node.key.tolist() == [1, 2]
    (lower,) = res.last_node.children.values()
    assert lower.key.tolist() == [3, 4, 5] and lower.value.tolist() == slots[2:].tolist()
    assert lower.parent is res.last_node and tree.root.children[1] is res.last_node
    assert tree.evictable_size == 5  # a split moves no tokens
    tree.check_integrity()


def test_insert_returns_cached_prefix_length() -> None:
    alloc, tree = make()
    put(alloc, tree, [1, 2, 3])
    assert tree.insert([1, 2, 3], np.array([10, 11, 12])) == 3  # nothing taken
    fresh = alloc.alloc(5)
    assert fresh is not None
    assert tree.insert([1, 2, 7, 8, 9], fresh) == 2  # diverges inside [1, 2, 3]: split
    alloc.free(fresh[:2])
    assert tree.evictable_size == 6
    assert tree.insert([1], np.array([5])) == 1  # a strict prefix is all duplicate
    # Ending inside [1, 2] splits it too (nodes are never merged back).
    assert sorted(n.key.tolist() for n in nodes(tree) if n is not tree.root) == [[1], [2], [3], [7, 8, 9]]
    assert tree.match_prefix([1, 2, 7, 8, 9]).slots.tolist()[2:] == fresh[2:].tolist()
    tree.check_integrity()


def test_insert_extending_a_leaf_and_with_matched_slots() -> None:
    alloc, tree = make()
    first = put(alloc, tree, [1, 2])
    res = tree.match_prefix([1, 2, 3, 4])
    tree.lock(res.last_node)
    tail = alloc.alloc(2)
    assert tail is not None
    # A running request inserts its whole sequence with the tree's own slots for the matched part.
    assert tree.insert([1, 2, 3, 4], np.concatenate([res.slots, tail])) == 2
    tree.unlock(res.last_node)
    assert tree.match_prefix([1, 2, 3, 4]).slots.tolist() == first.tolist() + tail.tolist()
    assert tree.evictable_size == 4
    tree.check_integrity()


def test_insert_rejects_length_mismatch() -> None:
    _, tree = make()
    with pytest.raises(ValueError, match="equal length"):
        tree.insert([1, 2, 3], np.array([1, 2], dtype=np.int32))


def test_tree_does_not_alias_caller_arrays() -> None:
    alloc, tree = make()
    tokens = np.array([4, 5, 6])
    slots = alloc.alloc(3)
    assert slots is not None
    tree.insert(tokens, slots)
    expected = slots.tolist()
    tokens[:] = 0
    slots[:] = 0
    res = tree.match_prefix([4, 5, 6])
    assert res.slots.tolist() == expected
    res.slots[:] = 0  # the match result is the caller's to keep or scribble on
    assert tree.match_prefix([4, 5, 6]).slots.tolist() == expected


# ---- lock / unlock -----------------------------------------------------------------------------------------


def test_lock_unlock_moves_sizes_along_the_path() -> None:
    alloc, tree = make()
    put(alloc, tree, [1, 2, 3])
    put(alloc, tree, [1, 2, 4, 5])  # tree: [1,2] -> {[3], [4,5]}
    leaf = tree.match_prefix([1, 2, 4, 5]).last_node
    tree.lock(leaf)
    assert (tree.locked_size, tree.evictable_size) == (4, 1)
    tree.lock(leaf)
    other = tree.match_prefix([1, 2, 3]).last_node
    tree.lock(other)
    assert (tree.locked_size, tree.evictable_size) == (5, 0)
    assert leaf.parent is not None and leaf.parent.lock_ref == 3
    tree.check_integrity()
    tree.unlock(leaf)
    tree.unlock(leaf)
    assert (tree.locked_size, tree.evictable_size) == (3, 2)
    tree.unlock(other)
    assert (tree.locked_size, tree.evictable_size) == (0, 5)
    tree.check_integrity()


def test_unlock_unlocked_raises_and_root_is_a_noop() -> None:
    alloc, tree = make()
    put(alloc, tree, [1, 2])
    node = tree.match_prefix([1, 2]).last_node
    with pytest.raises(RuntimeError, match="not locked"):
        tree.unlock(node)
    tree.lock(tree.root)
    tree.unlock(tree.root)
    assert tree.locked_size == 0 and tree.root.lock_ref == 0
    tree.check_integrity()


def test_lock_survives_a_later_split() -> None:
    alloc, tree = make()
    put(alloc, tree, [1, 2, 3, 4])
    node = tree.match_prefix([1, 2, 3, 4]).last_node
    tree.lock(node)
    upper = tree.match_prefix([1, 2]).last_node  # splits the locked node
    assert upper is not node and upper.lock_ref == 1 and node.parent is upper
    assert tree.locked_size == 4
    tree.check_integrity()
    tree.unlock(node)  # the held handle still unlocks the whole path
    assert upper.lock_ref == 0 and (tree.locked_size, tree.evictable_size) == (0, 4)
    tree.check_integrity()


def test_lock_of_evicted_node_raises() -> None:
    alloc, tree = make()
    put(alloc, tree, [1, 2])
    node = tree.match_prefix([1, 2]).last_node
    assert tree.evict(2) == 2
    with pytest.raises(RuntimeError, match="no longer in the tree"):
        tree.lock(node)


# ---- eviction ----------------------------------------------------------------------------------------------


def test_evict_least_recently_used_leaf_first() -> None:
    alloc, tree = make()
    a = put(alloc, tree, [1, 1])
    b = put(alloc, tree, [2, 2])
    put(alloc, tree, [3, 3])
    tree.match_prefix([1, 1])  # refresh a: b is now the oldest
    assert tree.evict(1) == 2  # whole leaves: at least 1, here 2
    assert set(b.tolist()) <= set(alloc._free)
    assert tree.match_prefix([2, 2]).last_node is tree.root
    assert tree.evict(1) == 2  # then [3, 3]
    assert tree.match_prefix([1, 1]).slots.tolist() == a.tolist()
    assert tree.evictable_size == 2
    tree.check_integrity()


def test_evict_partial_match_refreshes_only_the_matched_part() -> None:
    alloc, tree = make()
    put(alloc, tree, [1, 2, 3])
    put(alloc, tree, [5, 5])
    tree.match_prefix([1, 9])  # splits [1] | [2, 3]; only [1] is refreshed
    assert tree.evict(1) == 2  # [2, 3] is older than [5, 5]
    assert tree.match_prefix([1, 2, 3]).slots.shape == (1,)
    tree.check_integrity()


def test_evict_climbs_to_parents_and_skips_locked() -> None:
    alloc, tree = make()
    put(alloc, tree, [1, 2, 3])
    put(alloc, tree, [1, 2, 4])
    put(alloc, tree, [7, 8])
    locked = tree.match_prefix([7, 8]).last_node
    tree.lock(locked)
    assert tree.evictable_size == 4
    assert tree.evict(100) == 4  # both leaves, then their parent [1, 2]; never the locked [7, 8]
    assert tree.evictable_size == 0 and tree.locked_size == 2
    assert tree.match_prefix([1, 2]).last_node is tree.root
    assert tree.evict(1) == 0
    tree.check_integrity()
    tree.unlock(locked)
    assert tree.evict(1) == 2
    assert alloc.available_size == alloc.total_size
    tree.check_integrity()


def test_evict_keeps_locked_parent_of_unlocked_leaf() -> None:
    alloc, tree = make()
    put(alloc, tree, [1, 2, 3, 4])
    node = tree.match_prefix([1, 2]).last_node
    tree.lock(node)
    assert tree.evict(10) == 2
    assert tree.match_prefix([1, 2, 3, 4]).slots.shape == (2,)
    assert tree.evict(0) == 0
    tree.unlock(node)
    tree.check_integrity()


# ---- reset and integrity -----------------------------------------------------------------------------------


def test_reset_frees_everything_and_refuses_when_locked() -> None:
    alloc, tree = make()
    put(alloc, tree, [1, 2, 3])
    put(alloc, tree, [1, 4])
    node = tree.match_prefix([1, 4]).last_node
    tree.lock(node)
    with pytest.raises(RuntimeError, match="locked"):
        tree.reset()
    tree.check_integrity()
    tree.unlock(node)
    tree.reset()
    assert tree.evictable_size == 0 and not tree.root.children
    assert alloc.available_size == alloc.total_size
    tree.check_integrity()
    put(alloc, tree, [1, 2])  # usable after a reset
    tree.check_integrity()


def test_check_integrity_accounts_for_slots_held_outside() -> None:
    alloc, tree = make(16)
    put(alloc, tree, [1, 2, 3])
    held = alloc.alloc(4)
    assert held is not None
    with pytest.raises(AssertionError, match="!= total 15"):
        tree.check_integrity()
    tree.check_integrity(slots_held_outside=4)


def test_check_integrity_catches_a_tree_slot_on_the_free_list() -> None:
    alloc, tree = make(16)
    slots = put(alloc, tree, [1, 2, 3])
    alloc.free(slots[:1])
    with pytest.raises(AssertionError, match="both in the tree and on the free list"):
        tree.check_integrity()


def test_check_integrity_catches_broken_counters_and_nodes() -> None:
    alloc, tree = make(16)
    put(alloc, tree, [1, 2, 3])
    tree._evictable += 1
    with pytest.raises(AssertionError, match="counters say"):
        tree.check_integrity()
    tree._evictable -= 1
    node = tree.match_prefix([1, 2, 3]).last_node
    node.lock_ref = -1
    with pytest.raises(AssertionError, match="negative lock_ref"):
        tree.check_integrity()
    node.lock_ref = 0
    node.key = node.key[:0]
    with pytest.raises(AssertionError, match="empty non-root node"):
        tree.check_integrity()


def test_check_integrity_catches_a_slot_twice_in_the_tree() -> None:
    alloc, tree = make(16)
    a = put(alloc, tree, [1, 2])
    b = alloc.alloc(2)
    assert b is not None
    tree.insert([3, 4], np.array([a[0], b[0]]))
    alloc.free(b[1:])
    with pytest.raises(AssertionError, match="twice in the tree"):
        tree.check_integrity()


# ---- randomized model check --------------------------------------------------------------------------------

tokens_st = st.lists(st.integers(0, 2), min_size=1, max_size=8)


class RadixTreeMachine(RuleBasedStateMachine):
    """Drives the tree against a naive model: each cached prefix (a token tuple) -> slot of its last token."""

    def __init__(self) -> None:
        super().__init__()
        self.alloc = SlotAllocator(40)
        self.tree = RadixTree(self.alloc)
        self.cached: dict[tuple[int, ...], int] = {}
        self.touched: dict[tuple[int, ...], int] = {}  # prefix -> model time of its last match/insert
        self.clock = 0
        self.locks: list[tuple[tuple[int, ...], TreeNode]] = []

    def longest_cached(self, tokens: list[int]) -> int:
        n = 0
        while n < len(tokens) and tuple(tokens[: n + 1]) in self.cached:
            n += 1
        return n

    def touch(self, tokens: list[int], n: int) -> None:
        self.clock += 1
        for i in range(1, n + 1):
            self.touched[tuple(tokens[:i])] = self.clock

    def locked_prefixes(self) -> set[tuple[int, ...]]:
        return {key[:i] for key, _ in self.locks for i in range(1, len(key) + 1)}

    def check_match(self, tokens: list[int]) -> MatchResult:
        n = self.longest_cached(tokens)
        res = self.tree.match_prefix(tokens)
        assert res.slots.tolist() == [self.cached[tuple(tokens[: i + 1])] for i in range(n)]
        self.touch(tokens, n)
        return res

    @rule(tokens=tokens_st, reuse_match=st.booleans())
    def insert(self, tokens: list[int], reuse_match: bool) -> None:
        # With reuse_match, behave like a request: lock its match, use the tree's own slots for that part.
        matched = np.empty(0, np.int32)
        if reuse_match:
            matched = self.lock_match(tokens).slots
        need = len(tokens) - len(matched)
        if self.alloc.available_size < need:
            self.evict(need - self.alloc.available_size)
        fresh = self.alloc.alloc(need)
        if fresh is not None:
            expected = self.longest_cached(tokens)
            slots = np.concatenate([matched, fresh])
            assert self.tree.insert(tokens, slots) == expected
            self.alloc.free(slots[len(matched) : expected])  # our own duplicates only
            for i in range(expected, len(tokens)):
                self.cached[tuple(tokens[: i + 1])] = int(slots[i])
            self.touch(tokens, len(tokens))
        if reuse_match:
            self.tree.unlock(self.locks.pop()[1])

    @rule(tokens=tokens_st)
    def match(self, tokens: list[int]) -> None:
        self.check_match(tokens)

    def lock_match(self, tokens: list[int]) -> MatchResult:
        res = self.check_match(tokens)
        self.tree.lock(res.last_node)
        self.locks.append((tuple(tokens[: len(res.slots)]), res.last_node))
        return res

    @rule(tokens=tokens_st)
    def lock(self, tokens: list[int]) -> None:
        self.lock_match(tokens)

    @precondition(lambda self: self.locks)
    @rule(data=st.data())
    def unlock(self, data: st.DataObject) -> None:
        i = data.draw(st.integers(0, len(self.locks) - 1))
        _, node = self.locks.pop(i)
        self.tree.unlock(node)

    @rule(n=st.integers(0, 30))
    def evict(self, n: int) -> None:
        before = self.tree.evictable_size
        locked = self.locked_prefixes()
        freed = self.tree.evict(n)
        free = set(self.alloc._free)
        gone = {key for key, slot in self.cached.items() if slot in free}
        assert freed == len(gone) >= min(n, before)
        assert not gone & locked, "evicted locked content"
        for key in gone:
            del self.cached[key]
        assert all(len(key) == 1 or key[:-1] in self.cached for key in self.cached), "not prefix-closed"
        # LRU: nothing evicted was touched later than any unlocked leaf that stayed.
        parents = {key[:-1] for key in self.cached}
        leaves = [k for k in self.cached if k not in parents and k not in locked]
        if gone and leaves:
            assert max(self.touched[k] for k in gone) <= min(self.touched[k] for k in leaves)

    @invariant()
    def consistent(self) -> None:
        self.tree.check_integrity()
        locked = self.locked_prefixes()
        assert self.tree.locked_size == len(locked)
        assert self.tree.evictable_size == len(self.cached) - len(locked)
        # The tree's contents and LRU stamps, read without touching it, agree with the model.
        contents: dict[tuple[int, ...], int] = {}
        stamps: list[tuple[int, int]] = []
        stack: list[tuple[TreeNode, tuple[int, ...]]] = [(self.tree.root, ())]
        while stack:
            node, path = stack.pop()
            times = set()
            for tok, slot in zip(node.key.tolist(), node.value.tolist(), strict=True):
                path = (*path, tok)
                contents[path] = slot
                times.add(self.touched[path])
            if node is not self.tree.root:
                assert len(times) == 1, "tokens of one node touched at different times"
                stamps.append((node.last_access, times.pop()))
            stack.extend((child, path) for child in node.children.values())
        assert contents == self.cached
        model_times = [t for _, t in sorted(stamps)]
        assert model_times == sorted(model_times), "tree LRU order disagrees with the model"

    def teardown(self) -> None:
        for _, node in self.locks:
            self.tree.unlock(node)
        self.tree.reset()
        assert self.alloc.available_size == self.alloc.total_size
        self.tree.check_integrity()


RadixTreeMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
test_radix_tree_model = RadixTreeMachine.TestCase
