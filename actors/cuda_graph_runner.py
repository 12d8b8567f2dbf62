"""Decode steps replayed from CUDA graphs, one per padded batch size.

All graphs share one memory pool and are captured largest first (the pool's blocks then fit every smaller
graph). A decode batch of B rows replays the graph of the smallest captured size >= B; padding rows read and
write only the padding slot 0 through the reserved request row `pad_row`, whose table entries are all 0.

Static inputs live in one place (this object); before a replay the runner copies the step's inputs into them
and re-plans the attention wrapper of that size (host work, outside the graph): `stage` does all but the token
ids, which may be the previous step's samples, and `replay` copies those and launches the graph.

Two families of graphs: plain decode up to cuda_graph_max_bs rows (FlashInfer's decode kernels, or the Triton
split-KV kernel up to the backend's triton_decode_max_rows, with no plan to make before a replay), and, over a
Triton-cascade backend (FP8 pools; RADIXSERVE_DISABLE_CASCADE_GRAPHS=1 turns it off), cascade decode past
that, every 128 rows up to the running-request limit (GraphCascade: fixed grids, the step's cascade plan
copied into static buffers by `stage_cascade`). Eager, a 1,000-row cascade step costs the host ~30-40 ms of
launches (session 8, an H100), about the GPU's own time; replayed, ~3 ms (session 9).
"""

from __future__ import annotations

import bisect
from typing import Any

import torch

from radixserve.ops.attention.cascade import CascadePlan
from radixserve.ops.attention.flashinfer_backend import FlashInferAttentionBackend, gather_kv_indices
from radixserve.ops.attention.graph_cascade import GraphCascade
from radixserve.ops.forward_batch import AttentionBatch, ForwardBatch

DISABLE_CASCADE_GRAPHS_ENV = "RADIXSERVE_DISABLE_CASCADE_GRAPHS"  # =1: no cascade family (see the docstring)
CASCADE_SIZE_STEP = 128  # rows between cascade graph sizes: at most 127 padding rows (~3% of 1,000)


def capture_sizes(max_bs: int) -> list[int]:
    sizes = [1, 2, 4, 8] + list(range(16, 257, 8))
    return [s for s in sizes if s <= max_bs] or [max_bs]


def cascade_capture_sizes(above: int, max_rows: int) -> list[int]:
    """Cascade graph sizes past the plain family's largest (`above`): every CASCADE_SIZE_STEP rows, the last
    one max_rows itself (a batch never has more rows than that)."""
    sizes = [s for s in range(CASCADE_SIZE_STEP, max_rows, CASCADE_SIZE_STEP) if s > above]
    return sizes + [max_rows] if max_rows > above else []


class CudaGraphRunner:
    def __init__(
        self,
        model: Any,
        backend: FlashInferAttentionBackend,
        req_to_token: torch.Tensor,
        pad_row: int,
        max_bs: int,
        max_context: int,
        cascade_max_bs: int = 0,  # > 0: the cascade family up to this many rows
    ) -> None:
        self.model = model
        self.backend = backend
        self.req_to_token = req_to_token
        self.pad_row = pad_row
        self.sizes = capture_sizes(max_bs)
        self.max_bs = self.sizes[-1]
        self.max_context = max_context
        device = req_to_token.device
        self.cascade_sizes = cascade_capture_sizes(self.max_bs, cascade_max_bs) if cascade_max_bs else []
        self.cascades = {
            bs: GraphCascade(bs, backend.num_q_heads, backend.num_kv_heads, backend.head_dim, device,
                             num_sms=backend.num_sms)
            for bs in self.cascade_sizes
        }
        bs = max(self.sizes + self.cascade_sizes)  # static inputs for the largest graph of either family
        self.input_ids = torch.zeros(bs, dtype=torch.int64, device=device)
        self.positions = torch.zeros(bs, dtype=torch.int64, device=device)
        self.out_slots = torch.zeros(bs, dtype=torch.int64, device=device)
        self.req_rows = torch.full((bs,), pad_row, dtype=torch.int64, device=device)
        self.seq_lens = torch.ones(bs, dtype=torch.int32, device=device)
        self.ones = torch.ones(bs, dtype=torch.int32, device=device)
        self.starts = torch.arange(bs, dtype=torch.int32, device=device)
        # Page lists of every graph size share one buffer: a batch never holds more than bs * max_context.
        self.kv_indices = torch.zeros(bs * max_context, dtype=torch.int32, device=device)
        self.kv_indptr = torch.zeros(bs + 1, dtype=torch.int32, device=device)
        self.kv_last_page_len = torch.ones(bs, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.wrappers: dict[int, Any] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.cascade_graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.cascade_logits: dict[int, torch.Tensor] = {}
        self.pool: Any = None

    def _batch(self, bs: int, seq_lens_cpu: tuple[int, ...]) -> AttentionBatch:
        return AttentionBatch(
            req_rows=self.req_rows[:bs], seq_lens=self.seq_lens[:bs], extend_lens=self.ones[:bs],
            extend_starts=self.starts[:bs], out_slots=self.out_slots[:bs], req_to_token=self.req_to_token,
            seq_lens_cpu=seq_lens_cpu, extend_lens_cpu=(1,) * bs, is_decode=True,
        )

    @torch.inference_mode()
    def capture(self) -> None:
        self.pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        for bs in reversed(self.cascade_sizes):  # larger than every plain size: first
            batch = self._batch(bs, (1,) * bs)
            self.cascades[bs].load_padding()  # at capture every row is a padding row
            self.backend.use_graph_cascade(self.cascades[bs], batch)
            self.cascade_graphs[bs], self.cascade_logits[bs] = self._capture(bs, batch, stream)
            self.backend.end_graph_capture()
        for bs in reversed(self.sizes):
            batch = self._batch(bs, (1,) * bs)
            if bs <= self.backend.triton_decode_max_rows:  # no wrapper: nothing to plan before a replay
                self.backend.use_graph_triton_decode(batch)
            else:
                wrapper = self.backend.make_graph_decode_wrapper(
                    bs, self.kv_indptr, self.kv_indices, self.kv_last_page_len
                )
                self.wrappers[bs] = wrapper
                self.backend.plan_decode(wrapper, batch, gather_kv_indices(batch, bs).to(torch.int32))
            self.graphs[bs], self.logits[bs] = self._capture(bs, batch, stream)
            self.backend.end_graph_capture()
        torch.cuda.synchronize()

    def _capture(
        self, bs: int, batch: AttentionBatch, stream: torch.cuda.Stream
    ) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        fb = ForwardBatch(self.input_ids[:bs], self.positions[:bs], batch, self.backend)
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm up: lazy inits and autotuning must not happen during capture
                self.model.compute_logits(self.model(fb), upcast=False)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, stream=stream):
            logits = self.model.compute_logits(self.model(fb), upcast=False)
        return graph, logits

    def padded_size(self, num_rows: int) -> int | None:
        i = bisect.bisect_left(self.sizes, num_rows)
        return self.sizes[i] if i < len(self.sizes) else None

    def cascade_size(self, num_rows: int) -> int | None:
        """The cascade graph a decode step of num_rows rows would replay (None: none captured for it)."""
        i = bisect.bisect_left(self.cascade_sizes, num_rows)
        return self.cascade_sizes[i] if i < len(self.cascade_sizes) else None

    def _stage_inputs(
        self, bs: int, positions: torch.Tensor, out_slots: torch.Tensor, req_rows: torch.Tensor,
        seq_lens: torch.Tensor,
    ) -> None:
        num_rows = len(seq_lens)
        self.positions[:num_rows].copy_(positions)
        self.out_slots[:num_rows].copy_(out_slots)
        self.req_rows[:num_rows].copy_(req_rows)
        self.seq_lens[:num_rows].copy_(seq_lens)
        if bs > num_rows:  # padding rows: token 0 at position 0 of the all-zero pad row, written to slot 0
            self.input_ids[num_rows:bs].zero_()
            self.positions[num_rows:bs].zero_()
            self.out_slots[num_rows:bs].zero_()
            self.req_rows[num_rows:bs].fill_(self.pad_row)
            self.seq_lens[num_rows:bs].fill_(1)

    def stage_cascade(
        self, positions: torch.Tensor, out_slots: torch.Tensor, req_rows: torch.Tensor,
        seq_lens: torch.Tensor, plan: CascadePlan,
    ) -> int:
        """As `stage`, for the cascade graph of the step's padded size: its inputs and cascade `plan` (made
        for these rows) into the static buffers; returns that size."""
        num_rows = len(seq_lens)
        bs = self.cascade_size(num_rows)
        assert bs is not None, f"no cascade CUDA graph for batch size {num_rows}"
        self._stage_inputs(bs, positions, out_slots, req_rows, seq_lens)
        self.cascades[bs].load(plan, num_rows)
        return bs

    def stage(
        self,
        positions: torch.Tensor,  # [B] int64
        out_slots: torch.Tensor,  # [B]
        req_rows: torch.Tensor,  # [B]
        seq_lens: torch.Tensor,  # [B] int32
        seq_lens_cpu: tuple[int, ...],
    ) -> int:
        """Copy a decode step's inputs but its token ids into the static buffers and plan the attention
        wrapper of its padded size (a size on Triton decode has none); returns that size. Stream-ordered
        after the graph replayed last (whose buffers these are), so it may run while that replay is still
        queued."""
        num_rows = len(seq_lens_cpu)
        bs = self.padded_size(num_rows)
        assert bs is not None, f"no CUDA graph for batch size {num_rows}"
        self._stage_inputs(bs, positions, out_slots, req_rows, seq_lens)
        if bs not in self.wrappers:
            return bs
        padded_lens = seq_lens_cpu + (1,) * (bs - num_rows)
        batch = self._batch(bs, padded_lens)
        indices = gather_kv_indices(batch, sum(padded_lens)).to(torch.int32)  # plan copies it into kv_indices
        self.backend.plan_decode(self.wrappers[bs], batch, indices)
        return bs

    def replay(self, bs: int, input_ids: torch.Tensor, cascade: bool = False) -> torch.Tensor:
        """Run the graph of size `bs` staged last (by `stage`, or `stage_cascade` with cascade=True), on
        these token ids; [B, vocab] logits (model dtype)."""
        num_rows = len(input_ids)
        self.input_ids[:num_rows].copy_(input_ids)
        if cascade:
            self.cascade_graphs[bs].replay()
            return self.cascade_logits[bs][:num_rows]
        self.graphs[bs].replay()
        return self.logits[bs][:num_rows]
