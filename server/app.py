"""The HTTP app: `build_app(engine, config)` is a Starlette app over a running Engine.

    middleware (outermost first)   request log (--log-requests), API key (--api-key), body size limit
    OpenAI                         /v1/completions, /v1/chat/completions, /v1/models, /v1/models/{model}
    native (SGLang)                /generate, /health, /health_generate, /get_model_info, /get_server_info,
                                   /flush_cache, /abort_request

The app does not own the engine: whoever started it (launch_server, a test, an embedding app) stops it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.routing import Route

from radixserve.models.source import resolve_model_source
from radixserve.server import admin
from radixserve.server.errors import handle_exception
from radixserve.server.middleware import ApiKeyMiddleware, BodySizeLimitMiddleware, RequestLogMiddleware
from radixserve.server.native import generate
from radixserve.server.openai_chat import create_chat_completion
from radixserve.server.openai_completions import create_completion
from radixserve.server.state import ServerConfig, ServerState

if TYPE_CHECKING:
    from radixserve.engine import Engine


def served_model_name(engine: Engine) -> str:
    """--served-model-name, else the model's name: the path as given, or the default model's file stem."""
    cfg = engine.config
    if cfg.served_model_name:
        return cfg.served_model_name
    if cfg.model_path:
        return cfg.model_path
    return resolve_model_source(None).path.name.split(".")[0]  # SmolLM2-135M-Instruct.Q4_1.gguf


def build_app(engine: Engine, config: ServerConfig | None = None) -> Starlette:
    config = config or ServerConfig()
    name = served_model_name(engine)
    aliases = {engine.config.model_path} if engine.config.model_path else set()
    if engine.config.model_path:
        aliases.add(Path(engine.config.model_path).name)
    state = ServerState(engine, config, name, frozenset(aliases))
    routes = [
        Route("/v1/completions", create_completion, methods=["POST"]),
        Route("/v1/chat/completions", create_chat_completion, methods=["POST"]),
        Route("/v1/models", admin.list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", admin.retrieve_model, methods=["GET"]),
        Route("/generate", generate, methods=["POST"]),
        Route("/health", admin.health, methods=["GET"]),
        Route("/health_generate", admin.health_generate, methods=["GET"]),
        Route("/get_model_info", admin.get_model_info, methods=["GET"]),
        Route("/get_server_info", admin.get_server_info, methods=["GET"]),
        Route("/flush_cache", admin.flush_cache, methods=["GET", "POST"]),
        Route("/abort_request", admin.abort_request, methods=["POST"]),
    ]
    middleware = []
    if config.log_requests:
        middleware.append(Middleware(RequestLogMiddleware))
    if config.api_key is not None:
        middleware.append(Middleware(ApiKeyMiddleware, api_key=config.api_key))
    middleware.append(Middleware(BodySizeLimitMiddleware, max_bytes=config.max_request_bytes))
    app = Starlette(
        routes=routes, middleware=middleware, exception_handlers={HTTPException: handle_exception}
    )
    app.state.server = state
    return app
