"""The scheduler's view of one request: its tokens, its KV slots and where it is in the step pipeline.

Token and KV bookkeeping (all lengths in tokens):

    tokens = prompt_ids + output_ids                 known on the host
    + 1 pending token                                sampled by an issued step whose result is not applied yet
    slots[0 : planned_len]                           KV slots of tokens[0 : planned_len]; planned_len counts
                                                     every issued step, so it runs ahead of the worker
    slots[0 : prefix_len]                            owned by the radix tree (matched at admission, or the
                                                     prompt, cached once computed; locked)
    slots[prefix_len : planned_len]                  owned by this request until it is cached or freed

Once finished, a request may still ride in steps already issued; its slots are released only when
`inflight` is back to zero, and any token sampled after the finish is recorded (its KV may have been
computed as the next step's input) but never reported.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

import numpy as np

from radixserve.outputs import FinishReason, TokenLogprob
from radixserve.sampling_params import SamplingParams

if TYPE_CHECKING:
    from radixserve.actors.grammar import GrammarState
    from radixserve.memory.radix_tree import TreeNode


class ReqStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    FINISHED = 2


class Req:
    __slots__ = (
        "rid", "params", "max_new_tokens", "stop_ids", "prompt_ids", "output_ids", "arrival_time",
        "priority", "status", "row", "slots", "prefix_len", "last_node", "planned_len", "pending_step",
        "pending_row", "inflight", "finish_reason", "matched_stop", "num_reported", "num_final_outputs",
        "cached_tokens", "admitted_once", "prompt_logprobs", "output_logprobs", "prefix_hint", "grammar",
        "error", "discard_step", "announced", "head_hash", "cache_tried_len", "shared_with_prev",
        "_prompt_array",
    )

    def __init__(
        self,
        rid: str,
        prompt_ids: list[int],
        params: SamplingParams,
        max_new_tokens: int,
        stop_ids: frozenset[int],
        arrival_time: float,
        priority: int = 0,
    ) -> None:
        self.rid = rid
        self.params = params
        self.max_new_tokens = max_new_tokens
        self.stop_ids = stop_ids
        self.prompt_ids = prompt_ids  # never changes after this (token_array caches its array)
        self.output_ids: list[int] = []
        self._prompt_array: np.ndarray | None = None
        self.arrival_time = arrival_time
        self.priority = priority
        self.status = ReqStatus.WAITING
        self.row = -1
        self.slots: list[int] = []
        self.prefix_len = 0
        # Longest prefix KVManager.cache_prefix tried to hand to the tree since admission (it gives up where
        # another request cached the same tokens first: retrying every step cost a tree walk per row).
        self.cache_tried_len = 0
        self.last_node: TreeNode | None = None
        self.planned_len = 0
        self.pending_step = -1  # step whose sample for this request is not applied yet, or -1
        self.pending_row = -1  # this request's row in that step
        self.inflight = 0
        self.finish_reason: FinishReason | None = None
        self.matched_stop: int | None = None
        self.num_reported = 0  # output tokens already sent to the detokenizer
        self.num_final_outputs = -1  # output length at the finish; later samples are dropped
        self.cached_tokens = 0
        self.admitted_once = False
        # [None] + one per prompt token after it
        self.prompt_logprobs: list[TokenLogprob | None] | None = None
        self.output_logprobs: list[TokenLogprob] = []  # computed, not yet reported
        self.prefix_hint = 0  # prefix match length seen by the last lpm ordering
        self.grammar: GrammarState | None = None  # the matcher of a constrained request
        self.error: str | None = None  # why it failed (finish_reason ABORT)
        # Constrained decoding: the step whose sample this request drops, because its grammar forces text
        # after the token before it (jump-forward waits for the request to have nothing in flight).
        self.discard_step = -1
        self.announced = False  # its NewRequest went to the workers since it was (re)admitted
        self.head_hash = 0  # of its prompt's head (shared_prefix.HEAD tokens): groups shared system prompts
        self.shared_with_prev = 0  # KV slots shared with the decode row before it last time (shared_prefix)

    @property
    def num_tokens(self) -> int:
        """Tokens that exist or will exist once the issued steps are applied (known + pending)."""
        return len(self.prompt_ids) + len(self.output_ids) + (self.pending_step >= 0)

    def tokens(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def token_array(self, n: int) -> np.ndarray:
        """tokens()[:n] as int64, the radix tree's key type: the prompt is converted once, not at every match
        and insert (~50 us for a 2k-token list)."""
        if self._prompt_array is None:
            self._prompt_array = np.asarray(self.prompt_ids, dtype=np.int64)
        p = len(self.prompt_ids)
        if n <= p:
            return self._prompt_array[:n]
        return np.concatenate((self._prompt_array, np.asarray(self.output_ids[: n - p], dtype=np.int64)))

    def token_range(self, start: int, end: int) -> list[int]:
        """tokens()[start:end] without building tokens()."""
        p = len(self.prompt_ids)
        if end <= p:
            return self.prompt_ids[start:end]
        if start >= p:
            return self.output_ids[start - p : end - p]
        return self.prompt_ids[start:] + self.output_ids[: end - p]

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def wants_sample(self) -> bool:
        """A further sample would still be reported (not past max_new_tokens, not finished)."""
        return not self.finished and len(self.output_ids) + (self.pending_step >= 0) < self.max_new_tokens

    @property
    def remaining_new_tokens(self) -> int:
        return max(0, self.max_new_tokens - len(self.output_ids))

    def finish(self, reason: FinishReason, matched_stop: int | None = None) -> None:
        if self.finish_reason is None:
            self.finish_reason = reason
            self.matched_stop = matched_stop
            self.num_final_outputs = len(self.output_ids)
