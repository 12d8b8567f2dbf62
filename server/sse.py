"""Responses that race their work against the client: a disconnect cancels the work (and so aborts the engine
requests behind it, whose KV slots go back to the pool).

    EventStreamResponse   server-sent events: `data: {json}\\n\\n` per event, then `data: [DONE]\\n\\n`
    DeferredResponse      a plain response computed after the headers are known not to be needed yet

Both run the work and a disconnect listener in one task group; whichever ends first cancels the other
(STYLE.md "HTTP"). `on_close` runs in every case, shielded: it releases what the work did not get to.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import msgspec
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from radixserve.server.errors import error_event, error_response

logger = logging.getLogger(__name__)

DONE = b"data: [DONE]\n\n"
SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),  # proxies must not buffer the stream
]

_encoder = msgspec.json.Encoder()

Emit = Callable[[bytes], Awaitable[None]]
OnClose = Callable[[], Awaitable[None]]


def event(payload: Any) -> bytes:
    """One SSE event carrying `payload` (a msgspec Struct or plain data) as JSON."""
    return b"data: " + _encoder.encode(payload) + b"\n\n"


async def race_disconnect(receive: Receive, work: Callable[[], Awaitable[None]]) -> bool:
    """Run `work` until it returns (True) or the client disconnects first (False; `work` is cancelled)."""
    finished = False
    async with anyio.create_task_group() as tg:

        async def run() -> None:
            nonlocal finished
            await work()
            finished = True
            tg.cancel_scope.cancel()

        tg.start_soon(run)
        # The body was read already; what arrives now can only be the disconnect.
        while (await receive())["type"] != "http.disconnect":
            pass
        tg.cancel_scope.cancel()
    return finished


async def _close(on_close: OnClose | None) -> None:
    if on_close is not None:
        with anyio.CancelScope(shield=True):
            await on_close()


class EventStreamResponse:
    """Streams what `produce(emit)` emits. An error raised by `produce` becomes a `data: {"error": ...}`
    event; the stream then ends with `data: [DONE]` as usual."""

    def __init__(self, produce: Callable[[Emit], Awaitable[None]], on_close: OnClose | None = None) -> None:
        self.produce = produce
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})

            async def emit(chunk: bytes) -> None:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})

            async def work() -> None:
                try:
                    await self.produce(emit)
                except Exception as e:
                    await emit(error_event(e))
                await emit(DONE)

            if await race_disconnect(receive, work):
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:
            pass  # the client went away while we were writing to it
        finally:
            await _close(self.on_close)


class DeferredResponse:
    """Sends the response `compute()` returns; an exception it raises becomes the error response."""

    def __init__(self, compute: Callable[[], Awaitable[Response]], on_close: OnClose | None = None) -> None:
        self.compute = compute
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        response: Response | None = None
        try:

            async def work() -> None:
                nonlocal response
                try:
                    response = await self.compute()
                except Exception as e:
                    response = error_response(e)

            if not await race_disconnect(receive, work):
                return
        finally:
            await _close(self.on_close)
        assert response is not None
        await response(scope, receive, send)
