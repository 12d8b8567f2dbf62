"""Vocabulary-parallel token embedding and LM head.

The vocabulary is cut into tp equal ranges (the last one padded with zero rows when tp does not divide it):

    rank r owns ids [r * vocab_local, min((r + 1) * vocab_local, vocab_size))

The embedding looks up the ids it owns, writes zeros for the others, and all-reduces, so every rank ends with
the full [T, hidden]. The head computes logits for its range and all-gathers them into [N, vocab].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from radixserve.ops.linear import linear
from radixserve.ops.parallel import TPGroup


class VocabParallelEmbedding(nn.Module):
    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        tp: TPGroup,
        dtype: torch.dtype,
        shared_weight: nn.Parameter | None = None,
    ) -> None:
        """`shared_weight`: use this parameter (another vocab-parallel layer's, same shape), not our own."""
        super().__init__()
        self.tp = tp
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.vocab_local = -(-vocab_size // tp.size)  # ceil
        self.vocab_start = min(tp.rank * self.vocab_local, vocab_size)
        self.vocab_end = min(self.vocab_start + self.vocab_local, vocab_size)
        # Padding rows stay zero: they are never looked up, and their logits are cut off after the gather.
        if shared_weight is None:
            shared_weight = nn.Parameter(
                torch.zeros(self.vocab_local, hidden_size, dtype=dtype), requires_grad=False
            )
        assert tuple(shared_weight.shape) == (self.vocab_local, hidden_size), shared_weight.shape
        self.weight = shared_weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # [T] -> [T, hidden]
        if self.tp.size == 1:
            return F.embedding(input_ids, self.weight)
        owned = (input_ids >= self.vocab_start) & (input_ids < self.vocab_end)
        local_ids = (input_ids - self.vocab_start) * owned
        x = F.embedding(local_ids, self.weight).masked_fill_(~owned.unsqueeze(-1), 0)
        return self.tp.all_reduce(x)

    def weight_loader(
        self, param: nn.Parameter, full: torch.Tensor, shard_id: str | int | None = None
    ) -> None:
        if shard_id is not None:
            raise ValueError(f"{type(self).__name__} takes no shard_id, got {shard_id!r}")
        expected = (self.vocab_size, self.hidden_size)
        if tuple(full.shape) != expected:
            raise ValueError(f"checkpoint tensor {tuple(full.shape)} does not fit: expected {expected}")
        n = self.vocab_end - self.vocab_start
        with torch.no_grad():
            param.data[:n].copy_(full.narrow(0, self.vocab_start, n))


class ParallelLMHead(VocabParallelEmbedding):
    """hidden -> logits over the whole vocabulary; shares the embedding's weight when tied."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # [N, hidden] -> [N, vocab]
        logits = linear(hidden, self.weight)  # [N, vocab_local]
        logits = self.tp.all_gather(logits, dim=-1)  # [N, vocab_local * tp]
        return logits[:, : self.vocab_size]
