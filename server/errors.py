"""Every error the server answers, in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.

`api_error()` is the one place that maps an exception to an HTTP status: bad input 400 (unknown model 404),
missing or wrong API key 401, body too large 413, queue full or engine dead 503, anything unexpected 500.
The same body goes out as a JSON response before a stream begins and as a `data: {"error": ...}` event after.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping

import msgspec
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Send

from radixserve.errors import (
    ContextLengthError,
    EngineDeadError,
    InvalidRequestError,
    QueueFullError,
    RequestAbortedError,
)

logger = logging.getLogger(__name__)


class ApiError(Exception):
    """An error answered to the client as is."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code


class ErrorInfo(msgspec.Struct, frozen=True):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(msgspec.Struct, frozen=True):
    error: ErrorInfo


def api_error(exc: BaseException, rename: Mapping[str, str] | None = None) -> ApiError:
    """The ApiError for `exc`. `rename` maps engine field names onto the route's own (max_new_tokens ->
    max_tokens), so the error names the field the client sent."""
    rename = rename or {}
    match exc:
        case ApiError():
            return exc
        case ContextLengthError():
            field = rename.get(exc.field, exc.field)
            return ApiError(400, f"{field}: {exc.message}", param=field, code="context_length_exceeded")
        case InvalidRequestError():
            field = rename.get(exc.field, exc.field)
            return ApiError(400, f"{field}: {exc.message}" if field else exc.message, param=field or None)
        case msgspec.ValidationError():
            field = field_of(str(exc))
            return ApiError(400, str(exc), param=rename.get(field, field) or None)
        case msgspec.DecodeError():
            return ApiError(400, f"the body is not valid JSON: {exc}", code="invalid_json")
        case QueueFullError():
            return ApiError(503, str(exc), type="server_overloaded", code="queue_full")
        case EngineDeadError():
            return ApiError(
                503, f"the engine is not available: {exc}", type="server_error", code="engine_dead"
            )
        case RequestAbortedError():
            return ApiError(503, f"the request was aborted: {exc}", type="server_error", code="aborted")
        case HTTPException():
            code = "not_found" if exc.status_code == 404 else None
            return ApiError(exc.status_code, str(exc.detail), code=code)
        case _:
            logger.error("unexpected error", exc_info=exc)
            return ApiError(500, f"internal server error: {type(exc).__name__}", type="server_error")


def error_body(error: ApiError) -> bytes:
    return msgspec.json.encode(ErrorBody(ErrorInfo(error.message, error.type, error.param, error.code)))


def error_response(exc: BaseException, rename: Mapping[str, str] | None = None) -> Response:
    error = api_error(exc, rename)
    return Response(error_body(error), status_code=error.status, media_type="application/json")


def error_event(exc: BaseException, rename: Mapping[str, str] | None = None) -> bytes:
    """The SSE event of an error that happened after the stream began."""
    return b"data: " + error_body(api_error(exc, rename)) + b"\n\n"


async def send_error(send: Send, error: ApiError) -> None:
    """Answer from plain ASGI middleware, without going through Starlette."""
    body = error_body(error)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if error.status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def handle_exception(request: Request, exc: Exception) -> Response:
    """Starlette exception handler: routing errors (404, 405) and anything an endpoint raises."""
    return error_response(exc)


def field_of(message: str) -> str:
    """The field a msgspec error names: "... - at `$.messages[0].role`", "... at `key` in `$.logit_bias`",
    "Object contains unknown field `foo`", "Object missing required field `model`"."""
    for pattern in (r"in `\$\.?([^`]*)`", r"at `\$\.?([^`]*)`", r"field `([^`]*)`"):
        if (m := re.search(pattern, message)) is not None:
            return m.group(1).replace("[...]", "")  # "[...]" is msgspec's "some value of this dict"
    return ""
