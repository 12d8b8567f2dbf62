"""What /v1/completions and /v1/chat/completions share: request -> SamplingParams, per-choice accumulation,
usage over the choices."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from radixserve.actors.messages import RequestOutput
from radixserve.outputs import TokenLogprob
from radixserve.sampling_params import SamplingParams
from radixserve.server.errors import ApiError
from radixserve.server.fanout import Member, RequestGroup
from radixserve.server.protocol import PromptTokensDetails, ResponseFormat, SamplingFields, UsageInfo


def check_common(req: SamplingFields) -> None:
    """Refuse what the structs can express but OpenAI (or radixserve) does not accept."""
    if req.stream_options is not None and not req.stream:
        raise ApiError(400, "stream_options: only allowed when stream is true", param="stream_options")


def to_sampling_params(
    req: SamplingFields,
    *,
    max_new_tokens: int | None,
    logprobs: int | None,
    prompt_logprobs: int | None = None,
    response_format: ResponseFormat | None = None,
) -> SamplingParams:
    """The engine's parameters for one sample; the engine validates them again against the vocabulary."""
    return SamplingParams(
        max_new_tokens=max_new_tokens,
        min_new_tokens=req.min_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        top_k=req.top_k,
        min_p=req.min_p,
        frequency_penalty=req.frequency_penalty,
        presence_penalty=req.presence_penalty,
        repetition_penalty=req.repetition_penalty,
        logit_bias=req.logit_bias or None,
        seed=req.seed,
        stop=[req.stop] if isinstance(req.stop, str) else (req.stop or None),
        stop_token_ids=req.stop_token_ids or None,
        ignore_eos=req.ignore_eos,
        skip_special_tokens=req.skip_special_tokens,
        spaces_between_special_tokens=req.spaces_between_special_tokens,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        **constraint_fields(req, response_format),
    )


def constraint_fields(req: SamplingFields, response_format: ResponseFormat | None) -> dict[str, Any]:
    """The extras regex / ebnf / json_schema and OpenAI's response_format as SamplingParams fields (the engine
    refuses more than one). json_schema's `strict` is accepted: the schema is always enforced."""
    schema = req.json_schema
    fields: dict[str, Any] = {
        "regex": req.regex,
        "ebnf": req.ebnf,
        "json_schema": json.dumps(schema) if isinstance(schema, dict) else schema,
    }
    if response_format is None or response_format.type == "text":
        return fields
    spec = response_format.json_schema
    if response_format.type == "json_object" or (isinstance(spec, dict) and "schema" not in spec):
        return {**fields, "json_object": True}
    if not isinstance(spec, dict) or not isinstance(spec["schema"], dict):
        raise ApiError(400, "response_format.json_schema: must be an object with a `schema` object",
                       param="response_format.json_schema")
    if schema is not None:
        raise ApiError(400, "json_schema: give it or response_format, not both", param="json_schema")
    return {**fields, "json_schema": json.dumps(spec["schema"])}


@dataclass(slots=True)
class ChoiceState:
    """Everything one choice (one engine request) produced so far."""

    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    last: RequestOutput | None = None

    def add(self, out: RequestOutput) -> None:
        self.text.append(out.text)
        self.token_ids.extend(out.token_ids)
        if out.logprobs:
            self.logprobs.extend(out.logprobs)
        if out.prompt_logprobs is not None and self.prompt_logprobs is None:
            self.prompt_logprobs = out.prompt_logprobs
        self.last = out

    @property
    def finish_reason(self) -> str | None:
        return None if self.last is None or self.last.finish_reason is None else str(self.last.finish_reason)

    @property
    def matched_stop(self) -> int | str | None:
        return None if self.last is None else self.last.matched_stop


def total_usage(group: RequestGroup, states: dict[int, ChoiceState]) -> UsageInfo:
    """Prompt tokens count once per prompt (from its first sample), completion tokens once per choice."""
    prompt = cached = completion = 0
    for member in group.members:
        state = states.get(member.index)
        usage = state.last.usage if state is not None and state.last is not None else None
        num_output = usage.completion_tokens if usage else len(state.token_ids) if state else 0
        completion += num_output
        if member.sample_index == 0:
            prompt += usage.prompt_tokens if usage else len(member.handle.prompt_ids)
            cached += usage.cached_tokens if usage else 0
    return UsageInfo(prompt, completion, prompt + completion, PromptTokensDetails(cached))


async def collect(group: RequestGroup) -> dict[int, ChoiceState]:
    """Run the group to the end; the state of each choice by index."""
    states = {m.index: ChoiceState() for m in group.members}

    async def consume(member: Member, out: RequestOutput) -> None:
        states[member.index].add(out)

    await group.run(consume)
    return states
