"""POST /v1/completions: OpenAI's legacy completions, streamed or not.

A list of P prompts with n samples each is P * n engine requests; choice index = prompt_i * n + j. With
`echo`, a choice's text starts with its prompt (and with `logprobs`, so do its logprobs, the first being
null). A stream sends each choice's text as it comes, then one chunk with that choice's finish_reason, then
(with stream_options.include_usage) a usage chunk with no choices, then `data: [DONE]`.
"""

from __future__ import annotations

import time

from msgspec import UNSET, UnsetType
from starlette.requests import Request
from starlette.responses import Response

from radixserve.actors.messages import RequestOutput
from radixserve.outputs import TokenLogprob
from radixserve.server.errors import ApiError, error_response
from radixserve.server.fanout import Member, Prompt, RequestGroup
from radixserve.server.logprobs import completion_logprobs
from radixserve.server.openai_common import (
    ChoiceState,
    check_common,
    collect,
    to_sampling_params,
    total_usage,
)
from radixserve.server.protocol import (
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    UsageInfo,
)
from radixserve.server.sse import DeferredResponse, Emit, EventStreamResponse, event
from radixserve.server.state import ServerState, decode_body, json_response, new_id, state_of

# Engine field names -> this route's.
RENAME = {
    "max_new_tokens": "max_tokens",
    "min_new_tokens": "min_tokens",
    "prompt_logprobs": "logprobs",
    "input_ids": "prompt",
}


async def create_completion(request: Request) -> Response:
    state = state_of(request)
    try:
        req = await decode_body(request, CompletionRequest)
        state.check_model(req.model)
        check_common(req)
        if req.suffix is not None:
            raise ApiError(400, "suffix: insertion (suffix) is not supported", param="suffix")
        if req.best_of is not None and req.best_of != req.n:
            raise ApiError(
                400, "best_of: only best_of == n is supported (no server-side ranking)", param="best_of"
            )
        prompts = _prompts(req.prompt)
        params = to_sampling_params(
            req,
            max_new_tokens=req.max_tokens,
            logprobs=req.logprobs,
            prompt_logprobs=req.logprobs if req.echo else None,
        )
        group = await RequestGroup.open(
            state.engine, new_id("cmpl"), state.groups, prompts, [params] * len(prompts), req.n,
            stream=bool(req.stream),
        )
    except Exception as e:
        return error_response(e, RENAME)
    view = _CompletionView(state, req, group, prompts)
    if req.stream:
        return EventStreamResponse(view.stream, group.aclose)
    return DeferredResponse(view.complete, group.aclose)


def _prompts(prompt: str | list[str | int | list[int]]) -> list[Prompt]:
    if isinstance(prompt, str):
        return [Prompt(text=prompt)]
    if prompt and all(isinstance(p, str) for p in prompt):
        return [Prompt(text=p) for p in prompt]
    if prompt and all(isinstance(p, int) for p in prompt):
        return [Prompt(input_ids=list(prompt))]
    if prompt and all(isinstance(p, list) for p in prompt):
        return [Prompt(input_ids=p) for p in prompt]
    raise ApiError(
        400,
        "prompt: must be a non-empty string, list of strings, list of token ids or list of token-id lists",
        param="prompt",
    )


class _CompletionView:
    """Turns one request group's outputs into OpenAI completion bodies and chunks."""

    def __init__(
        self, state: ServerState, req: CompletionRequest, group: RequestGroup, prompts: list[Prompt]
    ):
        self.state = state
        self.req = req
        self.group = group
        self.prompts = prompts
        self.created = int(time.time())
        self._prompt_texts: dict[int, str] = {}

    def prompt_text(self, member: Member) -> str:
        text = self._prompt_texts.get(member.prompt_index)
        if text is None:
            prompt = self.prompts[member.prompt_index]
            text = (
                prompt.text if prompt.text is not None else self.state.tokens.decode(member.handle.prompt_ids)
            )
            self._prompt_texts[member.prompt_index] = text
        return text

    def logprobs(
        self,
        member: Member,
        entries: list[TokenLogprob],
        prompt_entries: list[TokenLogprob | None] | None,
        offset: int,
    ) -> CompletionLogprobs:
        """Logprobs of `entries` (output tokens), after those of the prompt when `prompt_entries` is given."""
        all_entries: list[TokenLogprob | None] = []
        ids: list[int] = []
        if prompt_entries is not None:
            all_entries.extend(prompt_entries)
            ids.extend(member.handle.prompt_ids[: len(prompt_entries)])
        all_entries.extend(entries)
        ids.extend(e.token_id for e in entries)
        return completion_logprobs(self.state.tokens, all_entries, ids, offset)

    def start_offset(self, member: Member) -> int:
        """Where a choice's first logprob token sits in its text: after the prompt, unless echoed."""
        return 0 if self.req.echo else len(self.prompt_text(member))

    async def complete(self) -> Response:
        states = await collect(self.group)
        choices = []
        for member in self.group.members:
            s = states[member.index]
            prefix = self.prompt_text(member) if self.req.echo else ""
            logprobs = None
            if self.req.logprobs is not None:
                prompt_entries = (s.prompt_logprobs or []) if self.req.echo else None
                logprobs = self.logprobs(member, s.logprobs, prompt_entries, self.start_offset(member))
            choices.append(
                CompletionChoice(
                    member.index, prefix + "".join(s.text), logprobs, s.finish_reason, s.matched_stop
                )
            )
        usage = total_usage(self.group, states)
        return json_response(Completion(self.group.gid, self.created, self.state.model_name, choices, usage))

    async def stream(self, emit: Emit) -> None:
        include_usage = self.req.stream_options is not None and self.req.stream_options.include_usage
        usage_field: UsageInfo | None | UnsetType = None if include_usage else UNSET  # null on each chunk
        states = {m.index: ChoiceState() for m in self.group.members}
        offsets: dict[int, int] = {}

        async def chunk(choice: CompletionChoice) -> None:
            await emit(
                event(Completion(self.group.gid, self.created, self.state.model_name, [choice], usage_field))
            )

        async def consume(member: Member, out: RequestOutput) -> None:
            first = member.index not in offsets
            if first:
                offsets[member.index] = self.start_offset(member) if self.req.logprobs is not None else 0
            states[member.index].add(out)
            text = out.text
            if first and self.req.echo:
                text = self.prompt_text(member) + text
            logprobs = None
            if self.req.logprobs is not None and (out.logprobs or (first and self.req.echo)):
                prompt_entries = (out.prompt_logprobs or []) if first and self.req.echo else None
                logprobs = self.logprobs(member, out.logprobs or [], prompt_entries, offsets[member.index])
                offsets[member.index] += sum(len(t) for t in logprobs.tokens)
            if text or logprobs is not None:
                await chunk(CompletionChoice(member.index, text, logprobs))
            if out.finish_reason is not None:
                await chunk(
                    CompletionChoice(member.index, "", None, str(out.finish_reason), out.matched_stop)
                )

        await self.group.run(consume)
        if include_usage:
            usage = total_usage(self.group, states)
            await emit(event(Completion(self.group.gid, self.created, self.state.model_name, [], usage)))
