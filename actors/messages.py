"""Every message that crosses a mailbox, grouped by the actor that receives it.

Hot-path structs are frozen, array_like and gc=False; integer and float arrays travel as raw little-endian
bytes (`np.frombuffer` on arrival), never as lists of Python ints. Each mailbox takes one tagged union.
"""

# mypy reads msgspec.Struct as a dataclass_transform and misses that a subclass inherits frozen=True from
# _Msg, so it calls every message a non-frozen dataclass inheriting from a frozen one ([misc]).
# mypy: disable-error-code="misc"

from __future__ import annotations

import enum

import msgspec

from radixserve.outputs import FinishReason, TokenLogprob, Usage
from radixserve.sampling_params import SamplingParams


class _Msg(msgspec.Struct, frozen=True, array_like=True, gc=False, tag=True):
    pass


class AbortReason(enum.IntEnum):
    CLIENT = 0  # the caller cancelled or disconnected
    STOP_STRING = 1  # the detokenizer saw a stop string: the request is done, not failed
    SHUTDOWN = 2


# ----------------------------------------------------------------------------------------------------------
# scheduler inbox
# ----------------------------------------------------------------------------------------------------------


class SubmitRequest(_Msg):
    rid: str
    input_ids: list[int]
    params: SamplingParams
    max_new_tokens: int  # resolved against the context length by ingress
    eos_token_ids: list[int]  # the model's EOS ids plus params.stop_token_ids
    arrival_time: float
    priority: int = 0


class AbortRequest(_Msg):
    rid: str
    reason: AbortReason = AbortReason.CLIENT


class FlushCache(_Msg):
    pass


class StepResult(_Msg):
    """Worker rank 0 -> scheduler: what step `step` produced, one entry per plan row."""

    step: int
    tokens: bytes  # int32 [B]; -1 where the row did not sample
    logprobs: bytes = b""  # float32 [B] when any row asked for logprobs
    top_k: int = 0
    top_ids: bytes = b""  # int32 [B, top_k]
    top_logprobs: bytes = b""  # float32 [B, top_k]
    prompt_logprobs: list[PromptLogprobs] = []


class PromptLogprobs(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """Logprobs of a row's extend tokens that have a known successor (the next prompt token)."""

    row: int  # plan row
    logprobs: bytes  # float32 [n]
    top_k: int
    top_ids: bytes  # int32 [n, top_k]
    top_logprobs: bytes  # float32 [n, top_k]


class WorkerDied(_Msg):
    rank: int
    message: str


SchedulerInbox = SubmitRequest | AbortRequest | FlushCache | StepResult | WorkerDied


# ----------------------------------------------------------------------------------------------------------
# gpu worker inbox (cross-process)
# ----------------------------------------------------------------------------------------------------------


class NewRequest(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """A request taking plan row `req_row` for the first time (again, after a retraction)."""

    req_row: int
    params: SamplingParams
    prefix_slots: bytes  # int32: slots of the cached prefix, written to req_to_token[req_row, :len]
    penalty_ids: bytes = b""  # int32 prompt (+ earlier output) tokens, only when the request uses penalties
    num_output_ids: int = 0  # how many of penalty_ids' last tokens are earlier output (after a retraction)


class AppendedTokens(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """Jump-forward changed row `req_row`'s output on the host: `removed` (re-tokenized, int32) leave it and
    `added` (int32) join it. Only for requests with penalties, whose counts must see it."""

    req_row: int
    added: bytes
    removed: bytes = b""


class StepPlan(_Msg):
    """One forward step. Row b extends request row req_rows[b] by extend_lens[b] tokens (see forward_batch).

    A decode row whose input is the token sampled for row j of the previous step has prev_rows[b] == j (its
    input_ids entry is a placeholder): the worker gathers it on the device, so no host round-trip sits
    between steps. Rows that sample: sample_mask[b] == 1.
    """

    step: int
    req_rows: bytes  # int32 [B]
    seq_lens: bytes  # int32 [B]
    extend_lens: bytes  # int32 [B]
    prev_rows: bytes  # int32 [B]
    sample_mask: bytes  # uint8 [B]
    output_lens: bytes  # int32 [B]: output tokens the request had before this step's sample
    input_ids: bytes  # int32 [T]
    out_slots: bytes  # int32 [T]
    new_requests: list[NewRequest] = []
    released_rows: list[int] = []  # rows whose requests left; the worker drops their sampler state
    # Rows that want prompt logprobs: (plan row, top_k, token after the chunk or -1 at the prompt's end).
    prompt_logprob_rows: list[tuple[int, int, int]] = []
    # Constrained decoding: the sampling rows whose logits are masked (plan rows, int32 [G]) and their token
    # bitmasks (int32 [G, ceil(vocab / 32)], xgrammar's layout: bit j of word w allows token 32 w + j).
    grammar_rows: bytes = b""
    grammar_bitmask: bytes = b""
    # The bitmasks depend on samples of the previous step, still in flight when this plan was sent: they
    # follow in a StepMask for this step, which the worker awaits after launching the forward pass.
    grammar_mask_follows: bool = False
    appended_tokens: list[AppendedTokens] = []  # applied first (before released_rows and new_requests)
    # With the radix cache on: int32, one per leading row decoding one token (all of a decode step's), row b's
    # first shared_lens[b] KV slots are row b-1's (see actors/shared_prefix.py); empty otherwise.
    shared_lens: bytes = b""


class MaskSlot(_Msg):
    """Where a step's bitmasks lie in a scheduler's shared-memory ring (actors/mask_ring.py)."""

    path: str
    capacity: int  # rows per slot: the ring's layout
    words: int
    slot: int
    num_rows: int


class StepMask(_Msg):
    """The bitmasks of a plan sent with grammar_mask_follows, in its grammar_rows order. The scheduler sends
    it as soon as it has applied the previous step's result, so the masks are computed on the host while
    the worker's GPU runs this step's forward pass (overlap for constrained requests)."""

    step: int
    bitmask: bytes  # int32 [G, ceil(vocab / 32)]; empty when they are in shared memory
    shared: MaskSlot | None = None


class InitWorker(_Msg):
    """The first frame a worker process receives: what to load and how much KV to allocate."""

    rank: int
    tp_size: int
    model_path: str | None
    dtype: str  # resolved: float32, float16 or bfloat16
    device: str  # resolved: cpu or cuda:N (this rank's GPU)
    context_length: int
    max_rows: int
    max_total_tokens: int | None
    mem_fraction_static: float
    cpu_kv_gib: float
    attention_backend: str
    random_seed: int | None = None
    disable_cuda_graph: bool = False
    cuda_graph_max_bs: int = 256
    load_format: str = "auto"
    disable_custom_all_reduce: bool = False
    kv_cache_dtype: str = "auto"  # the KV pool's: auto (the model's dtype), fp8_e5m2 or fp8_e4m3
    enable_flashinfer_allreduce_fusion: bool = False
    # torch.distributed rendezvous of the tensor-parallel group (tp_size > 1): file://... or tcp://host:port.
    dist_init_method: str = ""


class Shutdown(_Msg):
    pass


WorkerInbox = InitWorker | StepPlan | StepMask | Shutdown


class WorkerReady(_Msg):
    rank: int
    num_slots: int
    max_rows: int
    max_context: int
    vocab_size: int
    device: str
    kv_bytes: int


class WorkerFailed(_Msg):
    rank: int
    message: str


class WorkerHello(_Msg):
    """The first frame of a worker that connected over TCP (another node): which rank it is."""

    rank: int


WorkerOutbox = WorkerReady | StepResult | WorkerFailed | WorkerHello


# ----------------------------------------------------------------------------------------------------------
# detokenizer inbox
# ----------------------------------------------------------------------------------------------------------


class RegisterRequest(_Msg):
    """Ingress -> detokenizer, sent before the request reaches the scheduler."""

    rid: str
    prompt_ids: list[int]
    params: SamplingParams
    replica: int = 0  # the data-parallel replica serving it (where a stop-string abort goes)
    stream: bool = True  # False: nobody reads its output before the finish (decoded once, then)


class RequestUpdate(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """New tokens of one request. Exactly one update per request carries finish_reason."""

    rid: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: FinishReason | None = None
    matched_stop: int | None = None
    cached_tokens: int = 0
    prompt_logprobs: list[TokenLogprob | None] | None = None
    error: str | None = None  # set when the request failed (finish_reason is ABORT)


class TokenBatch(_Msg):
    """Scheduler -> detokenizer: the updates of one applied step."""

    updates: list[RequestUpdate]


DetokenizerInbox = RegisterRequest | TokenBatch


# ----------------------------------------------------------------------------------------------------------
# ingress inbox
# ----------------------------------------------------------------------------------------------------------


class RequestOutput(msgspec.Struct, frozen=True, array_like=True, gc=False):
    rid: str
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: FinishReason | None = None
    matched_stop: int | str | None = None
    usage: Usage | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None
    error: str | None = None


def merge_outputs(outs: list[RequestOutput]) -> RequestOutput:
    """One output for a run of a request's outputs: their text and tokens joined, the last one's finish."""
    if len(outs) == 1:
        return outs[0]
    last = outs[-1]
    logprobs = None
    if any(o.logprobs is not None for o in outs):
        logprobs = [lp for o in outs for lp in (o.logprobs or ())]
    return RequestOutput(
        rid=last.rid,
        text="".join(o.text for o in outs),
        token_ids=[t for o in outs for t in o.token_ids],
        logprobs=logprobs,
        finish_reason=last.finish_reason,
        matched_stop=last.matched_stop,
        usage=last.usage,
        prompt_logprobs=next((o.prompt_logprobs for o in outs if o.prompt_logprobs is not None), None),
        error=last.error,
    )


class OutputBatch(_Msg):
    outputs: list[RequestOutput]


class EngineFailed(_Msg):
    """A component died: every pending request fails with this message."""

    message: str


class ReplicaFailed(_Msg):
    """One data-parallel replica's workers died: its requests fail, new ones go to the live replicas."""

    replica: int
    message: str


IngressInbox = OutputBatch | EngineFailed | ReplicaFailed
