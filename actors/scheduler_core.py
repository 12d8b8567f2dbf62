"""The scheduler's logic, free of I/O: admit, plan a step, apply its result. Tested on fabricated results.

One step spends a token budget: one token for each decoding request, then prompt chunks of running and
newly admitted requests ("computed tokens catch up with tokens": a decode is an extend of length 1).
Overlap: `schedule()` may issue step N+1 while step N is in flight; a row that needs the token step N samples
refers to it by row (`prev_rows`), and slots are released only once no issued step can touch them.

Constrained decoding (actors/grammar.py): each sampling row of a constrained request is masked by its
grammar's token bitmask; the sampled token is accepted by its matcher when the result is applied, and text
the grammar then forces is appended (jump-forward), computed as an extend chunk. Under overlap a constrained
request rides every step like any other: when its row's input is a sample still in flight, the mask cannot
exist yet, so the plan goes out with `grammar_mask_follows` and the step's masks follow in a StepMask as
soon as that sample is applied (`take_step_mask`, before the next plan is made); the worker waits for them
after launching the forward pass, so computing them hides under the GPU's work. Jump-forward needs the
request quiet: when its grammar forces text after a sample whose successor step is already in flight, that
successor's sample is dropped (`Req.discard_step`) and the jump happens when it returns.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

from radixserve.actors.constrained_steps import ConstrainedSteps, i32
from radixserve.actors.grammar import GrammarCache
from radixserve.actors.kv_manager import KVManager
from radixserve.actors.logprob_records import append_prompt_logprobs, token_logprobs_of_rows
from radixserve.actors.messages import (
    AbortReason,
    AppendedTokens,
    NewRequest,
    RequestUpdate,
    StepMask,
    StepPlan,
    StepResult,
    SubmitRequest,
)
from radixserve.actors.request_state import Req, ReqStatus
from radixserve.actors.schedule_policy import order_waiting
from radixserve.actors.scheduler_config import RETRACT_HEADROOM_STEPS, SchedulerConfig
from radixserve.actors.shared_prefix import HEAD, decode_shared_lens, prompt_head
from radixserve.outputs import FinishReason


@dataclass(slots=True)
class _IssuedStep:
    step: int
    reqs: list[Req]
    sampled: list[bool]
    prompt_done: list[bool]  # the row's chunk reached the end of its known tokens
    logprob_rows: list[int] = field(default_factory=list)
    constrained: list[Req] = field(default_factory=list)  # of the plan's grammar_rows, in order
    mask_follows: bool = False  # their bitmasks go out in a StepMask once the step before is applied


class SchedulerCore:
    def __init__(self, cfg: SchedulerConfig, grammars: GrammarCache | None = None) -> None:
        self.cfg = cfg
        self.grammars = grammars
        # Per row: output edits (jump-forward, dropped samples) of requests with penalties, for the next plan.
        self._appended: dict[int, list[AppendedTokens]] = {}
        # The step in flight after the last applied one, if its masks follow (computed in take_step_mask).
        self._mask_due: _IssuedStep | None = None
        self.kv = KVManager(cfg.num_slots, cfg.disable_radix_cache)
        self.constrained = ConstrainedSteps(grammars, self.kv, self._appended, cfg.shared_masks)
        self.reqs: dict[str, Req] = {}
        self.waiting: list[Req] = []
        self.running: list[Req] = []  # admitted and not yet released (finished ones may still be in flight)
        self._free_rows = list(range(cfg.max_rows - 1, -1, -1))
        self._released_rows: list[int] = []
        self._issued: deque[_IssuedStep] = deque()
        self._next_step = 0
        self.new_token_ratio = cfg.new_token_ratio
        # Counters for tests and metrics.
        self.num_retractions = 0
        self.num_retraction_rounds = 0  # times the pipeline drained for retractions
        self.num_prefill_tokens = 0
        self.num_forward_steps = 0
        self.num_prompt_tokens = 0  # prompts admitted (first admission only) ...
        self.num_cached_prompt_tokens = 0  # ... and how much of them the radix tree already held
        self.num_masks_after_plan = 0  # steps whose grammar masks followed their plan (StepMask)

    # ------------------------------------------------------------------------------------------ inputs

    def submit(self, msg: SubmitRequest) -> None:
        stop_ids = frozenset(msg.eos_token_ids)
        req = Req(msg.rid, list(msg.input_ids), msg.params, msg.max_new_tokens, stop_ids, msg.arrival_time,
                  msg.priority)
        req.head_hash = hash(prompt_head(req))
        if msg.params.constraint is not None:
            assert self.grammars is not None, "a constrained request reached a scheduler without grammars"
            req.grammar = self.grammars.new_state(msg.params)
            self.constrained.jump_forward(req, self.cfg, reserve=1)  # forced text joins the prompt's extend
        self.reqs[req.rid] = req
        self.waiting.append(req)

    def abort(self, rid: str, reason: AbortReason) -> list[RequestUpdate]:
        """Finish `rid` now (idempotent; unknown or finished ids are ignored)."""
        req = self.reqs.get(rid)
        if req is None or req.finished:
            return []
        finish = FinishReason.STOP if reason == AbortReason.STOP_STRING else FinishReason.ABORT
        req.finish(finish)
        if req.status == ReqStatus.WAITING:
            self.waiting.remove(req)
            del self.reqs[rid]
        elif req.inflight == 0:
            self._release(req)
        return [self._update(req)]

    def fail_all(self, message: str) -> list[RequestUpdate]:
        """A worker died: every request ends with an error; nothing in flight will ever complete."""
        updates = [
            RequestUpdate(req.rid, [], finish_reason=FinishReason.ABORT, error=message)
            for req in self.reqs.values()
            if not req.finished or req.num_reported < req.num_final_outputs
        ]
        self.reqs.clear()
        self.waiting.clear()
        self.running.clear()
        self._issued.clear()
        self._mask_due = None
        return updates

    # ------------------------------------------------------------------------------------------ planning

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_inflight_steps(self) -> int:
        return len(self._issued)

    def schedule(self) -> StepPlan | None:
        """The next step to issue, or None when there is nothing to do or it must wait for a result."""
        if len(self._issued) >= (2 if self.cfg.overlap else 1) or not self.has_work:
            return None
        last_step = self._next_step - 1
        while True:
            decode, extend = self._runnable(last_step)
            # Memory pressure: decode rows need one slot each; retract (after draining) until they fit.
            if len(decode) > self.kv.available and self._issued:
                return None  # retraction needs a quiet pipeline; the results in flight come back first
            if len(decode) > self.kv.available and self._retract_for_headroom(decode):
                continue
            rows = self._plan_rows(decode, extend)
            if rows or self._issued or self._retract_one() is None:
                break
            # Running prompts hold all the memory and none can advance: retract one and try again.
        if not rows:
            return None
        return self._build_plan(rows, last_step)

    def _plan_rows(self, decode: list[Req], extend: list[Req]) -> list[tuple[Req, int]]:
        budget = self.cfg.chunked_prefill_size
        rows: list[tuple[Req, int]] = [(req, 1) for req in decode[: min(budget, self.kv.available)]]
        budget -= len(rows)
        prefill_budget = min(budget, self.cfg.max_prefill_tokens)
        used = len(rows)  # slots taken so far
        for req in extend:
            if prefill_budget <= 0:
                break
            n = min(req.num_tokens - req.planned_len, prefill_budget, self.kv.available - used)
            if n <= 0:
                break
            rows.append((req, n))
            prefill_budget -= n
            used += n
        self._admit(rows, prefill_budget)
        return rows

    def _runnable(self, last_step: int) -> tuple[list[Req], list[Req]]:
        decode: list[Req] = []
        extend: list[Req] = []
        for req in self.running:
            if req.finished or (req.pending_step >= 0 and req.pending_step != last_step):
                continue
            if req.discard_step >= 0:
                continue  # jump-forward waits for its dropped sample to return (module docstring)
            remaining = req.num_tokens - req.planned_len
            if remaining <= 0:
                continue
            if remaining == 1 and req.max_new_tokens > 0 and not req.wants_sample:
                continue  # its last sample is in flight: it finishes by length when applied
            (decode if remaining == 1 else extend).append(req)
        if self.kv.cache_enabled and len(decode) > 1:
            # Rows that share a prompt head sit side by side: attention kernels working on neighbouring rows
            # then read the shared prefix's KV while it is still in the L2 cache.
            decode.sort(key=lambda r: r.head_hash)
        return decode, extend

    def _admit(self, rows: list[tuple[Req, int]], budget: int) -> None:
        if not self.waiting or budget <= 0:
            return
        reserved = sum(
            int(r.remaining_new_tokens * self.new_token_ratio) + (r.num_tokens - r.planned_len)
            for r in self.running
            if not r.finished
        ) + sum(n for _, n in rows)
        computing = self._prompt_heads_being_computed()
        for req in order_waiting(self.cfg.schedule_policy, self.waiting, self.kv.prefix_match_len):
            if budget <= 0 or not self._free_rows or len(self.running) >= self.cfg.max_running_requests:
                break
            head = prompt_head(req)
            if head is not None and head in computing and self.kv.prefix_match_len(req) < HEAD:
                continue  # a running request computes this prompt's head: wait for it to be cached
            self.kv.match_and_lock(req)
            need = (req.num_tokens - req.planned_len) + int(req.remaining_new_tokens * self.new_token_ratio)
            if self.kv.available - reserved < min(need, self.kv.total_slots - reserved) or (
                self.running and self.kv.available - reserved < need
            ):
                self._unlock_prefix(req)
                break
            n = min(req.num_tokens - req.planned_len, budget, self.kv.available - sum(k for _, k in rows))
            if n <= 0:
                self._unlock_prefix(req)
                break
            self.waiting.remove(req)
            req.status = ReqStatus.RUNNING
            req.row = self._free_rows.pop()
            if not req.admitted_once:
                req.cached_tokens = req.prefix_len
                self.num_prompt_tokens += len(req.prompt_ids)
                self.num_cached_prompt_tokens += req.prefix_len
                req.admitted_once = True
                if req.params.prompt_logprobs is not None:
                    req.prompt_logprobs = [None]
            self.running.append(req)
            rows.append((req, n))
            reserved += need
            budget -= n
            if head is not None and req.prefix_len < HEAD:
                computing.add(head)

    def _prompt_heads_being_computed(self) -> set[tuple[int, ...]]:
        """The first HEAD prompt tokens of running requests that compute them (not cached yet). A waiting
        request with the same head is held back until they are: admitted together, requests that share a
        system prompt would each compute it (the tree gets a prompt once its prefill is applied)."""
        if not self.kv.cache_enabled:
            return set()
        return {head for r in self.running
                if r.prefix_len < HEAD and not r.finished and (head := prompt_head(r)) is not None}

    def _build_plan(self, rows: list[tuple[Req, int]], last_step: int) -> StepPlan:
        step = self._next_step
        self._next_step += 1
        req_rows, seq_lens, extend_lens, prev_rows, sample_mask, output_lens = [], [], [], [], [], []
        input_ids: list[int] = []
        new_requests: list[NewRequest] = []
        record = _IssuedStep(step, [], [], [])
        prompt_lp: list[tuple[int, int, int]] = []
        grammar_rows: list[int] = []
        all_slots = self.kv.alloc(sum(n for _, n in rows))  # one allocation for the whole step
        assert all_slots is not None, "scheduler planned more slots than are available"
        offset = 0
        for b, (req, n) in enumerate(rows):
            slots = all_slots[offset : offset + n]
            offset += n
            start = req.planned_len
            if not req.announced:
                new_requests.append(self._new_request(req))
                req.announced = True
            done = start + n == req.num_tokens
            sample = done and req.wants_sample
            if req.pending_step >= 0:  # the input is the token step `last_step` samples for this request
                assert n == 1 and req.pending_step == last_step
                prev_rows.append(req.pending_row)
                input_ids.append(0)
            else:
                prev_rows.append(-1)
                input_ids.extend(req.token_range(start, start + n))
            if req.prompt_logprobs is not None and start < len(req.prompt_ids):
                after = req.prompt_ids[start + n] if start + n < len(req.prompt_ids) else -1
                prompt_lp.append((b, req.params.prompt_logprobs or 0, after))
            req_rows.append(req.row)
            seq_lens.append(start + n)
            extend_lens.append(n)
            sample_mask.append(sample)
            output_lens.append(len(req.output_ids) + (req.pending_step >= 0))
            req.slots.extend(slots.tolist())
            req.planned_len = start + n
            req.inflight += 1
            if sample:
                req.pending_step, req.pending_row = step, b
            record.reqs.append(req)
            record.sampled.append(sample)
            record.prompt_done.append(done)
            if sample and req.params.logprobs is not None:
                record.logprob_rows.append(b)
            if sample and req.grammar is not None:
                grammar_rows.append(b)
                record.constrained.append(req)
                record.mask_follows |= prev_rows[-1] >= 0
            self.num_prefill_tokens += n if n > 1 or prev_rows[-1] < 0 else 0
        self._issued.append(record)
        self.num_forward_steps += 1
        released, self._released_rows = self._released_rows, []
        appended = [a for edits in self._appended.values() for a in edits]
        self._appended.clear()
        return StepPlan(
            step=step,
            req_rows=i32(req_rows),
            seq_lens=i32(seq_lens),
            extend_lens=i32(extend_lens),
            prev_rows=i32(prev_rows),
            sample_mask=np.asarray(sample_mask, dtype=np.uint8).tobytes(),
            output_lens=i32(output_lens),
            input_ids=i32(input_ids),
            out_slots=all_slots.astype("<i4", copy=False).tobytes(),
            new_requests=new_requests,
            released_rows=released,
            prompt_logprob_rows=prompt_lp,
            grammar_rows=i32(grammar_rows) if grammar_rows else b"",
            grammar_bitmask=(
                b"" if record.mask_follows else self.constrained.bitmasks(record.constrained, step)),
            grammar_mask_follows=record.mask_follows,
            appended_tokens=appended,
            shared_lens=decode_shared_lens(rows) if self.kv.cache_enabled else b"",
        )

    @property
    def num_jump_forward_tokens(self) -> int:
        """Output tokens appended by jump-forward (net of re-tokenization)."""
        return self.constrained.num_jump_forward_tokens

    @property
    def num_grammar_rejections(self) -> int:
        """Sampled tokens a matcher refused (only a -inf logit_bias can cause one)."""
        return self.constrained.num_grammar_rejections

    def take_step_mask(self) -> StepMask | None:
        """After `apply`: the bitmasks of the next step in flight when its plan said they follow. Send them to
        every worker right away: the step waits for them before sampling."""
        due, self._mask_due = self._mask_due, None
        if due is None:
            return None
        self.num_masks_after_plan += 1
        return self.constrained.step_mask(due.constrained, due.step)

    def close(self) -> None:
        """Release what outlives the process otherwise (the shared-memory mask ring)."""
        self.constrained.close()

    def _new_request(self, req: Req) -> NewRequest:
        penalty_ids = b""
        if req.params.needs_penalties:
            penalty_ids = i32(req.tokens())
        return NewRequest(
            req_row=req.row,
            params=req.params,
            prefix_slots=i32(req.slots[: req.prefix_len]),
            penalty_ids=penalty_ids,
            num_output_ids=len(req.output_ids),
        )

    # ------------------------------------------------------------------------------------------ results

    def apply(self, result: StepResult) -> list[RequestUpdate]:
        record = self._issued.popleft()
        assert record.step == result.step, f"results out of order: got {result.step}, expected {record.step}"
        tokens = np.frombuffer(result.tokens, dtype="<i4")
        logprobs = token_logprobs_of_rows(result, record.logprob_rows)
        prompt_lps = {p.row: p for p in result.prompt_logprobs}
        touched: list[Req] = []
        for b, req in enumerate(record.reqs):
            req.inflight -= 1
            if b in prompt_lps and req.prompt_logprobs is not None:
                append_prompt_logprobs(req.prompt_logprobs, req.prompt_ids, prompt_lps[b])
            if record.sampled[b] and req.discard_step == record.step:
                req.pending_step = req.pending_row = req.discard_step = -1
                if not req.finished:
                    touched.append(req)  # the jump may finish it: its update goes out either way
                self.constrained.after_dropped_sample(req, int(tokens[b]), self.cfg)
            elif record.sampled[b]:
                token = int(tokens[b])
                req.output_ids.append(token)
                if req.pending_step == record.step:  # not when the next step already re-armed it
                    req.pending_step = req.pending_row = -1
                if not req.finished:
                    if b in logprobs:
                        req.output_logprobs.append(logprobs[b])
                    if req.grammar is not None and not req.grammar.accept(token):
                        self.constrained.reject(req, token)
                    elif token in req.stop_ids or (req.grammar is not None and req.grammar.terminated):
                        req.finish(FinishReason.STOP, token)
                    elif len(req.output_ids) >= req.max_new_tokens:
                        req.finish(FinishReason.LENGTH)
                    elif req.grammar is not None and not req.grammar.last_was_forced:
                        self.constrained.after_sample(req, self.cfg)
                    touched.append(req)
            elif record.prompt_done[b] and req.max_new_tokens == 0 and not req.finished:
                req.finish(FinishReason.LENGTH)
                touched.append(req)
            if record.prompt_done[b] and not req.finished and req.prefix_len < len(req.prompt_ids):
                self.kv.cache_prefix(req, len(req.prompt_ids))  # shared prompts are computed once
            if req.finished and req.inflight == 0 and req.status == ReqStatus.RUNNING:
                self._release(req)
        decayed = self.new_token_ratio - self.cfg.new_token_ratio_decay
        self.new_token_ratio = max(self.cfg.min_new_token_ratio, decayed)
        if self._issued and self._issued[0].mask_follows:
            self._mask_due = self._issued[0]
        return [self._update(req) for req in touched]

    # ------------------------------------------------------------------------------------------ internals

    def _update(self, req: Req) -> RequestUpdate:
        end = req.num_final_outputs if req.finished else len(req.output_ids)
        if req.grammar is not None and not req.finished and req.params.logprobs is None:
            end = max(req.num_reported, end - (self.cfg.jump_forward_window - 1))  # may still be re-tokenized
        new = req.output_ids[req.num_reported : end]
        first = req.num_reported == 0
        req.num_reported = end
        logprobs = None
        if req.params.logprobs is not None:
            logprobs, req.output_logprobs = req.output_logprobs[: len(new)], []
        prompt_lps = None
        if req.prompt_logprobs is not None and (first and (new or req.finished)):
            prompt_lps = req.prompt_logprobs
        if req.finished:
            self.reqs.pop(req.rid, None)
        return RequestUpdate(
            rid=req.rid,
            token_ids=new,
            logprobs=logprobs,
            finish_reason=req.finish_reason,
            matched_stop=req.matched_stop,
            cached_tokens=req.cached_tokens,
            prompt_logprobs=prompt_lps,
            error=req.error,
        )

    def _release(self, req: Req) -> None:
        self.kv.release(req)
        self.running.remove(req)
        self._free_rows.append(req.row)
        self._released_rows.append(req.row)
        req.announced = False
        req.row = -1
        req.status = ReqStatus.FINISHED

    def _unlock_prefix(self, req: Req) -> None:
        if req.last_node is not None:
            self.kv.tree.unlock(req.last_node)
        req.slots, req.prefix_len, req.planned_len, req.last_node = [], 0, 0, None

    def _retract_for_headroom(self, decode: list[Req]) -> bool:
        """Retract until the remaining decode rows have slots for RETRACT_HEADROOM_STEPS steps (or one request
        is left): each retraction drains the pipeline, so retracting only what the next step needs would
        drain it at every step while memory stays short (~35 ms of GPU idle per step at ~950 rows on an
        H100). True when anything was retracted."""
        rows = {id(r) for r in decode}
        retracted = False
        while self.kv.available < len(rows) * RETRACT_HEADROOM_STEPS:
            victim = self._retract_one()
            if victim is None:
                break
            retracted = True
            rows.discard(id(victim))
        self.num_retraction_rounds += retracted
        return retracted

    def _retract_one(self) -> Req | None:
        """Preempt the latest-arrived running request; its KV goes to the cache, it re-queues to recompute."""
        candidates = [r for r in self.running if not r.finished]
        if len(candidates) <= 1:
            return None
        victim = max(candidates, key=lambda r: r.arrival_time)
        self._release(victim)
        victim.status = ReqStatus.WAITING
        self.waiting.append(victim)
        self.num_retractions += 1
        self.new_token_ratio = min(1.0, self.new_token_ratio + 0.1)
        return victim

    def check_integrity(self) -> None:
        """Raise unless every slot is free, cached or held by a running request (and rows add up)."""
        self.kv.check_integrity()
        held = sum(len(r.slots) - r.prefix_len for r in self.running)
        if held != self.kv.private_slots:
            raise AssertionError(f"running requests hold {held} private slots, the KV manager counts "
                                 f"{self.kv.private_slots}")
        if len(self._free_rows) + len(self.running) != self.cfg.max_rows:
            raise AssertionError("request rows leaked")


