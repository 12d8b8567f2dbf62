"""POST /generate: SGLang's native generation API.

    {"text": "..." | [...], "input_ids": [...] | [[...], ...], "sampling_params": {...} | [{...}, ...],
     "rid": ..., "return_logprob": false, "logprob_start_len": -1, "top_logprobs_num": 0, "stream": false}

`sampling_params` uses SGLang's names (radixserve's SamplingParams); `max_new_tokens: 0` only prefills. A list
input answers a list (n samples per input, input i's sample j at index i * n + j). A stream sends, per
output, the item so far (cumulative text and output_ids; `index` in a batch), then `data: [DONE]`.
Logprobs are SGLang's `[logprob, token_id, text or null]`; input logprobs start at `logprob_start_len`
(-1: none).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import msgspec
from msgspec import UNSET, UnsetType
from starlette.requests import Request
from starlette.responses import Response

from radixserve.actors.messages import RequestOutput
from radixserve.errors import InvalidRequestError
from radixserve.sampling_params import SamplingParams
from radixserve.server.errors import ApiError, error_response
from radixserve.server.fanout import Member, Prompt, RequestGroup
from radixserve.server.logprobs import NativeLogprob, native_logprobs
from radixserve.server.openai_common import ChoiceState, collect
from radixserve.server.sse import DeferredResponse, Emit, EventStreamResponse, event
from radixserve.server.state import ServerState, decode_body, json_response, new_id, state_of


class GenerateRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    text: str | list[str] | None = None
    input_ids: list[int | list[int]] | None = None
    sampling_params: dict[str, Any] | list[dict[str, Any]] | None = None
    rid: str | list[str] | None = None
    return_logprob: bool | list[bool] = False
    logprob_start_len: int | list[int] = -1
    top_logprobs_num: int | list[int] = 0
    return_text_in_logprobs: bool = False
    stream: bool = False


class FinishInfo(msgspec.Struct):
    type: str
    matched: int | str | None | UnsetType = UNSET
    length: int | UnsetType = UNSET


class MetaInfo(msgspec.Struct):
    id: str
    finish_reason: FinishInfo | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    e2e_latency: float
    input_token_logprobs: list[NativeLogprob] | UnsetType = UNSET
    input_top_logprobs: list[list[NativeLogprob] | None] | UnsetType = UNSET
    output_token_logprobs: list[NativeLogprob] | UnsetType = UNSET
    output_top_logprobs: list[list[NativeLogprob] | None] | UnsetType = UNSET


class GenerateItem(msgspec.Struct):
    text: str
    output_ids: list[int]
    meta_info: MetaInfo
    index: int | UnsetType = UNSET  # set in a batch stream


@dataclass(frozen=True, slots=True)
class _Input:
    prompt: Prompt
    params: SamplingParams
    rid: str | None
    return_logprob: bool
    logprob_start_len: int


async def generate(request: Request) -> Response:
    state = state_of(request)
    try:
        req = await decode_body(request, GenerateRequest)
        inputs, batch = _inputs(req, state.engine.ready.vocab_size if state.engine.ready else None)
        n = inputs[0].params.n
        if any(i.params.n != n for i in inputs):
            raise ApiError(
                400, "sampling_params.n: must be the same for every input", param="sampling_params.n"
            )
        rids = [i.rid for i in inputs]
        gid = rids[0] if not batch and rids[0] is not None else new_id("gen")
        group = await RequestGroup.open(
            state.engine,
            gid,
            state.groups,
            [i.prompt for i in inputs],
            [msgspec.structs.replace(i.params, n=1) for i in inputs],
            n,
            rids=rids if all(r is not None for r in rids) else None,
            stream=req.stream,
        )
    except Exception as e:
        return error_response(e)
    view = _GenerateView(state, req, group, inputs, batch or n > 1)
    if req.stream:
        return EventStreamResponse(view.stream, group.aclose)
    return DeferredResponse(view.complete, group.aclose)


def _inputs(req: GenerateRequest, vocab_size: int | None) -> tuple[list[_Input], bool]:
    """One _Input per prompt, and whether the request was a batch (a list in, a list out)."""
    if (req.text is None) == (req.input_ids is None):
        raise ApiError(400, "text: give exactly one of text or input_ids", param="text")
    prompts: list[Prompt]
    if isinstance(req.text, str):
        prompts, batch = [Prompt(text=req.text)], False
    elif req.text is not None:
        prompts, batch = [Prompt(text=t) for t in req.text], True
    else:
        ids = req.input_ids or []
        if ids and all(isinstance(t, int) for t in ids):
            prompts, batch = [Prompt(input_ids=list(ids))], False
        elif ids and all(isinstance(t, list) for t in ids):
            prompts, batch = [Prompt(input_ids=t) for t in ids], True
        else:
            raise ApiError(
                400,
                "input_ids: must be a non-empty list of token ids or of token-id lists",
                param="input_ids",
            )
    if not prompts:
        raise ApiError(400, "text: the batch is empty", param="text")
    inputs = []
    for i, prompt in enumerate(prompts):
        try:
            params = SamplingParams.from_dict(_pick(req.sampling_params, i, "sampling_params") or {})
            params.validate(vocab_size)
        except InvalidRequestError as e:
            raise InvalidRequestError(f"sampling_params.{e.field}", e.message) from None
        return_logprob = bool(_pick(req.return_logprob, i, "return_logprob"))
        start = int(_pick(req.logprob_start_len, i, "logprob_start_len"))
        top = int(_pick(req.top_logprobs_num, i, "top_logprobs_num"))
        if return_logprob:
            params = msgspec.structs.replace(
                params,
                logprobs=top,
                prompt_logprobs=top if start >= 0 else None,
                logprob_start_len=max(start, 0),
            )
        inputs.append(_Input(prompt, params, _pick(req.rid, i, "rid"), return_logprob, start))
    return inputs, batch


def _pick(value: Any, i: int, field: str) -> Any:
    """A per-input field: one value for all inputs, or a list with one per input."""
    if not isinstance(value, list):
        return value
    if i >= len(value):
        raise ApiError(400, f"{field}: has {len(value)} entries, fewer than the inputs", param=field)
    return value[i]


class _GenerateView:
    def __init__(
        self,
        state: ServerState,
        req: GenerateRequest,
        group: RequestGroup,
        inputs: list[_Input],
        as_list: bool,
    ) -> None:
        self.state = state
        self.req = req
        self.group = group
        self.inputs = inputs
        self.as_list = as_list
        self.start = time.perf_counter()

    def item(self, member: Member, s: ChoiceState, index: int | UnsetType = UNSET) -> GenerateItem:
        last, handle = s.last, member.handle
        finish = None
        if last is not None and last.finish_reason is not None:
            finish = FinishInfo(str(last.finish_reason))
            if last.finish_reason == "length":
                finish.length = len(s.token_ids)
            elif last.finish_reason == "stop":
                finish.matched = last.matched_stop
        usage = last.usage if last is not None else None
        meta = MetaInfo(
            id=handle.rid,
            finish_reason=finish,
            prompt_tokens=usage.prompt_tokens if usage else len(handle.prompt_ids),
            completion_tokens=usage.completion_tokens if usage else len(s.token_ids),
            cached_tokens=usage.cached_tokens if usage else 0,
            e2e_latency=time.perf_counter() - self.start,
        )
        spec = self.inputs[member.prompt_index]
        if spec.return_logprob:
            with_text = self.req.return_text_in_logprobs
            start = max(spec.logprob_start_len, 0)
            prompt_entries = (s.prompt_logprobs or [])[start:] if spec.logprob_start_len >= 0 else []
            meta.input_token_logprobs, meta.input_top_logprobs = native_logprobs(
                self.state.tokens,
                prompt_entries,
                handle.prompt_ids[start : start + len(prompt_entries)],
                with_text,
            )
            meta.output_token_logprobs, meta.output_top_logprobs = native_logprobs(
                self.state.tokens, s.logprobs, [e.token_id for e in s.logprobs], with_text
            )
        return GenerateItem("".join(s.text), s.token_ids, meta, index)

    async def complete(self) -> Response:
        states = await collect(self.group)
        items = [self.item(m, states[m.index]) for m in self.group.members]
        return json_response(items if self.as_list else items[0])

    async def stream(self, emit: Emit) -> None:
        states = {m.index: ChoiceState() for m in self.group.members}

        async def consume(member: Member, out: RequestOutput) -> None:
            states[member.index].add(out)
            index = member.index if self.as_list else UNSET
            await emit(event(self.item(member, states[member.index], index)))

        await self.group.run(consume)
