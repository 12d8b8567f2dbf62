"""Per-request penalty state on the device: output token counts and prompt token masks.

Only requests that use a penalty (`SamplingParams.needs_penalties`) get a slot, so a batch without one pays
nothing. Slot rows live in two pooled tensors that grow by doubling:

    counts      [slots, V] float32   times each token was sampled so far (float: used as is by the penalty)
    prompt_mask [slots, V] bool      tokens of the prompt (repetition penalty only)

Every update is a device op issued in stream order, so the sampler records step N's tokens before step N+1
reads them, with no host round-trip.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


class PenaltyState:
    """Slots of `counts` / `prompt_mask` keyed by request key.

    Mutates its tensors in `add`, `record` (device ops) and `remove` (host bookkeeping only). Not thread-safe:
    the GPU worker's one sampling thread owns it.
    """

    def __init__(self, vocab_size: int, device: torch.device, initial_slots: int = 8) -> None:
        self.vocab_size = vocab_size
        self.device = device
        self.counts = torch.zeros(initial_slots, vocab_size, dtype=torch.float32, device=device)
        self.prompt_mask = torch.zeros(initial_slots, vocab_size, dtype=torch.bool, device=device)
        self._free = list(range(initial_slots - 1, -1, -1))  # popped from the end: lowest slot first
        self._slot_of: dict[int, int] = {}
        self._one = torch.ones((), device=device)  # a device scalar: a Python one would sync in index_put_

    def __contains__(self, key: int) -> bool:
        return key in self._slot_of

    def __len__(self) -> int:
        return len(self._slot_of)

    def slot(self, key: int) -> int:
        return self._slot_of[key]

    def add(self, key: int, prompt_ids: Sequence[int], output_ids: Sequence[int] = ()) -> None:
        """Give `key` a slot; `output_ids` restores the counts of a request that is resumed (retracted)."""
        assert key not in self._slot_of, f"penalty state for key {key} already exists"
        # Ingress checks token ids; one out of range would be a device-side fault, not an exception.
        assert max(prompt_ids, default=0) < self.vocab_size
        if not self._free:
            self._grow()
        slot = self._free.pop()
        self._slot_of[key] = slot
        self.counts[slot].zero_()
        self.prompt_mask[slot].zero_()
        if prompt_ids:
            self.prompt_mask[slot].index_fill_(0, to_device(prompt_ids, torch.int64, self.device), True)
        if output_ids:
            self.add_output(key, output_ids)

    def add_output(self, key: int, output_ids: Sequence[int], weight: float = 1.0) -> None:
        """Count output tokens that did not come through `record` (a resumed request, jump-forward); a weight
        of -1 uncounts tokens that jump-forward re-tokenized away."""
        assert max(output_ids, default=0) < self.vocab_size
        ids = to_device(output_ids, torch.int64, self.device)
        ones = torch.full((len(output_ids),), weight, device=self.device)
        self.counts[self._slot_of[key]].index_add_(0, ids, ones)

    def remove(self, key: int) -> None:
        # The slot's rows are zeroed by the next `add`, in stream order after every step that read them.
        self._free.append(self._slot_of.pop(key))

    def record(self, slots: Tensor, tokens: Tensor) -> None:
        """Count the sampled `tokens` [P] for the requests in `slots` [P] (distinct slots)."""
        self.counts.index_put_((slots, tokens), self._one, accumulate=True)

    def _grow(self) -> None:
        old = self.counts.shape[0]
        self.counts = torch.cat([self.counts, torch.zeros_like(self.counts)])
        self.prompt_mask = torch.cat([self.prompt_mask, torch.zeros_like(self.prompt_mask)])
        self._free.extend(range(2 * old - 1, old - 1, -1))


def apply_penalties(
    logits: Tensor,
    counts: Tensor,
    prompt_mask: Tensor,
    repetition: Tensor | None,
    frequency: Tensor | None,
    presence: Tensor | None,
) -> Tensor:
    """Penalize `logits` [P, V] in place and return it; per-row penalties are [P, 1] or None when all neutral.

    Repetition (HF): a token seen in the prompt or output has its logit divided by the penalty when positive,
    multiplied when negative. Frequency and presence (OpenAI): subtract
    `frequency * count + presence * (count > 0)` over output tokens only.
    """
    seen_output = counts > 0
    if repetition is not None:
        scale = torch.where(logits > 0, repetition.reciprocal(), repetition)
        logits.mul_(torch.where(seen_output | prompt_mask, scale, 1.0))
    if frequency is not None:
        logits.addcmul_(counts, frequency, value=-1.0)
    if presence is not None:
        logits.addcmul_(seen_output, presence, value=-1.0)
    return logits


def to_device(values: Sequence[int] | Sequence[float], dtype: torch.dtype, device: torch.device) -> Tensor:
    """A host list as a device tensor without a stream sync.

    A copy from pageable memory makes torch wait for the GPU to drain; staging in pinned memory and copying
    with non_blocking lets the host run ahead (the caching host allocator keeps the staging buffer alive).
    """
    if device.type == "cuda":
        return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)
    return torch.tensor(values, dtype=dtype, device=device)
