"""Plain ASGI middleware: API key check, request body size limit, request log.

Each wraps an ASGI app and answers errors itself in OpenAI's shape (server/errors.py), so nothing here
depends on Starlette's request objects.
"""

from __future__ import annotations

import hmac
import logging
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from radixserve.server.errors import ApiError, send_error

logger = logging.getLogger("radixserve.server")

# Liveness probes stay open without a key, as in SGLang.
OPEN_PATHS = ("/health", "/health_generate")


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key.lower() == name:
            return value
    return None


class ApiKeyMiddleware:
    """Every HTTP request but the health probes (and CORS preflights) needs `Authorization: Bearer <key>`."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] == "OPTIONS" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        given = _header(scope, b"authorization")
        if given is None:
            await send_error(
                send,
                ApiError(401, "missing API key: send `Authorization: Bearer <key>`", code="invalid_api_key"),
            )
            return
        if not hmac.compare_digest(given, self.expected):
            await send_error(send, ApiError(401, "incorrect API key", code="invalid_api_key"))
            return
        await self.app(scope, receive, send)


class BodySizeLimitMiddleware:
    """Reads the whole body before the app runs and answers 413 past `max_bytes`.

    A declared Content-Length over the limit is refused before reading anything; a chunked body is counted
    as it arrives. The app then receives the body as one message, and the original `receive` after it, so
    disconnects still reach the app.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = ApiError(
            413, f"the request body is larger than {self.max_bytes} bytes", code="request_too_large"
        )
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await send_error(send, too_large)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # nobody to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await send_error(send, too_large)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body: bytes | None = b"".join(chunks)

        async def replay() -> Message:
            nonlocal body
            if body is not None:
                message: Message = {"type": "http.request", "body": body, "more_body": False}
                body = None
                return message
            return await receive()

        await self.app(scope, replay, send)


class RequestLogMiddleware:
    """`--log-requests`: one line per request with its status and latency."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 0

        async def logged_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, logged_send)
        finally:
            client = scope.get("client")
            who = f"{client[0]}:{client[1]}" if client else "-"
            logger.info(
                "%s %s %s %s %.3fs",
                who,
                scope["method"],
                scope["path"],
                status or "-",
                time.perf_counter() - start,
            )
