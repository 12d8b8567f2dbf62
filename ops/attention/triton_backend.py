"""Triton attention backend: the AttentionBackend of ops.forward_batch on the kernels of triton_kernels.py.

Each layer stores its new K/V into the pool (one Triton store kernel), then runs split-KV decode when every
row decodes one token, else the extend kernel (which also serves mixed steps: a decode row is an extend row of
length 1). Decode rows sharing long cached prefixes run as cascade attention (triton_cascade.py), planned once
a step in `prepare`. Sizes come from the batch's *_cpu tuples; nothing waits for the device.

CUDA graphs (decode). A graph bakes in grids and pointers, so a graph runner must keep static:
  - the tensors of the AttentionBatch (req_rows, seq_lens, out_slots, req_to_token) and q/k/v: same storage,
    updated in place before each replay; the K/V buffers of the backend;
  - the padded batch size (one graph per size; padding rows use a valid row, e.g. seq_len 1 on slot 0);
  - the number of KV splits: while a capture is running, num_kv_splits() ignores the sequence lengths and
    depends only on the batch size and head counts, and each row then uses
    min(splits, cdiv(seq_len, min_split_len)) of them on the device, so one graph serves every length;
  - the split-KV workspace: call reserve_decode_workspace(max_bs, num_q_heads) once before capturing; it is
    never reallocated afterwards (without it each call allocates its own, inside the graph's pool);
  - max_kv_splits, min_split_len and num_sms: fixed at construction.
Kernels compile on first use, so warm up (one eager decode step per size) before capturing.
"""

from __future__ import annotations

import torch

from radixserve.ops.attention.cascade import CascadePlan, plan_cascade
from radixserve.ops.attention.triton_cascade import (
    MAX_LEVEL_SPLITS,
    CascadeTensors,
    cascade_decode_attention,
    cascade_tensors,
    cascade_workspace,
)
from radixserve.ops.attention.triton_ops import (
    decode_attention,
    decode_num_splits,
    decode_workspace,
    extend_attention,
)
from radixserve.ops.forward_batch import AttentionBatch, KVStore
from radixserve.ops.triton_fused import store_kv


class TritonAttentionBackend:
    """AttentionBackend over per-layer K/V buffers [num_slots, kv_heads, head_dim].

    Mutates the K/V buffers at batch.out_slots and its own decode workspace, nothing else.
    """

    def __init__(
        self,
        k_buffers: list[torch.Tensor],
        v_buffers: list[torch.Tensor],
        *,
        max_kv_splits: int = 16,
        min_split_len: int = 128,
        num_sms: int | None = None,
        cascade: bool = True,
    ) -> None:
        if not k_buffers or len(k_buffers) != len(v_buffers):
            raise ValueError("need one K and one V buffer per layer")
        if max_kv_splits < 1 or min_split_len < 1:
            raise ValueError(
                f"max_kv_splits ({max_kv_splits}) and min_split_len ({min_split_len}) must be > 0"
            )
        self.k_buffers = k_buffers
        self.v_buffers = v_buffers
        self.num_kv_heads, self.head_dim = k_buffers[0].shape[1], k_buffers[0].shape[2]
        self.device = k_buffers[0].device
        self.max_kv_splits = max_kv_splits
        self.min_split_len = min_split_len
        if num_sms is None:
            is_cuda = self.device.type == "cuda"
            num_sms = torch.cuda.get_device_properties(self.device).multi_processor_count if is_cuda else 4
        self.num_sms = num_sms
        self._workspace: tuple[torch.Tensor, torch.Tensor] | None = None
        # This step's cascade plan (host), and its device tensors and workspace, built at the first layer.
        self._cascade_plan: CascadePlan | None = None
        self._planned: AttentionBatch | None = None  # the batch it was planned for
        self._cascade: tuple[CascadeTensors, tuple[torch.Tensor, torch.Tensor]] | None = None
        self.cascade_enabled = cascade
        self.num_cascade_steps = 0

    def reserve_decode_workspace(self, max_rows: int, num_q_heads: int) -> None:
        """Allocate the split-KV scratch once, for up to max_rows decode rows (CUDA graphs point to it)."""
        assert self._workspace is None, "the decode workspace is reserved once: graphs may point to it"
        splits, device = self.max_kv_splits, self.device
        self._workspace = decode_workspace(max_rows, num_q_heads, self.head_dim, splits, device)

    def num_kv_splits(self, num_rows: int, num_q_heads: int, max_seq_len: int | None) -> int:
        """Splits of the decode grid (triton_ops.decode_num_splits; max_seq_len None: CUDA-graph capture)."""
        return decode_num_splits(num_rows, num_q_heads, self.num_kv_heads, self.num_sms, self.max_kv_splits,
                                 self.min_split_len, max_seq_len)

    def prepare(self, batch: AttentionBatch) -> None:
        """Plan cascade attention for a decode step whose rows share cached prefixes (eager steps only: CUDA
        graphs run plain decode)."""
        self._cascade_plan, self._cascade, self._planned = None, None, batch
        if self.cascade_enabled and batch.is_decode and batch.shared_lens_cpu:
            self._cascade_plan = plan_cascade(batch.seq_lens_cpu, batch.shared_lens_cpu)
            self.num_cascade_steps += self._cascade_plan is not None

    def kv_store(self, layer_id: int, batch: AttentionBatch) -> KVStore | None:
        return None

    def forward(
        self,
        q: torch.Tensor,  # [T, q_heads, head_dim]
        k: torch.Tensor,  # [T, kv_heads, head_dim]
        v: torch.Tensor,  # [T, kv_heads, head_dim]
        layer_id: int,
        scale: float,
        batch: AttentionBatch,
        kv_stored: bool = False,
    ) -> torch.Tensor:  # [T, q_heads, head_dim]
        k_buf, v_buf = self.k_buffers[layer_id], self.v_buffers[layer_id]
        if not kv_stored:
            store_kv(k, v, k_buf, v_buf, batch.out_slots)
        if batch.is_decode:
            return self._decode(q, k_buf, v_buf, scale, batch)
        return extend_attention(
            q,
            k_buf,
            v_buf,
            batch.req_to_token,
            batch.req_rows,
            batch.seq_lens,
            batch.extend_lens,
            batch.extend_starts,
            scale,
            max(batch.extend_lens_cpu, default=0),
        )

    def _decode(
        self, q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, scale: float, batch: AttentionBatch
    ) -> torch.Tensor:
        num_rows, num_q_heads = q.shape[0], q.shape[1]
        capturing = q.is_cuda and torch.cuda.is_current_stream_capturing()
        if self._cascade_plan is not None and batch is self._planned and not capturing:
            return self._cascade_decode(q, k_buf, v_buf, scale, batch, self._cascade_plan)
        max_seq_len = None if capturing else max(batch.seq_lens_cpu, default=0)
        splits = self.num_kv_splits(num_rows, num_q_heads, max_seq_len)
        workspace = self._workspace
        if workspace is None or workspace[0].shape[0] < num_rows or workspace[0].shape[1] != num_q_heads:
            workspace = decode_workspace(num_rows, num_q_heads, self.head_dim, self.max_kv_splits, q.device)
        return decode_attention(
            q,
            k_buf,
            v_buf,
            batch.req_to_token,
            batch.req_rows,
            batch.seq_lens,
            scale,
            splits,
            min_split_len=self.min_split_len,
            workspace=workspace,
        )

    def _cascade_decode(
        self, q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, scale: float, batch: AttentionBatch,
        plan: CascadePlan,
    ) -> torch.Tensor:
        if self._cascade is None:  # the step's first layer: one host->device copy, one workspace
            tensors = cascade_tensors(
                plan, batch.seq_lens_cpu, q.shape[1], self.num_kv_heads, q.device, num_sms=self.num_sms,
                min_split_len=self.min_split_len, max_splits=min(self.max_kv_splits, MAX_LEVEL_SPLITS))
            workspace = cascade_workspace(q.shape[0], q.shape[1], self.head_dim, q.device)
            self._cascade = (tensors, workspace)
        tensors, workspace = self._cascade
        return cascade_decode_attention(
            q, k_buf, v_buf, batch.req_to_token, batch.req_rows, batch.seq_lens, scale, tensors,
            min_split_len=self.min_split_len, workspace=workspace)
