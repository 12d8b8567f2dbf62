"""Token sampling for a batch of requests: biases, penalties, greedy / temperature / top-k / top-p / min-p.

The GPU worker owns one `Sampler`. Requests are keyed by their row in the request table. `sample()` is
sync-free: it branches on host-side parameters only, never on tensor values, so the host can queue step N+1
while step N runs. What a batch needs is worked out once per distinct list of keys (`_Plan`) and reused while
the decode batch stays the same.

Order of operations on each row (logits are the first `vocab_size` columns; padding columns are never seen):

    raw logits --(logprobs, top logprobs taken here)
      -> grammar bitmask (constrained rows: tokens the grammar disallows = -inf)
      -> logit_bias -> min_new_tokens (EOS + stop_token_ids = -inf) -> repetition / frequency / presence
      -> greedy rows: argmax
      -> sampled rows: / temperature -> softmax -> top-k -> top-p -> min-p -> exponential race
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from radixserve.ops.penalties import PenaltyState, apply_penalties, to_device
from radixserve.ops.token_bitmask import apply_token_bitmask
from radixserve.sampling_params import SamplingParams

_TINY = torch.finfo(torch.float32).tiny
_MASK64 = (1 << 64) - 1
# Sorting all V columns is slower than a top-k for small k; past this k a full sort is as good.
_MAX_TOPK = 1024
# =1: greedy rows argmax in torch rather than ops/argmax.py's kernel (A/B; read at import, which worker
# processes inherit)
TORCH_ARGMAX_ENV = "RADIXSERVE_TORCH_ARGMAX"
_TORCH_ARGMAX = os.environ.get(TORCH_ARGMAX_ENV) == "1"


class SampleOutput(NamedTuple):
    tokens: Tensor  # [B] int64, on the logits' device
    logprobs: Tensor | None  # [B] float32: raw log-softmax at the chosen token; None when no row asked
    top_ids: Tensor | None  # [B, K] int64, K = max params.logprobs over rows that asked (may be 0)
    top_logprobs: Tensor | None  # [B, K] float32


@dataclass(frozen=True, slots=True)
class _Request:
    params: SamplingParams
    early_stop_ids: tuple[int, ...]  # EOS + stop_token_ids: -inf while output_len < min_new_tokens
    generator: torch.Generator | None  # only for seeded requests


@dataclass(frozen=True, slots=True)
class _Penalties:
    rows: Tensor | None  # [P] batch rows using penalties; None when every row does
    slots: Tensor  # [P] their PenaltyState slots
    repetition: Tensor | None  # [P, 1]; None when every row's is neutral
    frequency: Tensor | None
    presence: Tensor | None


@dataclass(frozen=True, slots=True)
class _SamplingPlan:
    """The non-greedy rows of a batch: S of them."""

    rows: Tensor | None  # [S] their batch rows in a mixed batch; None when every row samples
    temperature: Tensor | None  # [S, 1]; None when all are 1
    sort_k: int  # 0: no top-k/top-p, the race runs over all V columns; else over the sorted top sort_k
    top_k: Tensor | None  # [S, 1] int64, k per row (sort_k where off); None when no row cuts below sort_k
    top_p: Tensor | None  # [S, 1]; None when all are 1
    min_p: Tensor | None  # [S, 1]; None when all are 0
    seeded: tuple[tuple[int, int, torch.Generator], ...]  # (batch row, seed, generator) of seeded rows
    seeded_rows: Tensor | None  # [n] their rows among the S; None when all S rows are seeded


@dataclass(frozen=True, slots=True)
class _Plan:
    """What one batch of keys needs, from host-side params only. Tensors are already on the device."""

    sampling: _SamplingPlan | None  # None: every row is greedy
    bias: tuple[Tensor, Tensor, Tensor] | None  # (rows, cols, values) over rows with a logit_bias
    early_stops: tuple[tuple[int, int, tuple[int, ...]], ...]  # (batch row, min_new_tokens, ids to mask)
    penalties: _Penalties | None
    logprob_k: int | None  # None: no row asked for logprobs


class Sampler:
    """Per-request sampling state on one device and the batched `sample()`.

    Mutates: the request registry (`add_request` / `remove_request`, host), the penalty counts (device, in
    `sample()`), and the logits passed to `sample()` (biases and penalties are applied in place).
    """

    def __init__(self, vocab_size: int, eos_token_ids: Sequence[int], device: torch.device | str) -> None:
        self.vocab_size = vocab_size
        self.eos_token_ids = tuple(eos_token_ids)
        self.device = _normalize(torch.device(device))
        # index_put_ of a Python scalar copies it from pageable memory, which syncs; a device scalar does not.
        self._neg_inf = torch.full((), -math.inf, device=self.device)
        self._requests: dict[int, _Request] = {}
        self._penalties = PenaltyState(vocab_size, self.device)
        self._cached_plan: tuple[tuple[int, ...], _Plan] | None = None

    def add_request(
        self, key: int, params: SamplingParams, prompt_ids: Sequence[int], output_ids: Sequence[int] = ()
    ) -> None:
        """Register `key`. `output_ids`: tokens already generated, when a retracted request comes back."""
        assert key not in self._requests, f"sampler key {key} is already in use"
        V = self.vocab_size
        # Ingress validated these against the vocabulary; an id out of range here would be a device fault.
        assert all(0 <= t < V for t in params.logit_bias or ()), "logit_bias id outside the vocabulary"
        assert all(0 <= t < V for t in params.stop_token_ids or ()), "stop token id outside the vocabulary"
        early_stop_ids: tuple[int, ...] = ()
        if params.min_new_tokens > 0:
            ids = (*self.eos_token_ids, *(params.stop_token_ids or ()))
            early_stop_ids = tuple(dict.fromkeys(t for t in ids if 0 <= t < V))
        generator = None
        if params.seed is not None and not params.greedy:
            generator = torch.Generator(device=self.device)
        self._requests[key] = _Request(params, early_stop_ids, generator)
        if params.needs_penalties:
            self._penalties.add(key, prompt_ids, output_ids)
        self._cached_plan = None

    def remove_request(self, key: int) -> None:
        """Forget `key`; call it after the last `sample()` that names it (its slot may be reused at once)."""
        del self._requests[key]
        if key in self._penalties:
            self._penalties.remove(key)
        self._cached_plan = None

    def append_tokens(self, key: int, token_ids: Sequence[int]) -> None:
        """Count tokens the host appended without sampling them (jump-forward) in `key`'s penalty state."""
        if token_ids and key in self._penalties:
            self._penalties.add_output(key, token_ids)

    def remove_tokens(self, key: int, token_ids: Sequence[int]) -> None:
        """Uncount output tokens the host replaced (jump-forward re-tokenization) in `key`'s penalty state."""
        if token_ids and key in self._penalties:
            self._penalties.add_output(key, token_ids, -1.0)

    def sample(
        self,
        logits: Tensor,
        keys: Sequence[int],
        output_lens: Sequence[int],
        token_bitmask: tuple[Tensor, Tensor] | None = None,
    ) -> SampleOutput:
        """Pick one token per row of `logits` [B, V'] (V' >= vocab_size); order: module docstring.

        `output_lens[b]`: tokens request `keys[b]` generated before this one. `token_bitmask`: (rows [G],
        bitmasks [G, ceil(V / 32)] int32) of the grammar-constrained rows, on the device. Overwrites `logits`
        in place.
        """
        B = len(keys)
        assert logits.dim() == 2 and logits.shape[0] == B == len(output_lens), (logits.shape, B)
        assert logits.shape[1] >= self.vocab_size, (logits.shape, self.vocab_size)
        logits = logits[:, : self.vocab_size]  # padded columns: never sampled, not in the softmax
        plan = self._plan(keys)
        # Greedy rows with nothing to add to their logits argmax the model's 16-bit values as they are (the
        # same token as on a float32 copy); everything else works in float32.
        adds_to_logits = plan.bias is not None or plan.penalties is not None or token_bitmask is not None
        if logits.dtype != torch.float32 and (
            plan.sampling is not None or plan.logprob_k is not None or adds_to_logits
        ):
            logits = logits.float()

        raw_logprobs = torch.log_softmax(logits, dim=-1) if plan.logprob_k is not None else None
        if token_bitmask is not None:
            apply_token_bitmask(logits, *token_bitmask)
        if plan.bias is not None:
            logits.index_put_(plan.bias[:2], plan.bias[2], accumulate=True)
        self._mask_early_stops(logits, plan, output_lens)
        if (pen := plan.penalties) is not None:
            self._apply_penalties(logits, pen)

        if (sp := plan.sampling) is None:
            tokens = _greedy(logits)  # the all-greedy fast path
        elif sp.rows is None:
            tokens = self._sample_probs(logits, sp, output_lens)
        else:
            tokens = _greedy(logits)
            sampled = self._sample_probs(logits.index_select(0, sp.rows), sp, output_lens)
            tokens.index_copy_(0, sp.rows, sampled)

        if pen is not None:
            chosen_by_penalized = tokens if pen.rows is None else tokens.index_select(0, pen.rows)
            self._penalties.record(pen.slots, chosen_by_penalized)
        if raw_logprobs is None:
            return SampleOutput(tokens, None, None, None)
        chosen = raw_logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1)
        top = raw_logprobs.topk(min(plan.logprob_k or 0, self.vocab_size), dim=-1)
        return SampleOutput(tokens, chosen, top.indices, top.values)

    # -- steps of sample() ---------------------------------------------------------------------------------

    def _mask_early_stops(self, logits: Tensor, plan: _Plan, output_lens: Sequence[int]) -> None:
        rows: list[int] = []
        cols: list[int] = []
        for row, min_new, ids in plan.early_stops:
            if output_lens[row] < min_new:
                rows.extend([row] * len(ids))
                cols.extend(ids)
        if rows:
            dev = self.device
            indices = (to_device(rows, torch.int64, dev), to_device(cols, torch.int64, dev))
            logits.index_put_(indices, self._neg_inf.to(logits.dtype))

    def _apply_penalties(self, logits: Tensor, pen: _Penalties) -> None:
        state = self._penalties
        counts, prompt_mask = state.counts[pen.slots], state.prompt_mask[pen.slots]  # [P, V]
        rows = logits if pen.rows is None else logits.index_select(0, pen.rows)
        apply_penalties(rows, counts, prompt_mask, pen.repetition, pen.frequency, pen.presence)
        if pen.rows is not None:
            logits.index_copy_(0, pen.rows, rows)

    def _sample_probs(self, logits: Tensor, plan: _SamplingPlan, output_lens: Sequence[int]) -> Tensor:
        """Sample one token per row of `logits` [S, V] (the non-greedy rows)."""
        if plan.temperature is not None:
            logits = logits / plan.temperature
        probs = torch.softmax(logits, dim=-1)
        if plan.sort_k == 0:
            if plan.min_p is not None:
                probs.masked_fill_(probs < probs.amax(dim=-1, keepdim=True) * plan.min_p, 0.0)
            return _race(probs, self._noise(probs, plan, output_lens, None))

        # [S, K] probabilities in descending order and their token ids
        if plan.sort_k <= _MAX_TOPK:
            probs, ids = probs.topk(plan.sort_k, dim=-1)
        else:
            probs, ids = probs.sort(dim=-1, descending=True)
        if plan.top_k is not None:
            positions = torch.arange(probs.shape[1], device=probs.device)
            probs.masked_fill_(positions >= plan.top_k, 0.0)
        if plan.top_p is not None:
            # Top-p over the top-k survivors (HF order): drop a token when the mass strictly above it already
            # exceeds top_p of what is left. The first token always stays.
            cumulative = probs.cumsum(dim=-1)
            probs.masked_fill_(cumulative - probs > plan.top_p * cumulative[:, -1:], 0.0)
        if plan.min_p is not None:
            probs.masked_fill_(probs < probs[:, :1] * plan.min_p, 0.0)
        choice = _race(probs, self._noise(probs, plan, output_lens, ids))
        return ids.gather(1, choice.unsqueeze(1)).squeeze(1)

    def _noise(
        self, like: Tensor, plan: _SamplingPlan, output_lens: Sequence[int], ids: Tensor | None
    ) -> Tensor:
        """Exp(1) noise shaped like `like`; a seeded row's noise depends only on (seed, output_len, token id).

        A seeded row draws V values from its own generator, indexed by token id (gathered through `ids` when
        the race runs in sorted order), so neither its batch row nor the batch's sort width changes its token.
        """
        if not plan.seeded:
            noise = torch.empty_like(like).exponential_()
        else:
            own = torch.empty(len(plan.seeded), self.vocab_size, device=like.device)
            for i, (batch_row, seed, generator) in enumerate(plan.seeded):
                generator.manual_seed(_mix_seed(seed, output_lens[batch_row]))
                own[i].exponential_(generator=generator)
            if plan.seeded_rows is None:  # every sampled row is seeded
                noise = own if ids is None else own.gather(1, ids)
            else:
                if ids is not None:
                    own = own.gather(1, ids.index_select(0, plan.seeded_rows))
                noise = torch.empty_like(like).exponential_().index_copy_(0, plan.seeded_rows, own)
        # exponential_ may return exactly 0 (CPU: with chance 2**-53); 0/0 would be a NaN that argmax picks.
        return noise.clamp_min_(_TINY)

    # -- plans -----------------------------------------------------------------------------------------------

    def _plan(self, keys: Sequence[int]) -> _Plan:
        key_tuple = tuple(keys)
        if self._cached_plan is not None and self._cached_plan[0] == key_tuple:
            return self._cached_plan[1]
        plan = self._build_plan(key_tuple)
        self._cached_plan = (key_tuple, plan)
        return plan

    def _build_plan(self, keys: tuple[int, ...]) -> _Plan:
        requests = [self._requests[k] for k in keys]
        params = [r.params for r in requests]
        asked = [p.logprobs for p in params if p.logprobs is not None]
        return _Plan(
            sampling=self._sampling_plan(requests),
            bias=self._bias_plan(params),
            early_stops=tuple(
                (b, r.params.min_new_tokens, r.early_stop_ids)
                for b, r in enumerate(requests)
                if r.early_stop_ids
            ),
            penalties=self._penalty_plan(keys, params),
            logprob_k=max(asked) if asked else None,
        )

    def _sampling_plan(self, requests: list[_Request]) -> _SamplingPlan | None:
        rows = [b for b, r in enumerate(requests) if not r.params.greedy]
        if not rows:
            return None
        sampled = [requests[b].params for b in rows]
        V = self.vocab_size
        top_ks = [p.top_k if 0 < p.top_k < V else V for p in sampled]
        # One sort width for all S rows: a row without top-k needs all V columns whenever any row sorts.
        sort_k = max(top_ks) if any(k < V for k in top_ks) or any(p.top_p < 1.0 for p in sampled) else 0
        seeded, seeded_rows = [], []
        for s, b in enumerate(rows):
            if (generator := requests[b].generator) is not None:
                seeded.append((b, requests[b].params.seed or 0, generator))
                seeded_rows.append(s)
        return _SamplingPlan(
            rows=None if len(rows) == len(requests) else to_device(rows, torch.int64, self.device),
            temperature=self._optional([p.temperature for p in sampled], neutral=1.0),
            sort_k=sort_k,
            top_k=self._column(top_ks, torch.int64) if any(k < sort_k for k in top_ks) else None,
            top_p=self._optional([p.top_p for p in sampled], neutral=1.0) if sort_k else None,
            min_p=self._optional([p.min_p for p in sampled], neutral=0.0),
            seeded=tuple(seeded),
            seeded_rows=None
            if len(seeded) == len(rows)
            else to_device(seeded_rows, torch.int64, self.device),
        )

    def _bias_plan(self, params: list[SamplingParams]) -> tuple[Tensor, Tensor, Tensor] | None:
        rows: list[int] = []
        cols: list[int] = []
        values: list[float] = []
        for b, p in enumerate(params):
            for token, bias in (p.logit_bias or {}).items():
                rows.append(b)
                cols.append(token)
                values.append(bias)
        if not rows:
            return None
        dev = self.device
        return (
            to_device(rows, torch.int64, dev),
            to_device(cols, torch.int64, dev),
            to_device(values, torch.float32, dev),
        )

    def _penalty_plan(self, keys: tuple[int, ...], params: list[SamplingParams]) -> _Penalties | None:
        rows = [b for b, p in enumerate(params) if p.needs_penalties]
        if not rows:
            return None
        used = [params[b] for b in rows]
        return _Penalties(
            rows=None if len(rows) == len(keys) else to_device(rows, torch.int64, self.device),
            slots=to_device([self._penalties.slot(keys[b]) for b in rows], torch.int64, self.device),
            repetition=self._optional([p.repetition_penalty for p in used], neutral=1.0),
            frequency=self._optional([p.frequency_penalty for p in used], neutral=0.0),
            presence=self._optional([p.presence_penalty for p in used], neutral=0.0),
        )

    def _optional(self, values: list[float], neutral: float) -> Tensor | None:
        """A [N, 1] column, or None when every value is neutral (the step is skipped)."""
        return None if all(v == neutral for v in values) else self._column(values, torch.float32)

    def _column(self, values: list[int] | list[float], dtype: torch.dtype) -> Tensor:
        return to_device(values, dtype, self.device).unsqueeze(1)



def _greedy(logits: Tensor) -> Tensor:
    """logits.argmax(-1); on CUDA in one Triton kernel (ops/argmax.py; torch's took 30-37 us a 128k row)."""
    if not logits.is_cuda or _TORCH_ARGMAX:
        return logits.argmax(dim=-1)
    from radixserve.ops.argmax import row_argmax  # triton: imported on GPU paths only

    return row_argmax(logits)


def token_logprobs(
    logits: Tensor, token_ids: Tensor, top_k: int, vocab_size: int | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Prompt logprobs: log-softmax of `logits` [N, V] at `token_ids` [N], and top_k ids, logprobs [N, top_k].

    `vocab_size` drops padded columns first, as `Sampler.sample()` does.
    """
    assert logits.dim() == 2 and token_ids.shape == (logits.shape[0],), (logits.shape, token_ids.shape)
    logprobs = torch.log_softmax(logits[:, :vocab_size].float(), dim=-1)
    chosen = logprobs.gather(1, token_ids.long().unsqueeze(1)).squeeze(1)
    top = logprobs.topk(top_k, dim=-1)
    return chosen, top.indices, top.values


def _race(probs: Tensor, noise: Tensor) -> Tensor:
    """Index of one sample per row of `probs` [N, K] (unnormalized, zeros never picked).

    argmax(p / E) with E ~ Exp(1) picks i with probability p_i / sum(p) (the exponential race; the same as
    Gumbel-max). Unlike torch.multinomial it never makes the host wait for the device (gpt-fast's
    multinomial_sample_one_no_sync).
    """
    return (probs / noise).argmax(dim=-1)


def _normalize(device: torch.device) -> torch.device:
    """ "cuda" -> "cuda:N", so that tensors' devices compare equal to ours."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _mix_seed(seed: int, output_len: int) -> int:
    """A 64-bit generator seed from (request seed, position): splitmix64: near pairs, unrelated streams."""
    z = ((seed & _MASK64) ^ ((output_len + 1) * 0x9E3779B97F4A7C15)) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)
