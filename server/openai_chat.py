"""POST /v1/chat/completions: messages through the model's chat template (or --chat-template).

Without max_tokens / max_completion_tokens a choice may run to the end of the context. A stream sends, per
choice, a first delta carrying the role, content deltas, then one chunk with an empty delta and that choice's
finish_reason; then (with stream_options.include_usage) a usage chunk with no choices; then `data: [DONE]`.
"""

from __future__ import annotations

import time
from typing import Any

from msgspec import UNSET, UnsetType
from starlette.requests import Request
from starlette.responses import Response

from radixserve.actors.messages import RequestOutput
from radixserve.server.errors import ApiError, error_response
from radixserve.server.fanout import Member, Prompt, RequestGroup
from radixserve.server.logprobs import chat_logprobs
from radixserve.server.openai_common import (
    ChoiceState,
    check_common,
    collect,
    to_sampling_params,
    total_usage,
)
from radixserve.server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    ChatMessage,
    ImagePart,
    UsageInfo,
)
from radixserve.server.sse import DeferredResponse, Emit, EventStreamResponse, event
from radixserve.server.state import ServerState, decode_body, json_response, new_id, state_of


async def create_chat_completion(request: Request) -> Response:
    state = state_of(request)
    rename = {"min_new_tokens": "min_tokens", "logprobs": "top_logprobs", "prompt": "messages"}
    try:
        req = await decode_body(request, ChatCompletionRequest)
        rename["max_new_tokens"] = (
            "max_tokens" if req.max_completion_tokens is None else "max_completion_tokens"
        )
        state.check_model(req.model)
        check_common(req)
        _check_unsupported(req)
        messages = [_message(i, m) for i, m in enumerate(req.messages)]
        max_new = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        params = to_sampling_params(
            req, max_new_tokens=max_new, logprobs=(req.top_logprobs or 0) if req.logprobs else None,
            response_format=req.response_format,
        )
        if req.response_format is not None and req.json_schema is None:
            rename.update(json_schema="response_format", json_object="response_format")
        group = await RequestGroup.open(
            state.engine, new_id("chatcmpl"), state.groups, [Prompt(messages=messages)], [params], req.n,
            stream=bool(req.stream),
        )
    except Exception as e:
        return error_response(e, rename)
    view = _ChatView(state, req, group)
    if req.stream:
        return EventStreamResponse(view.stream, group.aclose)
    return DeferredResponse(view.complete, group.aclose)


def _check_unsupported(req: ChatCompletionRequest) -> None:
    if req.top_logprobs is not None and not req.logprobs:
        raise ApiError(400, "top_logprobs: requires logprobs to be true", param="top_logprobs")
    if req.tools:
        raise ApiError(400, "tools: tool calling is not supported", param="tools")
    if req.tool_choice not in (None, "none", "auto"):
        raise ApiError(400, "tool_choice: tool calling is not supported", param="tool_choice")


def _message(index: int, message: ChatMessage) -> dict[str, Any]:
    """One message as the chat template takes it: role and text content."""
    content = message.content
    if isinstance(content, list):
        if any(isinstance(part, ImagePart) for part in content):
            raise ApiError(
                400,
                f"messages[{index}].content: image input is not supported by this server",
                param=f"messages[{index}].content",
            )
        content = "".join(part.text for part in content)
    out: dict[str, Any] = {
        "role": "system" if message.role == "developer" else message.role,
        "content": content or "",
    }
    if message.name is not None:
        out["name"] = message.name
    return out


class _ChatView:
    """Turns one request group's outputs into OpenAI chat bodies and chunks."""

    def __init__(self, state: ServerState, req: ChatCompletionRequest, group: RequestGroup) -> None:
        self.state = state
        self.req = req
        self.group = group
        self.created = int(time.time())

    async def complete(self) -> Response:
        states = await collect(self.group)
        choices = []
        for member in self.group.members:
            s = states[member.index]
            logprobs = chat_logprobs(self.state.tokens, s.logprobs) if self.req.logprobs else None
            choices.append(
                ChatChoice(
                    member.index, AssistantMessage("".join(s.text)), logprobs, s.finish_reason, s.matched_stop
                )
            )
        usage = total_usage(self.group, states)
        return json_response(
            ChatCompletion(self.group.gid, self.created, self.state.model_name, choices, usage)
        )

    async def stream(self, emit: Emit) -> None:
        include_usage = self.req.stream_options is not None and self.req.stream_options.include_usage
        usage_field: UsageInfo | None | UnsetType = None if include_usage else UNSET  # null on each chunk
        states = {m.index: ChoiceState() for m in self.group.members}

        async def chunk(choice: ChatChunkChoice) -> None:
            await emit(
                event(
                    ChatCompletionChunk(
                        self.group.gid, self.created, self.state.model_name, [choice], usage_field
                    )
                )
            )

        async def consume(member: Member, out: RequestOutput) -> None:
            state = states[member.index]
            if state.last is None:
                await chunk(ChatChunkChoice(member.index, ChatDelta(role="assistant", content="")))
            state.add(out)
            logprobs = (
                chat_logprobs(self.state.tokens, out.logprobs) if self.req.logprobs and out.logprobs else None
            )
            if out.text or logprobs is not None:
                await chunk(ChatChunkChoice(member.index, ChatDelta(content=out.text), logprobs))
            if out.finish_reason is not None:
                await chunk(
                    ChatChunkChoice(member.index, ChatDelta(), None, str(out.finish_reason), out.matched_stop)
                )

        await self.group.run(consume)
        if include_usage:
            usage = total_usage(self.group, states)
            await emit(
                event(ChatCompletionChunk(self.group.gid, self.created, self.state.model_name, [], usage))
            )
