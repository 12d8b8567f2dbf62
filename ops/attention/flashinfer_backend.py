"""FlashInfer attention over the token-level KV pool (page size 1), the default backend on CUDA.

The pool's per-layer buffers [num_slots, kv_heads, head_dim] are FlashInfer's NHD paged layout with one token
per page, so a request's page list is simply its row of req_to_token. Steps where every row decodes one token
use the batch-decode kernels (tensor cores, which win for GQA); any step with a longer row uses batch prefill
with causal masking over [cached prefix | new tokens].

Planning is host work: the index pointers are built on the host from the batch's *_cpu tuples (FlashInfer
copies them to the device itself), so nothing here waits for the GPU. `flashinfer` is imported lazily.
"""

from __future__ import annotations

from typing import Any

import torch

from radixserve.ops.forward_batch import AttentionBatch, KVStore

WORKSPACE_BYTES = 256 << 20


def kv_indptr_host(seq_lens: tuple[int, ...]) -> torch.Tensor:
    """[B + 1] int32 on the host: offsets of each row's pages in the flattened page list.

    NOTE: pageable on purpose. FlashInfer's plan copies it to the device, and a copy from pageable memory
    waits for the stream to drain; that wait keeps plan() from rewriting the wrapper's one pinned workspace
    while the copy of the previous plan's is still queued. Tried pinned (no wait) on an H100: constrained
    batch-64 decode cost +8.5% per pass instead of +1.4-2.1% (bench_constrained), and one of the runs died of
    an illegal memory access (not seen with pageable arguments).
    """
    out = torch.zeros(len(seq_lens) + 1, dtype=torch.int32)
    if seq_lens:
        torch.cumsum(torch.tensor(seq_lens, dtype=torch.int32), 0, out=out[1:])
    return out


def gather_kv_indices(batch: AttentionBatch, total: int) -> torch.Tensor:
    """The pages (= slots) of every row, concatenated: req_to_token[req_rows[r], :seq_lens[r]] for each r.

    `total` (= sum of seq_lens) comes from the host, so the sizes are known without a device sync.
    """
    device = batch.req_to_token.device
    seq_lens = batch.seq_lens.to(torch.int64)
    row_of = torch.repeat_interleave(torch.arange(len(seq_lens), device=device), seq_lens, output_size=total)
    starts = torch.cumsum(seq_lens, 0) - seq_lens  # [B] first flat index of each row
    pos = torch.arange(total, device=device) - starts[row_of]
    return batch.req_to_token[batch.req_rows[row_of], pos]


class FlashInferAttentionBackend:
    """AttentionBackend (ops.forward_batch) on FlashInfer. Mutates the K/V buffers at batch.out_slots only."""

    def __init__(
        self,
        k_buffers: list[torch.Tensor],
        v_buffers: list[torch.Tensor],
        num_q_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float,
    ) -> None:
        import flashinfer

        self._flashinfer: Any = flashinfer
        self.k_buffers = k_buffers
        self.v_buffers = v_buffers
        self.num_q_heads, self.num_kv_heads, self.head_dim = num_q_heads, num_kv_heads, head_dim
        self.scale = scale
        self.dtype = k_buffers[0].dtype
        self.device = k_buffers[0].device
        self.workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=self.device)
        self.prefill = flashinfer.BatchPrefillWithPagedKVCacheWrapper(self.workspace, "NHD")
        self.decode = flashinfer.BatchDecodeWithPagedKVCacheWrapper(self.workspace, "NHD", use_tensor_cores=True)
        self._wrapper: Any = None

    def make_graph_decode_wrapper(
        self, bs: int, indptr: torch.Tensor, indices: torch.Tensor, last_page_len: torch.Tensor
    ) -> Any:
        """A decode wrapper with static buffers for a CUDA graph of batch size bs. Wrappers of every size may
        share the same buffers (only one graph runs at a time, planned right before its replay)."""
        return self._flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            self.workspace, "NHD", use_cuda_graph=True, use_tensor_cores=True,
            paged_kv_indptr_buffer=indptr[: bs + 1], paged_kv_indices_buffer=indices,
            paged_kv_last_page_len_buffer=last_page_len[:bs],
        )

    def plan_decode(self, wrapper: Any, batch: AttentionBatch, indices: torch.Tensor) -> None:
        wrapper.plan(
            kv_indptr_host(batch.seq_lens_cpu), indices,
            torch.ones(batch.num_rows, dtype=torch.int32), self.num_q_heads, self.num_kv_heads, self.head_dim, 1,
            q_data_type=self.dtype, kv_data_type=self.dtype, sm_scale=self.scale,
        )
        self._wrapper = wrapper

    def prepare(self, batch: AttentionBatch) -> None:
        total = sum(batch.seq_lens_cpu)
        indices = gather_kv_indices(batch, total).to(torch.int32)
        if batch.is_decode:
            self.plan_decode(self.decode, batch, indices)
            return
        qo_indptr = kv_indptr_host(batch.extend_lens_cpu)
        self.prefill.plan(
            qo_indptr, kv_indptr_host(batch.seq_lens_cpu), indices, torch.ones(batch.num_rows, dtype=torch.int32),
            self.num_q_heads, self.num_kv_heads, self.head_dim, 1, causal=True, sm_scale=self.scale,
            q_data_type=self.dtype, kv_data_type=self.dtype,
        )
        self._wrapper = self.prefill

    def kv_store(self, layer_id: int, batch: AttentionBatch) -> KVStore | None:
        return KVStore(self.k_buffers[layer_id], self.v_buffers[layer_id], batch.out_slots)

    def forward(
        self,
        q: torch.Tensor,  # [T, q_heads, head_dim]
        k: torch.Tensor,  # [T, kv_heads, head_dim]
        v: torch.Tensor,
        layer_id: int,
        scale: float,
        batch: AttentionBatch,
        kv_stored: bool = False,
    ) -> torch.Tensor:  # [T, q_heads, head_dim]
        assert scale == self.scale, "the backend was planned with another softmax scale"
        k_buf, v_buf = self.k_buffers[layer_id], self.v_buffers[layer_id]
        if not kv_stored:
            from radixserve.ops.triton_fused import store_kv

            store_kv(k, v, k_buf, v_buf, batch.out_slots)
        shape = (k_buf.shape[0], 1, self.num_kv_heads, self.head_dim)  # NHD pages of one token
        return self._wrapper.run(q.contiguous(), (k_buf.view(shape), v_buf.view(shape)))
