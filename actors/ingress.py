"""The ingress actor: validates and tokenizes requests, keeps the request registry, routes outputs back.

Callers (Engine, the HTTP server) `open()` a request and read its RequestOutputs from the returned handle;
the actor loop routes the detokenizer's output batches to the handles. Tokenization runs in a worker thread,
off the event loop. Bad input raises InvalidRequestError naming the field before anything is registered.

With data parallelism the ingress's Router picks the replica (scheduler) of each request and remembers it for
aborts; the ingress tells it when a request is over. A replica whose workers died gets no new requests, and
its own requests fail with an error.
"""

from __future__ import annotations

import itertools
import math
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, assert_never

import anyio
import numpy as np
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from radixserve.actors.grammar import GrammarCache
from radixserve.actors.mailbox import Inbox, MailboxClosed, Outbox
from radixserve.actors.messages import (
    AbortReason,
    AbortRequest,
    DetokenizerInbox,
    EngineFailed,
    IngressInbox,
    OutputBatch,
    RegisterRequest,
    ReplicaFailed,
    RequestOutput,
    SubmitRequest,
    merge_outputs,
)
from radixserve.actors.router import Router
from radixserve.errors import (
    ContextLengthError,
    EngineDeadError,
    InvalidRequestError,
    QueueFullError,
)
from radixserve.sampling_params import SamplingParams

# Token-id prompts at least this long are checked on a worker thread. A thousand 2k-token prompts submitted at
# once cost ~80 us each to check; on the event loop that kept the scheduler from planning its first step for
# ~0.4 s (session 9, the shared-prefix benchmark's lead-in on an H100 machine); off it, the first steps run
# while the rest are checked.
OFF_LOOP_IDS = 1024


def valid_token_ids(input_ids: Sequence[int], vocab_size: int) -> list[int]:
    """input_ids as a list of Python ints, each in [0, vocab_size); else InvalidRequestError. Checked in
    numpy (~80 us for 2k ids, against ~120 us for a Python check of each id)."""
    try:
        arr = np.asarray(input_ids)
    except (ValueError, TypeError, OverflowError):  # ragged nesting, values numpy cannot hold
        arr = None
    if (arr is None or arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iub")
            or (arr.size and (arr.min() < 0 or arr.max() >= vocab_size))):
        raise InvalidRequestError("input_ids", f"token ids must be ints in [0, {vocab_size})")
    return arr.astype(np.int64, copy=False).tolist()


@dataclass(frozen=True, slots=True)
class ModelLimits:
    context_length: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]


@dataclass(slots=True)
class RequestHandle:
    rid: str
    prompt_ids: list[int]
    params: SamplingParams
    outputs: MemoryObjectReceiveStream[RequestOutput]
    finished: bool = False
    replica: int = 0  # the data-parallel replica serving it


class Ingress:
    def __init__(
        self,
        tokenizer: Any,
        limits: ModelLimits,
        inbox: Inbox[IngressInbox],
        router: Router,
        detokenizer: Outbox[DetokenizerInbox],
        max_outstanding: int | None = None,
        chat_template: str | None = None,
        grammars: GrammarCache | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.limits = limits
        self.inbox = inbox
        self.router = router
        self.detokenizer = detokenizer
        self.max_outstanding = max_outstanding
        self.chat_template = chat_template
        self.grammars = grammars  # compiled here (off the event loop) before the scheduler sees the request
        self._handles: dict[str, MemoryObjectSendStream[RequestOutput]] = {}
        # Requests opened with stream=False: their outputs wait here and go out merged, once, at the finish
        # (a caller that only wants the result is not woken once per token).
        self._buffers: dict[str, list[RequestOutput]] = {}
        self._counter = itertools.count()
        self.dead: str | None = None

    @property
    def num_outstanding(self) -> int:
        return len(self._handles)

    async def open(
        self,
        *,
        prompt: str | None = None,
        input_ids: Sequence[int] | None = None,
        messages: list[dict[str, Any]] | None = None,
        sampling_params: SamplingParams | dict[str, Any] | None = None,
        rid: str | None = None,
        priority: int = 0,
        stream: bool = True,
    ) -> RequestHandle:
        if self.dead is not None:
            raise EngineDeadError(self.dead)
        params = self._params(sampling_params)
        await self._prepare_grammar(params)
        ids = await self._tokenize(prompt, input_ids, messages)
        max_new = self._max_new_tokens(len(ids), params)
        if self.max_outstanding is not None and len(self._handles) >= self.max_outstanding:
            raise QueueFullError(f"too many requests waiting ({len(self._handles)}); try again later")
        rid = rid or f"{uuid.uuid4().hex[:16]}-{next(self._counter)}"
        if rid in self._handles:
            raise InvalidRequestError("rid", f"request id {rid!r} is already in use")
        replica = self.router.route(rid, ids)
        send, receive = anyio.create_memory_object_stream[RequestOutput](math.inf)
        self._handles[rid] = send
        if not stream:
            self._buffers[rid] = []
        stop_ids = set(params.stop_token_ids or ())
        if not params.ignore_eos:
            stop_ids.update(self.limits.eos_token_ids)
        await self.detokenizer.send(RegisterRequest(rid, ids, params, replica, stream))
        await self.router.scheduler(replica).send(
            SubmitRequest(rid, ids, params, max_new, sorted(stop_ids), time.monotonic(), priority)
        )
        return RequestHandle(rid, ids, params, receive, replica=replica)

    async def abort(self, rid: str) -> None:
        replica = self.router.owner(rid)
        if rid in self._handles and replica is not None:
            await self.router.scheduler(replica).send(AbortRequest(rid, AbortReason.CLIENT))

    def _params(self, sampling_params: SamplingParams | dict[str, Any] | None) -> SamplingParams:
        if sampling_params is None:
            params = SamplingParams()
        elif isinstance(sampling_params, SamplingParams):
            params = sampling_params
        elif isinstance(sampling_params, dict):
            params = SamplingParams.from_dict(sampling_params)
        else:
            raise InvalidRequestError("sampling_params", "must be a SamplingParams or a dict")
        return params.validate(self.limits.vocab_size)

    async def _prepare_grammar(self, params: SamplingParams) -> None:
        if (constraint := params.constraint) is None:
            return
        if self.grammars is None:
            raise InvalidRequestError(constraint[0], "constrained decoding is not available in this engine")
        await self.grammars.prepare(params)

    async def _tokenize(
        self, prompt: str | None, input_ids: Sequence[int] | None, messages: list[dict[str, Any]] | None
    ) -> list[int]:
        given = [name for name, v in (("prompt", prompt), ("input_ids", input_ids), ("messages", messages))
                 if v is not None]
        if len(given) != 1:
            raise InvalidRequestError("prompt", "give exactly one of prompt, input_ids or messages")
        if input_ids is not None:
            if len(input_ids) < OFF_LOOP_IDS:
                ids = valid_token_ids(input_ids, self.limits.vocab_size)
            else:  # off the loop, as a text prompt is tokenized: the scheduler runs meanwhile
                ids = await anyio.to_thread.run_sync(valid_token_ids, input_ids, self.limits.vocab_size)
        elif messages is not None:
            if not messages:
                raise InvalidRequestError("messages", "must not be empty")
            ids = await anyio.to_thread.run_sync(self._apply_chat_template, messages)
        else:
            if not isinstance(prompt, str):
                raise InvalidRequestError("prompt", "must be a string")
            ids = await anyio.to_thread.run_sync(self._encode, prompt) if prompt else []
        if not ids:
            raise InvalidRequestError(given[0], "the prompt is empty")
        return ids

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text))

    def _apply_chat_template(self, messages: list[dict[str, Any]]) -> list[int]:
        try:
            out = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, chat_template=self.chat_template,
                return_dict=False,
            )
        except Exception as e:  # a template that rejects the messages (roles, types) is the user's input
            raise InvalidRequestError("messages", f"chat template failed: {e}") from None
        return list(out)

    def _max_new_tokens(self, prompt_len: int, params: SamplingParams) -> int:
        ctx = self.limits.context_length
        if prompt_len >= ctx:
            raise ContextLengthError(
                "prompt", f"the prompt has {prompt_len} tokens; the context length is {ctx}"
            )
        if params.max_new_tokens is None:
            return ctx - prompt_len
        if prompt_len + params.max_new_tokens > ctx:
            raise ContextLengthError(
                "max_new_tokens",
                f"prompt ({prompt_len} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds the "
                f"context length {ctx}",
            )
        return params.max_new_tokens

    async def run(self) -> None:
        try:
            while True:
                msg = await self.inbox.receive()
                match msg:
                    case OutputBatch():
                        for out in msg.outputs:
                            self._route(out)
                    case EngineFailed():
                        self.fail_all(msg.message)
                    case ReplicaFailed():
                        self._fail_replica(msg.replica, msg.message)
                    case _:
                        assert_never(msg)
        except MailboxClosed:
            self.fail_all(self.dead or "the engine stopped")

    def _route(self, out: RequestOutput) -> None:
        send = self._handles.get(out.rid)
        if send is None:
            return
        buffer = self._buffers.get(out.rid)
        if buffer is not None:
            if out.finish_reason is None and out.error is None:
                buffer.append(out)
                return
            del self._buffers[out.rid]
            out = merge_outputs([*buffer, out])
        try:
            send.send_nowait(out)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass  # the caller went away; its abort is on the way
        if out.finish_reason is not None:
            del self._handles[out.rid]
            send.close()
            self.router.finished(out.rid)

    def fail_all(self, message: str) -> None:
        """Every open request ends with an error: nothing may wait forever on a dead engine."""
        self.dead = message
        self._fail(list(self._handles), message)

    def _fail_replica(self, replica: int, message: str) -> None:
        """A replica's workers died: its requests end with an error; new ones go to the live replicas."""
        rids = self.router.mark_dead(replica)
        if self.router.all_dead:
            self.fail_all(message)
        else:
            self._fail(rids, message)

    def _fail(self, rids: list[str], message: str) -> None:
        for rid in rids:
            send = self._handles.pop(rid, None)
            self._buffers.pop(rid, None)
            self.router.finished(rid)
            if send is None:
                continue
            try:
                send.send_nowait(RequestOutput(rid, "", [], error=message))
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                pass
            send.close()
