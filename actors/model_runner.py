"""Runs one StepPlan on the worker: builds the ForwardBatch, runs the model, samples.

Everything here is per-step tensor work on the worker's device; the only host<->device traffic per step is
the plan's small integer arrays in and the sampled tokens out.
"""

from __future__ import annotations

import numpy as np
import torch

from radixserve.actors.messages import NewRequest, PromptLogprobs, StepPlan, StepResult
from radixserve.memory.kv_pool import KVCache, ReqToTokenTable
from radixserve.ops.attention.torch_backend import TorchAttentionBackend
from radixserve.ops.forward_batch import AttentionBatch, ForwardBatch
from radixserve.ops.sampler import Sampler, token_logprobs


def _arr(buf: bytes, dtype: str) -> np.ndarray:
    return np.frombuffer(buf, dtype=dtype)


class ModelRunner:
    def __init__(
        self,
        model: torch.nn.Module,
        kv: KVCache,
        table: ReqToTokenTable,
        sampler: Sampler,
        device: torch.device,
    ) -> None:
        self.model = model
        self.kv = kv
        self.table = table
        self.sampler = sampler
        self.device = device
        self.backend = TorchAttentionBackend(kv.k_buffers, kv.v_buffers)
        # Tokens sampled by the previous step, one per row (-1 where none): decode rows of the next step
        # gather their inputs from here, on the device.
        self.last_tokens = torch.zeros(0, dtype=torch.int64, device=device)

    def _tensor(self, array: np.ndarray, dtype: torch.dtype = torch.int64) -> torch.Tensor:
        return torch.from_numpy(array.astype(np.int64)).to(self.device, dtype=dtype, non_blocking=True)

    def _start_requests(self, new: list[NewRequest], released: list[int]) -> None:
        for row in released:
            self.sampler.remove_request(row)
        for req in new:
            prefix = _arr(req.prefix_slots, "<i4")
            if len(prefix):
                rows = torch.full((len(prefix),), req.req_row, dtype=torch.int64, device=self.device)
                positions = torch.arange(len(prefix), dtype=torch.int64, device=self.device)
                self.table.write(rows, positions, self._tensor(prefix))
            ids = _arr(req.penalty_ids, "<i4").tolist()
            split = len(ids) - req.num_output_ids
            self.sampler.add_request(req.req_row, req.params, ids[:split], ids[split:])

    @torch.inference_mode()
    def step(self, plan: StepPlan) -> StepResult:
        self._start_requests(plan.new_requests, plan.released_rows)
        req_rows = _arr(plan.req_rows, "<i4")
        seq_lens = _arr(plan.seq_lens, "<i4")
        extend_lens = _arr(plan.extend_lens, "<i4")
        prev_rows = _arr(plan.prev_rows, "<i4")
        sample_mask = _arr(plan.sample_mask, "u1").astype(bool)
        num_tokens = int(extend_lens.sum())
        extend_starts = np.concatenate([[0], np.cumsum(extend_lens)[:-1]]).astype(np.int64)
        # Position of every new token: row r's tokens sit at seq_len - extend_len ... seq_len - 1.
        token_row = np.repeat(np.arange(len(req_rows)), extend_lens)
        positions = (seq_lens - extend_lens)[token_row] + (np.arange(num_tokens) - extend_starts[token_row])

        input_ids = self._tensor(_arr(plan.input_ids, "<i4"))
        from_prev = np.nonzero(prev_rows >= 0)[0]
        if len(from_prev):
            input_ids[self._tensor(extend_starts[from_prev])] = self.last_tokens[self._tensor(prev_rows[from_prev])]
        out_slots = self._tensor(_arr(plan.out_slots, "<i4"))
        positions_t = self._tensor(positions)
        self.table.write(self._tensor(req_rows[token_row]), positions_t, out_slots)

        attn = AttentionBatch(
            req_rows=self._tensor(req_rows),
            seq_lens=self._tensor(seq_lens, torch.int32),
            extend_lens=self._tensor(extend_lens, torch.int32),
            extend_starts=self._tensor(extend_starts, torch.int32),
            out_slots=out_slots,
            req_to_token=self.table.table,
            seq_lens_cpu=tuple(seq_lens.tolist()),
            extend_lens_cpu=tuple(extend_lens.tolist()),
            is_decode=bool((extend_lens == 1).all()),
        )
        self.backend.prepare(attn)
        hidden = self.model(ForwardBatch(input_ids, positions_t, attn, self.backend))  # [T, hidden]

        tokens = torch.full((len(req_rows),), -1, dtype=torch.int64, device=self.device)
        result_fields: dict[str, object] = {}
        sample_rows = np.nonzero(sample_mask)[0]
        if len(sample_rows):
            last = self._tensor(extend_starts[sample_rows] + extend_lens[sample_rows] - 1)
            logits = self.model.compute_logits(hidden[last])
            out = self.sampler.sample(
                logits, req_rows[sample_rows].tolist(), _arr(plan.output_lens, "<i4")[sample_rows].tolist()
            )
            tokens[self._tensor(sample_rows)] = out.tokens
            if out.logprobs is not None:
                result_fields.update(_scatter_logprobs(out, sample_rows, len(req_rows)))
        self.last_tokens = tokens
        prompt_lps = [
            self._prompt_logprobs(hidden, input_ids, b, top_k, after, extend_starts, extend_lens)
            for b, top_k, after in plan.prompt_logprob_rows
        ]
        return StepResult(
            step=plan.step,
            tokens=tokens.to(torch.int32).cpu().numpy().astype("<i4").tobytes(),
            prompt_logprobs=prompt_lps,
            **result_fields,  # type: ignore[arg-type]
        )

    def _prompt_logprobs(
        self,
        hidden: torch.Tensor,
        input_ids: torch.Tensor,
        b: int,
        top_k: int,
        after: int,
        extend_starts: np.ndarray,
        extend_lens: np.ndarray,
    ) -> PromptLogprobs:
        """Logprob of each next prompt token given the ones before, for row b's chunk."""
        start, n = int(extend_starts[b]), int(extend_lens[b])
        targets = input_ids[start + 1 : start + n]
        if after >= 0:
            targets = torch.cat([targets, torch.tensor([after], device=self.device, dtype=targets.dtype)])
        logits = self.model.compute_logits(hidden[start : start + len(targets)])
        lps, top_ids, top_lps = token_logprobs(logits, targets, top_k)
        return PromptLogprobs(
            row=b,
            logprobs=lps.float().cpu().numpy().astype("<f4").tobytes(),
            top_k=top_k,
            top_ids=top_ids.to(torch.int32).cpu().numpy().astype("<i4").tobytes(),
            top_logprobs=top_lps.float().cpu().numpy().astype("<f4").tobytes(),
        )


def _scatter_logprobs(out, sample_rows: np.ndarray, num_rows: int) -> dict[str, object]:
    """Sampler outputs cover the sampled rows only; the result has one entry per plan row."""
    lps = np.zeros(num_rows, dtype="<f4")
    lps[sample_rows] = out.logprobs.float().cpu().numpy()
    k = 0 if out.top_ids is None else int(out.top_ids.shape[1])
    fields: dict[str, object] = {"logprobs": lps.tobytes(), "top_k": k}
    if k:
        ids = np.zeros((num_rows, k), dtype="<i4")
        tops = np.zeros((num_rows, k), dtype="<f4")
        ids[sample_rows] = out.top_ids.cpu().numpy()
        tops[sample_rows] = out.top_logprobs.float().cpu().numpy()
        fields.update(top_ids=ids.tobytes(), top_logprobs=tops.tobytes())
    return fields
