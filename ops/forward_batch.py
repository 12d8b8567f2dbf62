"""The one typed object a model's forward receives: token ids, positions and the attention metadata.

Layout of one step (B rows, T = sum(extend_lens) new tokens, rows laid out one after another):

    row r: cached prefix (already in the KV pool)      | extend_lens[r] new tokens
           req_to_token[req_rows[r], 0 : prefix_len_r] | req_to_token[req_rows[r], prefix_len_r : seq_lens[r]]
           where prefix_len_r = seq_lens[r] - extend_lens[r]

A decode row is an extend row with extend_lens[r] == 1. New token t of row r sits at position
prefix_len_r + i and its K/V go to slot out_slots[t]; the worker has already written those slots into
req_to_token before the forward, so attention may read the whole row from the table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True, slots=True)
class AttentionBatch:
    req_rows: torch.Tensor  # [B] int64, rows of req_to_token
    seq_lens: torch.Tensor  # [B] int32, KV length of each row after this step
    extend_lens: torch.Tensor  # [B] int32, new tokens of each row in this step
    extend_starts: torch.Tensor  # [B] int32, offset of each row's first new token in the [T] tensors
    out_slots: torch.Tensor  # [T] int64, KV slot of each new token
    req_to_token: torch.Tensor  # [max_rows, max_context] int32, slot ids of every request's tokens
    # Host copies, so that backends need no device->host sync to plan or loop.
    seq_lens_cpu: tuple[int, ...]
    extend_lens_cpu: tuple[int, ...]
    is_decode: bool  # every row has extend_len == 1
    # One per leading decode row (all rows of a decode step, the first ones of a mixed step), or empty when
    # unknown: row r's first shared_lens_cpu[r] KV slots are row r-1's (one cached prefix under both).
    # Backends may read a shared prefix once per group (cascade.py).
    shared_lens_cpu: tuple[int, ...] = ()

    @property
    def num_rows(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def num_tokens(self) -> int:
        return int(self.out_slots.shape[0])

    @property
    def num_leading_decode_rows(self) -> int:
        """Rows at the head of the step with one new token each (a mixed step puts its decode rows first)."""
        if self.is_decode:
            return self.num_rows
        n = 0
        for e in self.extend_lens_cpu:
            if e != 1:
                break
            n += 1
        return n

    def split_rows(self, d: int) -> tuple[AttentionBatch, AttentionBatch]:
        """(rows [0, d), rows [d, B)) as batches of their own, for d leading decode rows (so the first d
        tokens are theirs). Views of the device tensors; shared_lens_cpu goes with the head rows."""
        assert 0 < d < self.num_rows and d <= self.num_leading_decode_rows
        head = AttentionBatch(
            req_rows=self.req_rows[:d], seq_lens=self.seq_lens[:d], extend_lens=self.extend_lens[:d],
            extend_starts=self.extend_starts[:d], out_slots=self.out_slots[:d],
            req_to_token=self.req_to_token, seq_lens_cpu=self.seq_lens_cpu[:d],
            extend_lens_cpu=self.extend_lens_cpu[:d], is_decode=True, shared_lens_cpu=self.shared_lens_cpu,
        )
        tail = AttentionBatch(
            req_rows=self.req_rows[d:], seq_lens=self.seq_lens[d:], extend_lens=self.extend_lens[d:],
            extend_starts=self.extend_starts[d:] - d, out_slots=self.out_slots[d:],
            req_to_token=self.req_to_token, seq_lens_cpu=self.seq_lens_cpu[d:],
            extend_lens_cpu=self.extend_lens_cpu[d:], is_decode=False,
        )
        return head, tail


@dataclass(frozen=True, slots=True)
class KVStore:
    """Where one layer's new K/V go: k_buffer[slots] = k, v_buffer[slots] = v."""

    k_buffer: torch.Tensor  # [num_slots, kv_heads, head_dim]
    v_buffer: torch.Tensor
    slots: torch.Tensor  # [T] int64


class AttentionBackend(Protocol):
    """Stores each layer's new K/V into the pool, then attends every new query over its row's KV."""

    def prepare(self, batch: AttentionBatch) -> None:
        """Called once per step before the forward (FlashInfer plans here; the torch backend does nothing)."""
        ...

    def kv_store(self, layer_id: int, batch: AttentionBatch) -> KVStore | None:
        """Where the rotary kernel may write this layer's new K/V itself, saving a kernel per layer (then
        `forward` gets kv_stored=True); None: `forward` stores them."""
        ...

    def forward(
        self,
        q: torch.Tensor,  # [T, num_q_heads, head_dim]
        k: torch.Tensor,  # [T, num_kv_heads, head_dim]
        v: torch.Tensor,  # [T, num_kv_heads, head_dim]
        layer_id: int,
        scale: float,
        batch: AttentionBatch,
        kv_stored: bool = False,
    ) -> torch.Tensor:  # [T, num_q_heads, head_dim]
        ...


@dataclass(frozen=True, slots=True)
class ForwardBatch:
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    attn: AttentionBatch
    backend: AttentionBackend
