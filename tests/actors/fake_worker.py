"""A model-free worker for scheduler tests: executes StepPlans on a fake KV pool and checks every read.

Each KV slot records (token, position) when written. Before "sampling", every row's whole context is read back
through req_to_token and must be exactly the request's tokens at positions 0..seq_len-1, so any slot the
scheduler mixes up, frees early or shares wrongly shows up. The next token is a deterministic function of the
context, so outputs must equal `reference_generate` whatever the batching, caching or retraction.

Grammar-constrained rows take the first token their bitmask allows, scanning up from that function's choice.
The worker keeps each sampling row's context of the last step (`contexts`) and, for requests with penalties,
the output tokens its penalty counts would hold (`penalty_outputs` by row, then `released_penalty_outputs`).
"""

from __future__ import annotations

import numpy as np

from radixserve.actors.messages import StepPlan, StepResult

VOCAB = 64


def next_token(context: list[int]) -> int:
    h = 0
    for i, t in enumerate(context):
        h = (h * 31 + (i + 1) * (t + 7)) % 1_000_003
    return h % VOCAB


def first_allowed(token: int, bitmask: np.ndarray) -> int:
    """The first token from `token` on (cyclically) that the packed bitmask allows."""
    for i in range(VOCAB):
        candidate = (token + i) % VOCAB
        if (int(bitmask[candidate // 32]) >> (candidate % 32)) & 1:
            return candidate
    raise AssertionError("the grammar mask allows no token")


def reference_generate(prompt: list[int], max_new: int, stop_ids: set[int]) -> list[int]:
    seq = list(prompt)
    out: list[int] = []
    while len(out) < max_new:
        t = next_token(seq)
        seq.append(t)
        out.append(t)
        if t in stop_ids:
            break
    return out


class FakeWorker:
    def __init__(self, num_slots: int, max_rows: int, max_context: int) -> None:
        self.kv: dict[int, tuple[int, int]] = {}
        self.table = np.zeros((max_rows, max_context), dtype=np.int64)
        self.last_tokens = np.zeros(0, dtype=np.int64)
        self.num_slots = num_slots
        self.rows_live: set[int] = set()
        self.tokens_computed = 0
        self.shared_rows = 0  # decode rows whose plan said they share slots with the row before
        self.shared_mixed_steps = 0  # steps with prompt rows whose decode rows came with shared_lens
        self.contexts: dict[int, list[int]] = {}
        self.penalty_outputs: dict[int, list[int]] = {}
        self.released_penalty_outputs: list[list[int]] = []

    def step(self, plan: StepPlan, mask: bytes | None = None) -> StepResult:
        """`mask`: the StepMask's bitmasks of a plan sent with grammar_mask_follows."""
        assert (mask is not None) == plan.grammar_mask_follows, "masks must come with the plan or after it"
        for edit in plan.appended_tokens:
            outputs = self.penalty_outputs[edit.req_row]
            for token in np.frombuffer(edit.removed, dtype="<i4").tolist():
                outputs.remove(token)
            outputs.extend(np.frombuffer(edit.added, dtype="<i4").tolist())
        for row in plan.released_rows:
            self.rows_live.discard(row)
            if row in self.penalty_outputs:
                self.released_penalty_outputs.append(self.penalty_outputs.pop(row))
        for req in plan.new_requests:
            assert req.req_row not in self.rows_live, "row reused before it was released"
            self.rows_live.add(req.req_row)
            prefix = np.frombuffer(req.prefix_slots, dtype="<i4")
            self.table[req.req_row, : len(prefix)] = prefix
            if req.params.needs_penalties:
                ids = np.frombuffer(req.penalty_ids, dtype="<i4").tolist()
                self.penalty_outputs[req.req_row] = ids[len(ids) - req.num_output_ids :]
        grammar_rows = np.frombuffer(plan.grammar_rows, dtype="<i4").tolist()
        bitmask = plan.grammar_bitmask if mask is None else mask
        bitmasks = np.frombuffer(bitmask, dtype="<i4").reshape(len(grammar_rows), VOCAB // 32)
        masks = dict(zip(grammar_rows, bitmasks, strict=True))
        self.contexts = {}
        req_rows = np.frombuffer(plan.req_rows, dtype="<i4")
        seq_lens = np.frombuffer(plan.seq_lens, dtype="<i4")
        ext = np.frombuffer(plan.extend_lens, dtype="<i4")
        prev = np.frombuffer(plan.prev_rows, dtype="<i4")
        sample = np.frombuffer(plan.sample_mask, dtype="u1")
        ids = np.frombuffer(plan.input_ids, dtype="<i4").astype(np.int64).copy()
        slots = np.frombuffer(plan.out_slots, dtype="<i4")
        assert len(ids) == len(slots) == int(ext.sum())
        assert len(set(slots.tolist())) == len(slots) and 0 not in slots
        tokens = np.full(len(req_rows), -1, dtype=np.int64)
        t = 0
        for b in range(len(req_rows)):
            row, n, end = int(req_rows[b]), int(ext[b]), int(seq_lens[b])
            assert row in self.rows_live
            if prev[b] >= 0:
                assert n == 1
                ids[t] = self.last_tokens[prev[b]]
                assert ids[t] >= 0, "decode row refers to a row that did not sample"
            for i in range(n):
                pos = end - n + i
                self.kv[int(slots[t + i])] = (int(ids[t + i]), pos)
                self.table[row, pos] = slots[t + i]
            context = []
            for pos in range(end):
                token, written_pos = self.kv[int(self.table[row, pos])]
                assert written_pos == pos, f"row {row}: slot for position {pos} holds position {written_pos}"
                context.append(token)
            if sample[b]:
                tokens[b] = next_token(context)
                if b in masks:
                    tokens[b] = first_allowed(int(tokens[b]), masks[b])
                self.contexts[b] = context
                if row in self.penalty_outputs:
                    self.penalty_outputs[row].append(int(tokens[b]))
            t += n
        self._check_shared_lens(plan, req_rows, seq_lens)
        self.tokens_computed += t
        self.last_tokens = tokens
        return StepResult(step=plan.step, tokens=tokens.astype("<i4").tobytes())

    def _check_shared_lens(self, plan: StepPlan, req_rows: np.ndarray, seq_lens: np.ndarray) -> None:
        """A plan's shared_lens must cover exactly its leading one-token rows and be, for each, the longest
        common head of its table row and the previous row's (private slots are never shared, so that is
        exactly what the two share)."""
        if not plan.shared_lens:
            return
        shared = np.frombuffer(plan.shared_lens, dtype="<i4")
        extend = np.frombuffer(plan.extend_lens, dtype="<i4")
        leading = len(extend) if (extend == 1).all() else int(np.argmax(extend != 1))
        assert len(shared) == leading and shared[0] == 0, (len(shared), leading)
        self.shared_mixed_steps += int(leading < len(extend))
        self.shared_rows += int((shared > 0).sum())
        for b in range(1, len(shared)):
            n = int(min(seq_lens[b], seq_lens[b - 1]))
            a, c = self.table[req_rows[b - 1], :n], self.table[req_rows[b], :n]
            differ = np.nonzero(a != c)[0]
            assert shared[b] == (differ[0] if len(differ) else n), f"row {b}: shared_lens {shared[b]}"
