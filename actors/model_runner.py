"""Runs one StepPlan on the worker: builds the ForwardBatch, runs the model (eagerly or by replaying a CUDA
graph), samples, and starts copying the results to the host without waiting for them.

Per step, the host sends the device one packed int64 array (all the plan's integer columns) and gets back the
sampled tokens (plus logprobs when asked). `step()` returns a PendingStep whose `result()` blocks until the
copy is done; the worker calls it from a sender thread so that it can already launch the next step.

A step is prepared (host work and everything that does not read the previous step's samples), launched
(forward pass queued) and finished (masked, sampled, results on their way to the host). A plan with
`grammar_mask_follows` gets its grammar bitmasks later (StepMask): the worker launches it and finishes it
when they arrive, so the scheduler computes them while the GPU runs the forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from radixserve.actors.cuda_graph_runner import CudaGraphRunner
from radixserve.actors.messages import AppendedTokens, NewRequest, PromptLogprobs, StepPlan, StepResult
from radixserve.memory.kv_pool import KVCache, ReqToTokenTable
from radixserve.ops.attention.cascade import plan_cascade
from radixserve.ops.forward_batch import AttentionBackend, AttentionBatch, ForwardBatch
from radixserve.ops.penalties import to_device
from radixserve.ops.sampler import SampleOutput, Sampler, token_logprobs

# prepare()'s columns that attention reads as int32: seq_lens, extend_lens, extend_starts
INT32_COLUMNS = frozenset({5, 6, 7})


def _arr(buf: bytes, dtype: str) -> np.ndarray:
    return np.frombuffer(buf, dtype=dtype)


def _to_device(columns: tuple[np.ndarray, ...] | np.ndarray, device: torch.device) -> torch.Tensor:
    """Integer arrays, concatenated, as one int64 device tensor, without a stream sync: a copy from pageable
    memory waits for the GPU to drain (the step in flight), so stage in pinned memory (the caching host
    allocator keeps the block until the copy has run)."""
    parts = columns if isinstance(columns, tuple) else (columns,)
    if device.type != "cuda":
        return torch.from_numpy(np.concatenate(parts).astype(np.int64))
    host = torch.empty(sum(len(c) for c in parts), dtype=torch.int64, pin_memory=True)
    np.concatenate(parts, out=host.numpy(), casting="safe")
    return host.to(device, non_blocking=True)


def _columns_to_device(
    columns: tuple[np.ndarray, ...], device: torch.device, int32: frozenset[int] = frozenset()
) -> list[torch.Tensor]:
    """Integer arrays as device tensors, in one host->device copy (from pinned memory, as _to_device): int64,
    or int32 for the columns whose positions are in `int32` (two to an int64 of the buffer, viewed as int32
    on the device: no conversion kernel, each a launch on the step's critical path).

    Each column starts 16-byte aligned. Triton specializes a kernel on whether each pointer argument is, so a
    column's alignment must not depend on the lengths packed before it: an odd token count made the rotary
    kernel's positions unaligned and compiled a second variant of it in the middle of a run."""
    words = [(len(c) + 1) // 2 if i in int32 else len(c) for i, c in enumerate(columns)]  # int64 words
    offsets = np.cumsum([0] + [n + (n & 1) for n in words])
    host = torch.empty(int(offsets[-1]), dtype=torch.int64, pin_memory=device.type == "cuda")
    flat, flat32 = host.numpy(), host.numpy().view(np.int32)
    for i, (col, start) in enumerate(zip(columns, offsets, strict=False)):
        if i in int32:
            flat32[2 * start : 2 * start + len(col)] = col
        else:
            flat[start : start + len(col)] = col
    packed = host.to(device, non_blocking=True) if device.type == "cuda" else host
    return [
        packed[start : start + n].view(torch.int32)[: len(col)] if i in int32 else packed[start : start + n]
        for i, (col, start, n) in enumerate(zip(columns, offsets, words, strict=False))
    ]


def _host(t: torch.Tensor) -> torch.Tensor:
    """Start a device->host copy into pinned memory; valid once the step's event has completed."""
    if t.device.type == "cpu":
        return t
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    out.copy_(t, non_blocking=True)
    return out


@dataclass(slots=True)
class PendingStep:
    step: int
    tokens: torch.Tensor  # [B] int64, host (pinned)
    sample: SampleOutput | None
    sample_rows: np.ndarray
    num_rows: int
    prompt_logprobs: list[tuple[int, int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]
    event: Any  # torch.cuda.Event, or None on the CPU

    def result(self) -> StepResult:
        if self.event is not None:
            self.event.synchronize()
        fields: dict[str, Any] = {}
        if self.sample is not None and self.sample.logprobs is not None:
            fields = _scatter_logprobs(self.sample, self.sample_rows, self.num_rows)
        return StepResult(
            step=self.step,
            tokens=self.tokens.numpy().astype("<i4").tobytes(),
            prompt_logprobs=[_prompt_lp(b, k, *lp) for b, k, lp in self.prompt_logprobs],
            **fields,
        )


@dataclass(slots=True)
class PreparedStep:
    """A plan whose inputs are on the device; its decode rows still need the previous step's samples."""

    plan: StepPlan
    attn: AttentionBatch
    input_ids: torch.Tensor  # [T] int64; entries prev_at are filled from last_tokens[prev_idx] at launch
    positions: torch.Tensor  # [T]
    prev_at: torch.Tensor
    prev_idx: torch.Tensor
    sample_rows: np.ndarray
    starts: np.ndarray  # [B] offset of each row's first new token
    extend_lens: np.ndarray
    graph_size: int | None  # the CUDA graph staged for this step, or None for an eager forward
    graph_cascade: bool = False  # that graph is of the cascade family (CudaGraphRunner.stage_cascade)


@dataclass(slots=True)
class LaunchedStep:
    prep: PreparedStep
    hidden: torch.Tensor | None  # [T, hidden] (eager steps: prompt logprobs read it)
    logits: torch.Tensor | None  # [sampled rows, vocab]


class ModelRunner:
    def __init__(
        self,
        model: Any,
        kv: KVCache,
        table: ReqToTokenTable,
        sampler: Sampler,
        backend: AttentionBackend,
        device: torch.device,
        graphs: CudaGraphRunner | None = None,
    ) -> None:
        self.model = model
        self.kv = kv
        self.table = table
        self.sampler = sampler
        self.backend = backend
        self.device = device
        self.graphs = graphs
        # Tokens sampled by the previous step, one per row (-1 where none): decode rows of the next step
        # gather their inputs from here, on the device.
        self.last_tokens = torch.zeros(1, dtype=torch.int64, device=device)

    def _start_requests(
        self, new: list[NewRequest], released: list[int], appended: list[AppendedTokens]
    ) -> None:
        # Edits concern the rows' occupants before this plan's releases (a request's last edits may come
        # with its release), so they go first.
        for a in appended:
            self.sampler.remove_tokens(a.req_row, _arr(a.removed, "<i4").tolist())
            self.sampler.append_tokens(a.req_row, _arr(a.added, "<i4").tolist())
        for row in released:
            self.sampler.remove_request(row)
        for req in new:
            prefix = _arr(req.prefix_slots, "<i4")
            if len(prefix):
                rows = torch.full((len(prefix),), req.req_row, dtype=torch.int64, device=self.device)
                positions = torch.arange(len(prefix), dtype=torch.int64, device=self.device)
                self.table.write(rows, positions, _to_device(prefix, self.device))
            ids = _arr(req.penalty_ids, "<i4").tolist()
            split = len(ids) - req.num_output_ids
            self.sampler.add_request(req.req_row, req.params, ids[:split], ids[split:])

    def _token_bitmask(
        self, plan: StepPlan, sample_rows: np.ndarray, bitmask: bytes | np.ndarray | None
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The grammar-constrained rows (among the sampled rows) and their bitmasks, on the device."""
        if not plan.grammar_rows:
            return None
        if plan.grammar_mask_follows:
            if bitmask is None:
                raise RuntimeError(f"step {plan.step}: its grammar masks follow, but none were given")
        else:
            bitmask = plan.grammar_bitmask
        rows = np.searchsorted(sample_rows, _arr(plan.grammar_rows, "<i4"))
        words = (bitmask if isinstance(bitmask, np.ndarray) else _arr(bitmask, "<i4")).reshape(len(rows), -1)
        # A copy from pageable memory would make the host wait for the device: stage it in pinned memory.
        host = torch.empty(words.shape, dtype=torch.int32, pin_memory=self.device.type == "cuda")
        host.numpy()[:] = words
        return to_device(rows.tolist(), torch.int64, self.device), host.to(self.device, non_blocking=True)

    def step(self, plan: StepPlan, bitmask: bytes | np.ndarray | None = None) -> PendingStep:
        """prepare, launch and finish in one go (`bitmask`: the StepMask of a plan whose masks follow)."""
        return self.finish(self.launch(self.prepare(plan)), bitmask)

    @torch.inference_mode()
    def prepare(self, plan: StepPlan) -> PreparedStep:
        """Everything of `plan` that does not read the previous step's samples: host work, the inputs' copy,
        KV-table writes, new requests' sampler state and, for a CUDA-graph step, the attention plan. Call it
        after the previous step's `finish`."""
        self._start_requests(plan.new_requests, plan.released_rows, plan.appended_tokens)
        req_rows = _arr(plan.req_rows, "<i4")
        seq_lens = _arr(plan.seq_lens, "<i4")
        extend_lens = _arr(plan.extend_lens, "<i4")
        prev_rows = _arr(plan.prev_rows, "<i4")
        sample_rows = np.nonzero(_arr(plan.sample_mask, "u1"))[0]
        B, T = len(req_rows), int(extend_lens.sum())
        starts = np.zeros(B, dtype=np.int64)
        np.cumsum(extend_lens[:-1], out=starts[1:])
        token_row = np.repeat(np.arange(B), extend_lens)
        # Row r's new tokens sit at positions seq_len - extend_len ... seq_len - 1.
        positions = (seq_lens - extend_lens)[token_row] + (np.arange(T) - starts[token_row])
        from_prev = np.nonzero(prev_rows >= 0)[0]
        # One host->device copy for every integer column of the plan.
        columns = (_arr(plan.input_ids, "<i4"), positions, _arr(plan.out_slots, "<i4"), req_rows[token_row],
                   req_rows, seq_lens, extend_lens, starts, starts[from_prev], prev_rows[from_prev])
        input_ids, positions_t, out_slots, token_rows, rows_t, seq_t, ext_t, starts_t, prev_at, prev_idx = (
            _columns_to_device(columns, self.device, int32=INT32_COLUMNS)
        )
        self.table.write(token_rows, positions_t, out_slots)
        attn = AttentionBatch(
            req_rows=rows_t, seq_lens=seq_t, extend_lens=ext_t,
            extend_starts=starts_t, out_slots=out_slots, req_to_token=self.table.table,
            seq_lens_cpu=tuple(seq_lens.tolist()), extend_lens_cpu=tuple(extend_lens.tolist()),
            is_decode=T == B, shared_lens_cpu=tuple(_arr(plan.shared_lens, "<i4").tolist()),
        )
        graph_size, graph_cascade = None, False
        graphs, seq_t32 = self.graphs, attn.seq_lens
        if attn.is_decode and graphs is not None:
            if graphs.padded_size(B) is not None:
                graph_size = graphs.stage(positions_t, out_slots, rows_t, seq_t32, attn.seq_lens_cpu)
            elif graphs.cascade_size(B) is not None and any(attn.shared_lens_cpu):
                cascade = plan_cascade(attn.seq_lens_cpu, attn.shared_lens_cpu)
                if cascade is not None:  # else an eager step of plain decode
                    graph_size = graphs.stage_cascade(positions_t, out_slots, rows_t, seq_t32, cascade)
                    graph_cascade = True
        return PreparedStep(plan, attn, input_ids, positions_t, prev_at, prev_idx, sample_rows, starts,
                            extend_lens, graph_size, graph_cascade)

    @torch.inference_mode()
    def launch(self, prep: PreparedStep) -> LaunchedStep:
        """Gather the previous step's samples into the inputs and queue the forward pass and the logits."""
        if len(prep.prev_at):
            prep.input_ids[prep.prev_at] = self.last_tokens[prep.prev_idx]
        attn, sample_rows, B = prep.attn, prep.sample_rows, prep.attn.num_rows
        hidden = logits = None
        if prep.graph_size is not None:
            assert self.graphs is not None
            logits = self.graphs.replay(prep.graph_size, prep.input_ids, cascade=prep.graph_cascade)
            if len(sample_rows) != B:
                logits = logits[_to_device(sample_rows, self.device)]
        else:
            self.backend.prepare(attn)
            hidden = self.model(
                ForwardBatch(prep.input_ids, prep.positions, attn, self.backend)
            )  # [T, hidden]
            last = _to_device(prep.starts[sample_rows] + prep.extend_lens[sample_rows] - 1, self.device)
            logits = self.model.compute_logits(hidden[last], upcast=False) if len(sample_rows) else None
        return LaunchedStep(prep, hidden, logits)

    def needs_mask(self, launched: LaunchedStep) -> bool:
        """Whether `finish` needs this step's StepMask (its constrained rows decode a sample in flight)."""
        plan = launched.prep.plan
        return bool(plan.grammar_mask_follows and plan.grammar_rows)

    @torch.inference_mode()
    def finish(self, launched: LaunchedStep, bitmask: bytes | np.ndarray | None = None) -> PendingStep:
        """Mask, sample and start copying the results to the host. `bitmask` (a StepMask's, possibly a view
        of shared memory) is copied before this returns."""
        prep, logits, hidden = launched.prep, launched.logits, launched.hidden
        plan, sample_rows, B = prep.plan, prep.sample_rows, prep.attn.num_rows
        req_rows = _arr(plan.req_rows, "<i4")
        out = None
        if logits is not None and len(sample_rows):
            output_lens = _arr(plan.output_lens, "<i4")[sample_rows].tolist()
            out = self.sampler.sample(
                logits, req_rows[sample_rows].tolist(), output_lens,
                self._token_bitmask(plan, sample_rows, bitmask),
            )
        if out is not None and len(sample_rows) == B:
            tokens = out.tokens
        else:  # rows that sample nothing (prompt chunks) get -1
            tokens = torch.full((B,), -1, dtype=torch.int64, device=self.device)
            if out is not None:
                tokens[_to_device(sample_rows, self.device)] = out.tokens
        self.last_tokens = tokens
        prompt_lps = []
        for b, top_k, after in plan.prompt_logprob_rows:
            assert hidden is not None
            prompt_lps.append((b, top_k, self._prompt_logprobs(hidden, prep.input_ids, int(prep.starts[b]),
                                                               int(prep.extend_lens[b]), top_k, after)))
        if out is not None and out.logprobs is not None:
            out = SampleOutput(out.tokens, _host(out.logprobs), *(None if t is None else _host(t)
                                                                   for t in (out.top_ids, out.top_logprobs)))
        prompt_lps = [(b, k, (_host(lps), _host(ids), _host(tops))) for b, k, (lps, ids, tops) in prompt_lps]
        host_tokens = _host(tokens)
        event = None
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
        return PendingStep(plan.step, host_tokens, out, sample_rows, B, prompt_lps, event)  # type: ignore[arg-type]

    def _prompt_logprobs(
        self, hidden: torch.Tensor, input_ids: torch.Tensor, start: int, n: int, top_k: int, after: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logprob of each next prompt token given the ones before it, for one row's chunk."""
        targets = input_ids[start + 1 : start + n]
        if after >= 0:
            targets = torch.cat([targets, torch.tensor([after], device=self.device, dtype=targets.dtype)])
        logits = self.model.compute_logits(hidden[start : start + len(targets)])
        return token_logprobs(logits, targets, top_k, self.sampler.vocab_size)


def _prompt_lp(
    b: int, top_k: int, lps: torch.Tensor, ids: torch.Tensor, tops: torch.Tensor
) -> PromptLogprobs:
    return PromptLogprobs(
        row=b,
        logprobs=lps.float().numpy().astype("<f4").tobytes(),
        top_k=top_k,
        top_ids=ids.to(torch.int32).numpy().astype("<i4").tobytes(),
        top_logprobs=tops.float().numpy().astype("<f4").tobytes(),
    )


def _scatter_logprobs(out: SampleOutput, sample_rows: np.ndarray, num_rows: int) -> dict[str, Any]:
    """Sampler outputs cover the sampled rows only; the result has one entry per plan row."""
    assert out.logprobs is not None
    lps = np.zeros(num_rows, dtype="<f4")
    lps[sample_rows] = out.logprobs.float().numpy()
    k = 0 if out.top_ids is None else int(out.top_ids.shape[1])
    fields: dict[str, Any] = {"logprobs": lps.tobytes(), "top_k": k}
    if k and out.top_ids is not None and out.top_logprobs is not None:
        ids = np.zeros((num_rows, k), dtype="<i4")
        tops = np.zeros((num_rows, k), dtype="<f4")
        ids[sample_rows] = out.top_ids.numpy()
        tops[sample_rows] = out.top_logprobs.float().numpy()
        fields.update(top_ids=ids.tobytes(), top_logprobs=tops.tobytes())
    return fields
