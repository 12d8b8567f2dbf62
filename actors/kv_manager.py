"""Scheduler-side KV ownership: slot allocation with eviction, prefix matching, caching finished requests.

Owns the SlotAllocator and the RadixTree. Every slot is in exactly one of: the free list, the tree
(evictable or locked), or a running request's private range `req.slots[req.prefix_len:]`.
"""

from __future__ import annotations

import numpy as np

from radixserve.actors.request_state import Req
from radixserve.memory.kv_pool import SlotAllocator
from radixserve.memory.radix_tree import RadixTree


class KVManager:
    def __init__(self, num_slots: int, disable_radix_cache: bool) -> None:
        self.allocator = SlotAllocator(num_slots)
        self.tree = RadixTree(self.allocator)
        self.cache_enabled = not disable_radix_cache
        self.private_slots = 0  # slots held by running requests outside the tree

    @property
    def total_slots(self) -> int:
        return self.allocator.total_size

    @property
    def available(self) -> int:
        """Slots obtainable now: free plus evictable."""
        return self.allocator.available_size + self.tree.evictable_size

    def alloc(self, n: int) -> np.ndarray | None:
        """n slots, evicting unlocked cache leaves if needed; None (nothing taken) when even that is short."""
        if n > self.allocator.available_size:
            self.tree.evict(n - self.allocator.available_size)
        slots = self.allocator.alloc(n)
        if slots is not None:
            self.private_slots += n
        return slots

    def match_and_lock(self, req: Req) -> None:
        """Point a waiting request at its longest cached prefix (leaving >= 1 token to compute) and lock it.

        Mutates req.slots/prefix_len/planned_len/last_node. Requests that want prompt logprobs match nothing:
        a cached prefix has no logits to report.
        """
        if not self.cache_enabled or req.params.prompt_logprobs is not None:
            req.slots, req.prefix_len, req.planned_len, req.last_node = [], 0, 0, None
            return
        match = self.tree.match_prefix(_lookup_key(req))
        self.tree.lock(match.last_node)
        req.cache_tried_len = 0
        req.last_node = match.last_node
        req.slots = match.slots.tolist()
        req.prefix_len = req.planned_len = len(req.slots)

    def cache_prefix(self, req: Req, length: int) -> None:
        """Hand the first `length` computed tokens of a running request to the tree now rather than at its
        release, so that requests admitted meanwhile reuse them (a shared system prompt is computed once).

        Only when the tree holds exactly the request's matched prefix of them: where another request cached
        the same tokens meanwhile, this request's slots are a second copy, which the worker's table keeps
        reading until the release (then they are freed as duplicates). Mutates req.prefix_len/last_node.
        """
        if (not self.cache_enabled or length <= max(req.prefix_len, req.cache_tried_len)
                or req.params.prompt_logprobs is not None):
            return
        assert length <= req.planned_len
        req.cache_tried_len = length
        tokens = req.token_array(length)
        if len(self.tree.match_prefix(tokens).slots) != req.prefix_len:
            return
        already = self.tree.insert(tokens, np.asarray(req.slots[:length], dtype=np.int32))
        assert already == req.prefix_len
        node = self.tree.match_prefix(tokens).last_node
        self.tree.lock(node)  # before unlocking the old path, which it extends
        if req.last_node is not None:
            self.tree.unlock(req.last_node)
        req.last_node = node
        self.private_slots -= length - req.prefix_len
        req.prefix_len = length

    def truncate(self, req: Req, length: int) -> None:
        """Free the request's private slots past `length` (jump-forward replaced those tokens); no issued step
        may still touch them. Mutates req.slots / planned_len."""
        assert req.inflight == 0 and req.prefix_len <= length <= req.planned_len == len(req.slots)
        dropped = req.slots[length:]
        del req.slots[length:]
        req.planned_len = length
        self.private_slots -= len(dropped)
        self.allocator.free(np.asarray(dropped, dtype=np.int32))

    def prefix_match_len(self, req: Req) -> int:
        """Tokens of the request's prompt (all but its last known token) the tree holds."""
        if not self.cache_enabled:
            return 0
        return len(self.tree.match_prefix(_lookup_key(req)).slots)

    def release(self, req: Req) -> None:
        """Give back every slot of a request whose issued steps have all completed (req.inflight == 0).

        With the cache on, the KV it computed (tokens[:planned_len], all valid inputs) goes into the tree;
        slots the tree already had from another request are duplicates and are freed.
        """
        assert req.inflight == 0, "releasing a request that still rides in an issued step"
        private = req.slots[req.prefix_len :]
        self.private_slots -= len(private)
        if self.cache_enabled and req.planned_len > 0:
            kv_tokens = req.token_array(req.planned_len)
            slots = np.asarray(req.slots[: req.planned_len], dtype=np.int32)
            already = self.tree.insert(kv_tokens, slots)
            self.allocator.free(slots[req.prefix_len : already])
        else:
            self.allocator.free(private)
        if req.last_node is not None:
            self.tree.unlock(req.last_node)
        req.slots, req.prefix_len, req.planned_len, req.last_node = [], 0, 0, None

    def flush(self) -> bool:
        """Drop the whole cache; only possible when no request holds any slot."""
        if self.private_slots or self.tree.locked_size:
            return False
        self.tree.reset()
        return True

    def check_integrity(self) -> None:
        self.allocator.check_integrity()
        self.tree.check_integrity(slots_held_outside=self.private_slots)


def _lookup_key(req: Req) -> np.ndarray:
    """The tokens a waiting request looks up in the tree: all it knows but the last, which a step must
    compute to get logits for the next token."""
    return req.token_array(len(req.prompt_ids) + len(req.output_ids) - 1)
