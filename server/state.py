"""What every route shares: the engine, the server's settings, the open request groups, token texts."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from radixserve.server.errors import ApiError
from radixserve.server.fanout import RequestGroup

if TYPE_CHECKING:
    from radixserve.engine import Engine

DEFAULT_MAX_REQUEST_BYTES = 32 * 1024 * 1024

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 30000
    api_key: str | None = None
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    log_requests: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.max_request_bytes < 1:
            raise ValueError(f"max_request_bytes must be >= 1, got {self.max_request_bytes}")


class TokenTexts:
    """Token id -> its text on its own, as OpenAI's logprobs show tokens (" Paris", not "ĠParis")."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._texts: dict[int, str] = {}

    def __getitem__(self, token_id: int) -> str:
        text = self._texts.get(token_id)
        if text is None:
            text = self._tokenizer.decode([token_id], skip_special_tokens=False)
            self._texts[token_id] = text
        return text

    def decode(self, token_ids: list[int]) -> str:
        return self._tokenizer.decode(
            token_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False
        )


@dataclass(slots=True)
class ServerState:
    engine: Engine
    config: ServerConfig
    model_name: str
    model_aliases: frozenset[str]
    created: int = field(default_factory=lambda: int(time.time()))
    groups: dict[str, RequestGroup] = field(default_factory=dict)  # gid -> its open engine requests
    tokens: TokenTexts = field(init=False)

    def __post_init__(self) -> None:
        self.tokens = TokenTexts(self.engine.tokenizer)

    def check_model(self, model: str) -> None:
        if model != self.model_name and model not in self.model_aliases:
            raise ApiError(
                404,
                f"the model `{model}` does not exist; this server serves `{self.model_name}`",
                param="model",
                code="model_not_found",
            )

    async def abort(self, rid: str) -> None:
        """Abort a request by the id the client saw (a whole group) or by one engine request id."""
        group = self.groups.get(rid)
        if group is not None:
            await group.abort()
        else:
            await self.engine.abort(rid)

    async def abort_all(self) -> None:
        for group in list(self.groups.values()):
            await group.abort()


def state_of(request: Request) -> ServerState:
    state: ServerState = request.app.state.server
    return state


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


async def decode_body(request: Request, type: type[T]) -> T:
    """Decode and validate the body in one pass; errors name the field (see errors.api_error)."""
    body = await request.body()
    if not body:
        raise ApiError(400, "the request body is empty; send a JSON object", code="invalid_json")
    return msgspec.json.decode(body, type=type)


def json_response(body: Any, status: int = 200) -> Response:
    return Response(msgspec.json.encode(body), status_code=status, media_type="application/json")
