"""What the public API returns: a finished generation and the deltas of a streamed one."""

from __future__ import annotations

import enum

import msgspec


class FinishReason(enum.StrEnum):
    STOP = "stop"  # EOS, a stop token or a stop string
    LENGTH = "length"  # max_new_tokens or the context length
    ABORT = "abort"  # aborted by the caller or the engine


class TokenLogprob(msgspec.Struct, frozen=True, array_like=True, gc=False):
    token_id: int
    logprob: float
    top: list[tuple[int, float]] | None = None  # the top-k alternatives (token id, logprob), best first


class Usage(msgspec.Struct, frozen=True, gc=False):
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens served from the radix cache


class StreamDelta(msgspec.Struct, frozen=True, gc=False):
    """New output of one request since the last delta; the last one has finish_reason and usage set."""

    rid: str
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: FinishReason | None = None
    matched_stop: int | str | None = None  # the stop token id or stop string that ended the request
    usage: Usage | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None  # first delta only, when asked


class GenerateOutput(msgspec.Struct, frozen=True, gc=False):
    rid: str
    text: str
    token_ids: list[int]  # output tokens
    prompt_token_ids: list[int]
    finish_reason: FinishReason
    usage: Usage
    matched_stop: int | str | None = None
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None  # None for the first prompt token
