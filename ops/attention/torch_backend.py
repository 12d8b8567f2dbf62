"""Reference attention backend in plain torch: one SDPA call per row. Runs anywhere; the fast backends are
tested against it.

For row r with prefix_len = seq_len - extend_len, query i (0 <= i < extend_len) sits at position
prefix_len + i and sees keys 0 .. prefix_len + i of the row:

    keys:     0 ............ prefix_len-1 | prefix_len ........... seq_len-1
    query 0:  x ............ x            | x
    query 1:  x ............ x            | x  x
    query E-1 x ............ x            | x  x  ...............  x
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from radixserve.ops.forward_batch import AttentionBatch, KVStore
from radixserve.ops.kv_dtype import to_kv


class TorchAttentionBackend:
    """The AttentionBackend of ops.forward_batch over per-layer K/V buffers [num_slots, kv_heads, head_dim].

    Mutates the K/V buffers at batch.out_slots only. Loops over rows on the host using the batch's *_cpu
    tuples, so it never synchronizes with the device.
    """

    def __init__(self, k_buffers: list[torch.Tensor], v_buffers: list[torch.Tensor]) -> None:
        assert len(k_buffers) == len(v_buffers)
        self.k_buffers = k_buffers
        self.v_buffers = v_buffers

    def prepare(self, batch: AttentionBatch) -> None:
        pass

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
        assert q.shape[0] == k.shape[0] == v.shape[0] == batch.num_tokens, (
            q.shape,
            k.shape,
            batch.num_tokens,
        )
        assert k.shape[1:] == k_buf.shape[1:] and q.shape[1] % k.shape[1] == 0, (
            q.shape,
            k.shape,
            k_buf.shape,
        )
        if not kv_stored:
            k_buf[batch.out_slots] = to_kv(k, k_buf.dtype)
            v_buf[batch.out_slots] = to_kv(v, v_buf.dtype)

        max_len = max(batch.seq_lens_cpu, default=0)
        tables = batch.req_to_token[:, :max_len].index_select(0, batch.req_rows)  # [B, max_len] slot ids
        if batch.is_decode and batch.num_rows > 1:
            return self._decode_batched(q, k_buf, v_buf, tables, scale, batch)
        out = torch.empty_like(q)
        start = 0
        for r, (seq_len, extend_len) in enumerate(
            zip(batch.seq_lens_cpu, batch.extend_lens_cpu, strict=True)
        ):
            end = start + extend_len
            slots = tables[r, :seq_len].long()
            q_r = q[start:end].transpose(0, 1)  # [q_heads, E, d]
            k_r = k_buf[slots].to(q.dtype).transpose(0, 1)  # [kv_heads, S, d]
            v_r = v_buf[slots].to(q.dtype).transpose(0, 1)  # [kv_heads, S, d]
            mask, causal = None, False
            if extend_len == seq_len:
                causal = extend_len > 1  # SDPA's causal mask is top-left aligned: right only without a prefix
            elif extend_len > 1:
                mask = _prefix_causal_mask(seq_len - extend_len, extend_len, seq_len, q.device)
            o = F.scaled_dot_product_attention(
                q_r, k_r, v_r, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=True
            )  # [q_heads, E, d]
            out[start:end] = o.transpose(0, 1)
            start = end
        return out


    @staticmethod
    def _decode_batched(
        q: torch.Tensor,  # [B, q_heads, d]
        k_buf: torch.Tensor,
        v_buf: torch.Tensor,
        tables: torch.Tensor,  # [B, max_len]
        scale: float,
        batch: AttentionBatch,
    ) -> torch.Tensor:
        """All decode rows in one SDPA call over their KV padded to the longest row (padding masked out)."""
        max_len = tables.shape[1]
        slots = tables.long()
        k = k_buf[slots].to(q.dtype).transpose(1, 2)  # [B, kv_heads, max_len, d]
        v = v_buf[slots].to(q.dtype).transpose(1, 2)
        lens = torch.tensor(batch.seq_lens_cpu, device=q.device)
        mask = torch.arange(max_len, device=q.device)[None, :] < lens[:, None]  # [B, max_len]
        o = F.scaled_dot_product_attention(
            q.unsqueeze(2), k, v, attn_mask=mask[:, None, None, :], scale=scale, enable_gqa=True
        )  # [B, q_heads, 1, d]
        return o.squeeze(2)


def _prefix_causal_mask(prefix_len: int, extend_len: int, seq_len: int, device: torch.device) -> torch.Tensor:
    """[E, S] bool, True where query i may see key j: j <= prefix_len + i."""
    query_pos = torch.arange(prefix_len, prefix_len + extend_len, device=device)
    key_pos = torch.arange(seq_len, device=device)
    return key_pos[None, :] <= query_pos[:, None]
