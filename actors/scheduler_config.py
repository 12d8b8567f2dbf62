"""The scheduler's knobs (engine flags) and the constants its logic keeps fixed."""

from __future__ import annotations

from dataclasses import dataclass

# After a retraction the remaining decode rows have room for this many steps (SGLang's retract_decode_steps).
RETRACT_HEADROOM_STEPS = 20


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    num_slots: int
    max_rows: int
    chunked_prefill_size: int = 8192
    max_prefill_tokens: int = 16384
    max_running_requests: int = 256
    schedule_policy: str = "lpm"
    disable_radix_cache: bool = False
    overlap: bool = True
    new_token_ratio: float = 0.7
    min_new_token_ratio: float = 0.1
    new_token_ratio_decay: float = 0.001
    disable_jump_forward: bool = False
    # Jump-forward re-tokenizes the forced text together with up to this many of the last output tokens
    # (`: ` forced, then ` ` `true` sampled: ` true`); a constrained request's stream holds back window - 1
    # tokens, which may still be replaced.
    jump_forward_window: int = 2
    # StepMasks through shared memory (all the group's workers on this host)
    shared_masks: bool = False
