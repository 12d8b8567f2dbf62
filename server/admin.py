"""Routes around generation: the model list, health, model and server info, cache flush, abort.

GET  /v1/models, /v1/models/{id}     OpenAI's model cards (404 for an id this server does not serve)
GET  /health                         200 while the engine runs, 503 once it died
GET  /health_generate                200 when a one-token generation completes in time
GET  /get_model_info, /get_server_info (the latter with the KV pool's occupancy)
GET|POST /flush_cache                drop the prefix cache as soon as the engine is idle
POST /abort_request {"rid": ..., "abort_all": false}
"""

from __future__ import annotations

import dataclasses
import importlib.metadata

import anyio
import msgspec
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from radixserve.errors import RadixServeError
from radixserve.server.errors import ApiError, error_response
from radixserve.server.protocol import ModelCard, ModelList
from radixserve.server.state import ServerState, decode_body, json_response, state_of

HEALTH_GENERATE_TIMEOUT = 20.0


class AbortRequestBody(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    rid: str = ""
    abort_all: bool = False


class ModelInfo(msgspec.Struct):
    model_path: str | None
    tokenizer_path: str | None
    served_model_name: str
    is_generation: bool
    context_length: int
    vocab_size: int
    architecture: str | None


def _card(state: ServerState) -> ModelCard:
    return ModelCard(
        state.model_name,
        state.created,
        root=state.engine.config.model_path or state.model_name,
        max_model_len=state.engine.context_length,
    )


async def list_models(request: Request) -> Response:
    return json_response(ModelList([_card(state_of(request))]))


async def retrieve_model(request: Request) -> Response:
    state = state_of(request)
    try:
        state.check_model(request.path_params["model"])
    except ApiError as e:
        return error_response(e)
    return json_response(_card(state))


async def health(request: Request) -> Response:
    dead = state_of(request).engine.ingress.dead
    return (
        Response(status_code=200)
        if dead is None
        else error_response(
            ApiError(503, f"the engine is not available: {dead}", type="server_error", code="engine_dead")
        )
    )


async def health_generate(request: Request) -> Response:
    """A real one-token generation, so a stuck scheduler or worker shows up too."""
    engine = state_of(request).engine
    try:
        with anyio.fail_after(HEALTH_GENERATE_TIMEOUT):
            await engine.generate(input_ids=[0], sampling_params={"max_new_tokens": 1, "temperature": 0})
    except TimeoutError:
        return error_response(
            ApiError(
                503, "a one-token generation did not finish in time", type="server_error", code="unhealthy"
            )
        )
    except RadixServeError as e:
        return error_response(e)
    return Response(status_code=200)


async def get_model_info(request: Request) -> Response:
    state = state_of(request)
    engine = state.engine
    mc = engine.model_config
    return json_response(
        ModelInfo(
            model_path=engine.config.model_path,
            tokenizer_path=engine.config.tokenizer_path or engine.config.model_path,
            served_model_name=state.model_name,
            is_generation=True,
            context_length=engine.context_length,
            vocab_size=engine.ready.vocab_size if engine.ready is not None else 0,
            architecture=mc.architecture if mc is not None else None,
        )
    )


async def get_server_info(request: Request) -> Response:
    """The engine's configuration as launched (no secrets), the KV pool's occupancy, the version."""
    state = state_of(request)
    engine = state.engine
    info = dataclasses.asdict(engine.config)
    info.update(
        host=state.config.host,
        port=state.config.port,
        api_key_required=state.config.api_key is not None,
        max_request_bytes=state.config.max_request_bytes,
        served_model_name=state.model_name,
        context_length=engine.context_length,
        pool_stats=engine.pool_stats(),
        version=importlib.metadata.version("radixserve"),
    )
    return json_response(info)


async def flush_cache(request: Request) -> Response:
    try:
        await state_of(request).engine.flush_cache()
    except Exception as e:
        return error_response(e)
    return PlainTextResponse("Cache flush requested: it runs as soon as the engine is idle.\n")


async def abort_request(request: Request) -> Response:
    state = state_of(request)
    try:
        body = await decode_body(request, AbortRequestBody)
        if body.abort_all:
            await state.abort_all()
        elif body.rid:
            await state.abort(body.rid)
        else:
            raise ApiError(400, "rid: give a request id or abort_all: true", param="rid")
    except Exception as e:
        return error_response(e)
    return Response(status_code=200)
