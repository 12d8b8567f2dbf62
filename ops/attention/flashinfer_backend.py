"""FlashInfer attention over the token-level KV pool (page size 1), the default backend on CUDA.

The pool's per-layer buffers [num_slots, kv_heads, head_dim] are FlashInfer's NHD paged layout with one token
per page, so a request's page list is simply its row of req_to_token. Steps where every row decodes one token
use the batch-decode kernels (tensor cores, which win for GQA); rows with more new tokens use batch prefill
with causal masking over [cached prefix | new tokens]. A mixed step (decode rows first, then prompt chunks)
runs both, each on its rows: FlashInfer's prefill kernel took ~0.44 ms per decode row riding in a mixed step
on an H100 (an offline run's step times; a decode step spends ~0.17), since its tiles are sized for the long
prompt rows. Decode rows that share long cached prefixes (the scheduler says which, in `shared_lens_cpu`) may
run as cascade attention instead (cascade.py): the prefix level on an FA2 prefill wrapper of its own, the
rest of each row on a second decode wrapper, merged per layer; over an FP8 pool, the Triton cascade kernels
(triton_cascade.py) instead, which need no FlashInfer plan. Decode steps of at most `triton_decode_max_rows`
rows (RADIXSERVE_TRITON_DECODE_MAX_BS, default 8; 0: none) run radixserve's Triton split-KV decode kernel
(with PDL, no plan) instead of FlashInfer's: at batch 1, FlashInfer's tensor-core decode is the prefill kernel
plus a merge, ~10-13 us a layer for 4 MB of K/V (an H200 trace, session 10), against ~1 us of bytes. Batch-1
decode of Llama-3.1-8B on H200s: TP1 4.39 -> 4.30 ms a token, TP2 2.87 -> 2.73 (session 11). Session 11 also
fused the rotary kernel (q and the new k rotated, K/V stored by the split program holding the new token) and
the reduce kernel (the last split program to finish, by an atomic ticket) into the split kernel: slower,
TP1 4.35 and 4.48 ms (two versions of the reduce) against 4.23, TP2 2.81 against 2.69; taken out.

Workspaces: wrappers planned for the same step need their own. A (`workspace`): plain decode, whole-step
prefill, cascade level 0 and the CUDA-graph decode wrappers; B: cascade level 1; C: a mixed step's prompts.

Planning is host work: the index pointers are built on the host from the batch's *_cpu tuples (FlashInfer
copies them to the device itself; a copy from pageable memory waits for the stream, see kv_indptr_host). A
cascade plan's index ranges go over in one such copy as well. `flashinfer` is imported lazily.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from radixserve.errors import UnsupportedFeatureError
from radixserve.ops.attention.cascade import CascadePlan, plan_cascade
from radixserve.ops.attention.graph_cascade import GraphCascade
from radixserve.ops.attention.triton_cascade import (
    CASCADE_MIN_SPLIT_LEN,
    CascadeTensors,
    cascade_decode_attention,
    cascade_tensors,
    cascade_workspace,
)
from radixserve.ops.attention.triton_ops import decode_attention, decode_num_splits, decode_workspace
from radixserve.ops.forward_batch import AttentionBatch, KVStore
from radixserve.ops.kv_dtype import FP8_DTYPES
from radixserve.ops.triton_launch import pdl_enabled

WORKSPACE_BYTES = 256 << 20
DISABLE_CASCADE_ENV = "RADIXSERVE_DISABLE_CASCADE"  # =1: never cascade (for A/B measurements)
DISABLE_MIXED_SPLIT_ENV = "RADIXSERVE_DISABLE_MIXED_SPLIT"  # =1: a mixed step in one batch prefill (A/B)
DECODE_CUDA_CORES_ENV = "RADIXSERVE_DECODE_CUDA_CORES"  # =1: decode on FlashInfer's CUDA-core kernels (A/B)
# Which kernels run cascade decode: "triton" (the default over FP8 pools) or "flashinfer" (over 16-bit ones).
CASCADE_KERNELS_ENV = "RADIXSERVE_CASCADE_KERNELS"
# Decode steps of at most this many rows on the Triton split-KV kernel (see the docstring); unset: 8.
TRITON_DECODE_MAX_BS_ENV = "RADIXSERVE_TRITON_DECODE_MAX_BS"
TRITON_DECODE_MAX_BS = 8
# Its grid: at most 16 splits of at least 64 keys (1,024 keys: 16 programs of one 64-key tile per kv head).
TRITON_DECODE_MAX_SPLITS = 16
TRITON_DECODE_MIN_SPLIT_LEN = 64


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


def gather_row_ranges(
    req_to_token: torch.Tensor, rows: torch.Tensor, starts: torch.Tensor | None, lens: torch.Tensor,
    total: int,
) -> torch.Tensor:
    """req_to_token[rows[i], starts[i] : starts[i] + lens[i]] for each i, concatenated (starts None: 0).

    `total` (= sum of lens) comes from the host, so the sizes are known without a device sync.
    """
    device = req_to_token.device
    lens = lens.to(torch.int64)
    row_of = torch.repeat_interleave(torch.arange(len(lens), device=device), lens, output_size=total)
    offsets = torch.cumsum(lens, 0) - lens  # [n] first flat index of each range
    pos = torch.arange(total, device=device) - offsets[row_of]
    if starts is not None:
        pos += starts.to(torch.int64)[row_of]
    return req_to_token[rows[row_of], pos]


def gather_kv_indices(batch: AttentionBatch, total: int) -> torch.Tensor:
    """The pages (= slots) of every row, concatenated: req_to_token[req_rows[r], :seq_lens[r]] for each r."""
    return gather_row_ranges(batch.req_to_token, batch.req_rows, None, batch.seq_lens, total)


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
        dtype: torch.dtype | None = None,  # queries and outputs; None: the pool's (which must not be FP8)
        decode_tensor_cores: bool | None = None,  # None: yes unless RADIXSERVE_DECODE_CUDA_CORES=1
        cascade_kernels: str | None = None,  # "triton" | "flashinfer"; None: RADIXSERVE_CASCADE_KERNELS, else
        # triton over FP8 pools, flashinfer over 16-bit ones
        triton_decode_max_rows: int | None = None,  # None: RADIXSERVE_TRITON_DECODE_MAX_BS, else 8
    ) -> None:
        import flashinfer

        self._flashinfer: Any = flashinfer
        self.k_buffers = k_buffers
        self.v_buffers = v_buffers
        self.num_q_heads, self.num_kv_heads, self.head_dim = num_q_heads, num_kv_heads, head_dim
        self.scale = scale
        self.kv_dtype = k_buffers[0].dtype  # the model's dtype, or FP8 (ops/kv_dtype.py)
        self.dtype = dtype or self.kv_dtype
        if self.dtype in FP8_DTYPES:
            raise ValueError("an FP8 KV pool needs the queries' dtype (bfloat16 or float16)")
        self.device = k_buffers[0].device
        # FlashInfer's SM90 prefill (FA3, what "auto" picks on an H100) takes no FP8 pages under 16-bit
        # queries; FA2 widens FP8 tiles as it loads them.
        prefill_backend = "fa2" if self.kv_dtype in FP8_DTYPES else "auto"
        if decode_tensor_cores is None:
            decode_tensor_cores = os.environ.get(DECODE_CUDA_CORES_ENV, "0") != "1"
        self.decode_tensor_cores = decode_tensor_cores
        self.workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=self.device)
        self.prefill = flashinfer.BatchPrefillWithPagedKVCacheWrapper(
            self.workspace, "NHD", backend=prefill_backend)
        self.decode = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            self.workspace, "NHD", use_tensor_cores=decode_tensor_cores)
        default_kernels = "triton" if self.kv_dtype in FP8_DTYPES else "flashinfer"
        kernels = cascade_kernels or os.environ.get(CASCADE_KERNELS_ENV, default_kernels)
        if kernels not in ("triton", "flashinfer"):
            raise ValueError(f"cascade kernels ({CASCADE_KERNELS_ENV}) must be 'triton' or 'flashinfer', "
                             f"not {kernels!r}")
        self.cascade_on_triton = kernels == "triton"
        self.num_sms = torch.cuda.get_device_properties(self.device).multi_processor_count
        # Cascade decode on FlashInfer (ops/attention/cascade.py): level 0 on a prefill wrapper of its own
        # (sharing the workspace of the wrappers a decode step does not use), level 1 on a decode wrapper
        # planned at the same time, so with a workspace of its own. None with the Triton cascade.
        # NOTE: FA2 on purpose. The SM90 (FA3) kernel that "auto" picks on an H100 passed the isolated checks
        # but died of an illegal memory access within seconds of the 64 x 16 shared-prefix benchmark (every
        # time, with or without PDL; CUDA_LAUNCH_BLOCKING put it in BatchPrefillWithPagedKVCacheSM90Run).
        self.prefix_prefill: Any = None
        self.suffix_decode: Any = None
        if not self.cascade_on_triton:
            self.prefix_prefill = flashinfer.BatchPrefillWithPagedKVCacheWrapper(
                self.workspace, "NHD", backend="fa2")
            suffix_workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=self.device)
            self.suffix_decode = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                suffix_workspace, "NHD", use_tensor_cores=decode_tensor_cores)
        self.extend_workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=self.device)
        self.extend_prefill = flashinfer.BatchPrefillWithPagedKVCacheWrapper(
            self.extend_workspace, "NHD", backend=prefill_backend)
        self._wrapper: Any = None  # the decode rows' wrapper, or the whole step's
        self._cascade = False  # the decode rows run as cascade (prefix_prefill + suffix_decode)
        # ... or as Triton cascade: this step's plan on the device, its workspace and the decode rows' batch
        self._triton_cascade: tuple[CascadeTensors, tuple[torch.Tensor, torch.Tensor], AttentionBatch] | None
        self._triton_cascade = None
        self._split = 0  # a mixed step's decode rows (they run apart from its prompt rows); 0: not split
        self.cascade_enabled = os.environ.get(DISABLE_CASCADE_ENV, "0") != "1"
        self.split_mixed_steps = os.environ.get(DISABLE_MIXED_SPLIT_ENV, "0") != "1"
        self.num_cascade_steps = 0
        if triton_decode_max_rows is None:
            value = os.environ.get(TRITON_DECODE_MAX_BS_ENV, str(TRITON_DECODE_MAX_BS))
            if not value.isdigit():
                raise ValueError(f"{TRITON_DECODE_MAX_BS_ENV} must be a row count >= 0, not {value!r}")
            triton_decode_max_rows = int(value)
        if triton_decode_max_rows < 0:
            raise ValueError(f"triton_decode_max_rows must be >= 0, not {triton_decode_max_rows}")
        self.triton_decode_max_rows = triton_decode_max_rows
        # This step's decode rows on the Triton kernel (None: not), and whether its grid is a CUDA graph's
        # (sized for any length). One workspace: graphs point to it, so it is never reallocated.
        self._triton_decode: AttentionBatch | None = None
        self._triton_decode_graph = False
        self._triton_decode_workspace = decode_workspace(
            triton_decode_max_rows, num_q_heads, head_dim, TRITON_DECODE_MAX_SPLITS, self.device)
        self._pdl = pdl_enabled(self.device)
        if self.cascade_enabled:
            self._load_cascade_kernels()

    def _load_cascade_kernels(self) -> None:
        """Run cascade attention once on the padding slot 0 (two rows sharing it), so that FlashInfer
        compiles or loads the FA2 prefill module (or Triton its kernels) at startup: otherwise the first
        shared-prefix step of a server waits for the JIT (seen in benchmark runs on a fresh H100: ~10 s)."""
        dev, rows = self.device, 2
        batch = AttentionBatch(
            req_rows=torch.arange(rows, device=dev),
            seq_lens=torch.full((rows,), 3, dtype=torch.int32, device=dev),
            extend_lens=torch.ones(rows, dtype=torch.int32, device=dev),
            extend_starts=torch.arange(rows, dtype=torch.int32, device=dev),
            out_slots=torch.zeros(rows, dtype=torch.int64, device=dev),
            # 16 columns: a row stride divisible by 16, as ReqToTokenTable pads its rows to, so Triton
            # compiles the variant the steps will use
            req_to_token=torch.zeros(rows, 16, dtype=torch.int32, device=dev),
            seq_lens_cpu=(3, 3), extend_lens_cpu=(1, 1), is_decode=True, shared_lens_cpu=(0, 2),
        )
        plan = CascadePlan(group_starts=(0, rows), prefix_lens=(2,), row_prefix_lens=(2, 2), saved_tokens=2)
        self._set_cascade(batch, plan)
        q = torch.zeros(rows, self.num_q_heads, self.head_dim, dtype=self.dtype, device=dev)
        kv = q[:, : self.num_kv_heads]
        self.forward(q, kv, kv, 0, self.scale, batch, kv_stored=True)  # reads slot 0, writes no KV
        if self._triton_cascade is not None:  # level 1 above merged level 0 itself; now its split variant
            tensors, workspace, _ = self._triton_cascade
            cascade_decode_attention(q, self.k_buffers[0], self.v_buffers[0], batch.req_to_token,
                                     batch.req_rows, batch.seq_lens, self.scale, tensors, workspace=workspace,
                                     fuse_merge=False)
        self._cascade, self._triton_cascade, self.num_cascade_steps = False, None, 0

    def use_graph_cascade(self, graph: GraphCascade, batch: AttentionBatch) -> None:
        """Until end_graph_capture, run decode steps as Triton cascade over `graph`'s static plan and
        workspace (a cascade CUDA graph's capture: at each replay the plan is what graph.load last wrote)."""
        if not self.cascade_on_triton:
            raise UnsupportedFeatureError(
                "cascade CUDA graphs run the Triton cascade kernels: an FP8 KV cache, or "
                f"{CASCADE_KERNELS_ENV}=triton")
        self._cascade, self._split = False, 0
        self._triton_cascade = (graph.tensors, graph.workspace, batch)

    def use_graph_triton_decode(self, batch: AttentionBatch) -> None:
        """Until end_graph_capture, run decode steps on the Triton split-KV kernel over `batch`'s (static)
        tensors, its grid sized for any sequence length (a plain CUDA graph's capture, at most
        triton_decode_max_rows rows: such a graph needs no plan before its replays)."""
        if batch.num_rows > self.triton_decode_max_rows:
            raise ValueError(f"{batch.num_rows} rows: the Triton decode workspace holds "
                             f"{self.triton_decode_max_rows}")
        self._cascade, self._triton_cascade, self._split = False, None, 0
        self._triton_decode, self._triton_decode_graph = batch, True

    def end_graph_capture(self) -> None:
        """Ends use_graph_cascade or use_graph_triton_decode."""
        self._triton_cascade, self._triton_decode, self._triton_decode_graph = None, None, False

    def make_graph_decode_wrapper(
        self, bs: int, indptr: torch.Tensor, indices: torch.Tensor, last_page_len: torch.Tensor
    ) -> Any:
        """A decode wrapper with static buffers for a CUDA graph of batch size bs. Wrappers of every size may
        share the same buffers (only one graph runs at a time, planned right before its replay)."""
        return self._flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            self.workspace, "NHD", use_cuda_graph=True, use_tensor_cores=self.decode_tensor_cores,
            paged_kv_indptr_buffer=indptr[: bs + 1], paged_kv_indices_buffer=indices,
            paged_kv_last_page_len_buffer=last_page_len[:bs],
        )

    def plan_decode(self, wrapper: Any, batch: AttentionBatch, indices: torch.Tensor) -> None:
        wrapper.plan(
            kv_indptr_host(batch.seq_lens_cpu), indices, torch.ones(batch.num_rows, dtype=torch.int32),
            self.num_q_heads, self.num_kv_heads, self.head_dim, 1,
            q_data_type=self.dtype, kv_data_type=self.kv_dtype, sm_scale=self.scale,
        )
        self._wrapper = wrapper

    def prepare(self, batch: AttentionBatch) -> None:
        self._cascade, self._triton_cascade, self._split = False, None, 0
        self._triton_decode, self._triton_decode_graph = None, False
        d = batch.num_leading_decode_rows
        if d == batch.num_rows:
            self._prepare_decode(batch)
        elif d == 0 or not self.split_mixed_steps:
            self._plan_prefill(self.prefill, batch)
            self._wrapper = self.prefill
        else:
            decode_rows, prompt_rows = batch.split_rows(d)
            self._prepare_decode(decode_rows)
            self._plan_prefill(self.extend_prefill, prompt_rows)
            self._split = d

    @property
    def split_decode_rows(self) -> int:
        """Decode rows of the planned step that run apart from its prompt rows (0: the step is not split)."""
        return self._split

    def _prepare_decode(self, batch: AttentionBatch) -> None:
        if batch.shared_lens_cpu and self.cascade_enabled:
            cascade = plan_cascade(batch.seq_lens_cpu, batch.shared_lens_cpu)
            if cascade is not None:
                self._set_cascade(batch, cascade)
                return
        if batch.num_rows <= self.triton_decode_max_rows:
            self._triton_decode = batch  # no plan
            return
        indices = gather_kv_indices(batch, sum(batch.seq_lens_cpu)).to(torch.int32)
        self.plan_decode(self.decode, batch, indices)

    def _plan_prefill(self, wrapper: Any, batch: AttentionBatch) -> None:
        indices = gather_kv_indices(batch, sum(batch.seq_lens_cpu)).to(torch.int32)
        wrapper.plan(
            kv_indptr_host(batch.extend_lens_cpu), kv_indptr_host(batch.seq_lens_cpu), indices,
            torch.ones(batch.num_rows, dtype=torch.int32),
            self.num_q_heads, self.num_kv_heads, self.head_dim, 1, causal=True, sm_scale=self.scale,
            q_data_type=self.dtype, kv_data_type=self.kv_dtype,
        )

    def _set_cascade(self, batch: AttentionBatch, plan: CascadePlan) -> None:
        if self.cascade_on_triton:
            tensors = cascade_tensors(plan, batch.seq_lens_cpu, self.num_q_heads, self.num_kv_heads,
                                      self.device, num_sms=self.num_sms)
            workspace = cascade_workspace(batch.num_rows, self.num_q_heads, self.head_dim, self.device)
            self._triton_cascade = (tensors, workspace, batch)
            self.num_cascade_steps += 1
        else:
            self._plan_cascade(batch, plan)

    def _plan_cascade(self, batch: AttentionBatch, plan: CascadePlan) -> None:
        G, B = plan.num_groups, batch.num_rows
        host = plan.group_starts[:-1] + plan.prefix_lens + plan.row_prefix_lens
        firsts, prefix_lens, row_prefix = torch.tensor(host, device=self.device).split([G, G, B])
        prefix_indices = gather_row_ranges(
            batch.req_to_token, batch.req_rows[firsts], None, prefix_lens, sum(plan.prefix_lens))
        suffix_lens = plan.suffix_lens(batch.seq_lens_cpu)
        suffix_indices = gather_row_ranges(
            batch.req_to_token, batch.req_rows, row_prefix, batch.seq_lens - row_prefix, sum(suffix_lens))
        self.prefix_prefill.plan(
            torch.tensor(plan.group_starts, dtype=torch.int32), kv_indptr_host(plan.prefix_lens),
            prefix_indices.to(torch.int32), torch.ones(G, dtype=torch.int32),
            self.num_q_heads, self.num_kv_heads, self.head_dim, 1, causal=False, sm_scale=self.scale,
            q_data_type=self.dtype, kv_data_type=self.kv_dtype,
        )
        self.suffix_decode.plan(
            kv_indptr_host(suffix_lens), suffix_indices.to(torch.int32), torch.ones(B, dtype=torch.int32),
            self.num_q_heads, self.num_kv_heads, self.head_dim, 1,
            q_data_type=self.dtype, kv_data_type=self.kv_dtype, sm_scale=self.scale,
        )
        self._cascade = True
        self.num_cascade_steps += 1

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
        kv = (k_buf.view(shape), v_buf.view(shape))
        # q is a view into the QKV projection's output (rotated in place); the Triton cascade reads it through
        # its strides, FlashInfer's kernels want it contiguous (a copy a layer: ~10 us at 1,000 rows).
        if not self._split:
            if self._cascade or self._triton_cascade or self._triton_decode is not None:
                return self._attend_decode(q, kv, layer_id, None)
            return self._wrapper.run(q.contiguous(), kv)
        d = self._split
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        self._attend_decode(q[:d], kv, layer_id, out[:d])
        self.extend_prefill.run(q[d:].contiguous(), kv, out=out[d:])
        return out

    def _attend_decode(self, q: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], layer_id: int,
                       out: torch.Tensor | None) -> torch.Tensor:
        """The decode rows' attention, plain or cascade, into `out` (a fresh tensor when None)."""
        if self._triton_decode is not None:
            rows = self._triton_decode
            max_len = None if self._triton_decode_graph else max(rows.seq_lens_cpu, default=1)
            splits = decode_num_splits(rows.num_rows, self.num_q_heads, self.num_kv_heads, self.num_sms,
                                       TRITON_DECODE_MAX_SPLITS, TRITON_DECODE_MIN_SPLIT_LEN, max_len)
            return decode_attention(
                q, self.k_buffers[layer_id], self.v_buffers[layer_id], rows.req_to_token, rows.req_rows,
                rows.seq_lens, self.scale, splits, min_split_len=TRITON_DECODE_MIN_SPLIT_LEN,
                workspace=self._triton_decode_workspace, out=out, pdl=self._pdl)
        if self._triton_cascade is not None:
            tensors, workspace, rows = self._triton_cascade
            return cascade_decode_attention(
                q, self.k_buffers[layer_id], self.v_buffers[layer_id], rows.req_to_token, rows.req_rows,
                rows.seq_lens, self.scale, tensors, min_split_len=CASCADE_MIN_SPLIT_LEN, workspace=workspace,
                out=out)
        q = q.contiguous()
        if not self._cascade:
            return self._wrapper.run(q, kv, out=out)
        out, lse = self.prefix_prefill.run(q, kv, out=out, return_lse=True)
        suffix_out, suffix_lse = self.suffix_decode.run(q, kv, return_lse=True)
        self._flashinfer.merge_state_in_place(out, lse, suffix_out, suffix_lse)
        return out
