"""Constrained decoding inside the scheduler: each step's grammar bitmasks, jump-forward over the text a
grammar forces, and the samples dropped so that a request can jump. scheduler_core.py's docstring tells how
these fit the overlap pipeline; SchedulerCore owns one ConstrainedSteps and passes its live config.

Mutates requests (output tokens, finish), their KV (KVManager.truncate) and the penalty edits that go out
with the next plan (the core's `appended`, shared by reference).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from radixserve.actors.grammar import GrammarCache
from radixserve.actors.kv_manager import KVManager
from radixserve.actors.mask_ring import MaskRing
from radixserve.actors.messages import AppendedTokens, StepMask
from radixserve.actors.request_state import Req
from radixserve.outputs import FinishReason

if TYPE_CHECKING:
    from radixserve.actors.scheduler_config import SchedulerConfig


def i32(values: list[int]) -> bytes:
    return np.asarray(values, dtype="<i4").tobytes()


class ConstrainedSteps:
    def __init__(
        self,
        grammars: GrammarCache | None,
        kv: KVManager,
        appended: dict[int, list[AppendedTokens]],
        shared_masks: bool = False,
    ) -> None:
        self.grammars = grammars
        # StepMasks through a shared-memory ring (actors/mask_ring.py), made when first needed
        self.shared_masks = shared_masks
        self._ring: MaskRing | None = None
        self.kv = kv
        self.appended = appended  # penalty edits per row, sent with the next plan
        self._bitmask = np.zeros((0, 0), dtype=np.int32)
        self.num_jump_forward_tokens = 0  # output tokens appended by jump-forward (net of re-tokenization)
        self.num_grammar_rejections = 0  # sampled tokens a matcher refused (only a -inf logit_bias can)

    def bitmasks(self, reqs: list[Req], step: int) -> bytes:
        """The bitmasks of `reqs`' rows in `step` as bytes (they travel inside the plan)."""
        if not reqs:
            return b""
        assert self.grammars is not None
        if self._bitmask.shape[0] < len(reqs):
            rows = max(len(reqs), 2 * self._bitmask.shape[0])
            self._bitmask = np.zeros((rows, self.grammars.bitmask_words), dtype=np.int32)
        self._fill(reqs, step, self._bitmask)
        return self._bitmask[: len(reqs)].astype("<i4", copy=False).tobytes()

    def step_mask(self, reqs: list[Req], step: int) -> StepMask:
        """The StepMask of a plan whose masks follow: in the shared-memory ring when there is one."""
        if not self.shared_masks or not reqs:
            return StepMask(step, self.bitmasks(reqs, step))
        assert self.grammars is not None
        if self._ring is None or self._ring.rows < len(reqs):
            rows = max(len(reqs), 64, 2 * self._ring.rows if self._ring is not None else 0)
            if self._ring is not None:
                self._ring.close(unlink=True)  # workers keep their mapping until they see the new path
            self._ring = MaskRing.create(rows, self.grammars.bitmask_words)
            if self._ring is None:  # no room in /dev/shm: through the socket from now on
                self.shared_masks = False
                return StepMask(step, self.bitmasks(reqs, step))
        self._fill(reqs, step, self._ring.slot(step, len(reqs)))
        return StepMask(step, b"", self._ring.ref(step, len(reqs)))

    def _fill(self, reqs: list[Req], step: int, out: np.ndarray) -> None:
        """Row g of `out` <- the mask of reqs[g]; a row whose sample will be dropped allows every token."""
        # NOTE: one matcher at a time: a mask from xgrammar's cache takes ~3 us, less than handing the batch
        # to its threads (BatchGrammarMatcher) costs (measured with 64 JSON and character-class matchers).
        for g, req in enumerate(reqs):
            assert req.grammar is not None
            if req.finished or req.discard_step == step:
                out[g] = -1
            else:
                req.grammar.fill_bitmask(out, g)

    def close(self) -> None:
        if self._ring is not None:
            self._ring.close(unlink=True)
            self._ring = None

    def after_sample(self, req: Req, cfg: SchedulerConfig) -> None:
        """Jump-forward now if nothing of `req` is in flight; else, when its grammar forces text, drop the
        sample of the step in flight (which decodes the token just applied) and jump once it is back."""
        assert req.grammar is not None
        if req.inflight == 0:
            self.jump_forward(req, cfg)
        elif req.grammar.forces_text():
            # In flight means planned in the next step, as a decode row that samples
            # (it had a pending sample).
            assert req.pending_step >= 0 and req.inflight == 1, (
                "constrained request in flight without a sample"
            )
            req.discard_step = req.pending_step

    def after_dropped_sample(self, req: Req, token: int, cfg: SchedulerConfig) -> None:
        """The step whose sample `req` dropped (`token`) computed the KV of its last token: jump-forward now.
        Should the jump append nothing after all, that token's KV is dropped so that it is decoded (and
        sampled) again."""
        if req.params.needs_penalties and req.row >= 0:  # the worker counted the dropped sample
            self.appended.setdefault(req.row, []).append(AppendedTokens(req.row, b"", i32([token])))
        if req.finished:
            return
        self.jump_forward(req, cfg)
        if not req.finished and req.planned_len == req.num_tokens:
            self.kv.truncate(req, req.planned_len - 1)

    def jump_forward(self, req: Req, cfg: SchedulerConfig, reserve: int = 0) -> None:
        """After the model chose a token: append the text `req`'s grammar now forces (GrammarState.
        jump_forward); the next plan computes it as an extend chunk. Re-tokenized tail tokens whose KV was
        computed give their slots back. With --disable-jump-forward the same tokens are decoded one per step.

        NOTE: forced text gets the tokenizer's tokens either way. Left to pick under the mask, a model spells
        forced keys in odd pieces ("h" "os" "t" "n" "am" "e" for "hostname") and derails; with the same
        tokens, jump-forward changes only the number of forward passes, not the output. `reserve`: output
        tokens to leave to the model.
        """
        assert req.grammar is not None and req.inflight == 0 and req.pending_step < 0
        # The tail: output tokens not streamed yet (what was streamed is never rewritten), within the window,
        # and past the cached prefix (the radix tree owns those slots).
        first = max(req.num_reported, len(req.output_ids) - cfg.jump_forward_window,
                    req.prefix_len - len(req.prompt_ids), 0)
        logprobs = req.params.logprobs is not None
        if logprobs:
            first = len(req.output_ids)  # a sampled token keeps its logprob: never re-tokenized
        jump = req.grammar.jump_forward(req.output_ids[first:], req.max_new_tokens - reserve - first)
        if jump is None:
            return
        keep = first + jump.num_kept
        removed = req.output_ids[keep:]
        if cfg.disable_jump_forward or logprobs:  # forced tokens need their logprobs computed too
            # A replaced sample is replaced at once (it was never computed); the rest one per step.
            appended = jump.tokens[:1] if removed else []
            req.grammar.force(jump.tokens[len(appended):])
        else:
            appended = jump.tokens
            self.num_jump_forward_tokens += len(appended) - len(removed)
        req.output_ids[keep:] = appended
        if req.planned_len > len(req.prompt_ids) + keep:
            self.kv.truncate(req, len(req.prompt_ids) + keep)
        if req.params.needs_penalties and req.row >= 0 and (appended or removed):
            self.appended.setdefault(req.row, []).append(AppendedTokens(req.row, i32(appended), i32(removed)))
        if len(req.output_ids) >= req.max_new_tokens:
            req.finish(FinishReason.LENGTH)

    def reject(self, req: Req, token: int) -> None:
        """The mask allowed no token (a -inf logit_bias on all the grammar allows): fail this request only."""
        self.num_grammar_rejections += 1
        req.output_ids.pop()  # never computed: it was this step's sample
        req.error = f"the grammar allows no token here that logit_bias leaves possible (sampled {token})"
        req.finish(FinishReason.ABORT)
