"""Every error the server answers: status, OpenAI's shape, the field named, and the next request unharmed.

The server runs with an API key, a tiny admission limit (1 running + 1 queued), a 64 KiB body limit and a
512-token context. The last test kills the worker: the engine is dead from then on.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.server.conftest import Server

KEY = "sk-test-key"
CONTEXT = 512
MAX_BYTES = 65536
SERVER_ARGS = (
    "--api-key",
    KEY,
    "--max-running-requests",
    "1",
    "--max-queued-requests",
    "1",
    "--max-request-bytes",
    str(MAX_BYTES),
    "--context-length",
    str(CONTEXT),
)
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def api(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def model(api: httpx.Client) -> str:
    return api.get("/v1/models").json()["data"][0]["id"]


def assert_error(
    response: httpx.Response, status: int, param: str | None = None, code: str | None = None
) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error


def assert_still_serves(api: httpx.Client, model: str) -> None:
    out = api.post("/v1/completions", json={"model": model, "prompt": "Hi", "max_tokens": 1})
    assert out.status_code == 200, out.text
    assert out.json()["usage"]["completion_tokens"] == 1


def test_api_key(server: Server, api: httpx.Client, model: str) -> None:
    with httpx.Client(base_url=server.url, timeout=30) as anonymous:
        assert_error(anonymous.get("/v1/models"), 401, code="invalid_api_key")
        assert_error(anonymous.post("/v1/completions", json={}), 401, code="invalid_api_key")
        wrong = anonymous.get("/v1/models", headers={"Authorization": "Bearer nope"})
        assert_error(wrong, 401, code="invalid_api_key")
        assert anonymous.get("/health").status_code == 200  # probes need no key
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0) as client:
        with pytest.raises(openai.AuthenticationError):
            client.completions.create(model=model, prompt="Hi", max_tokens=1)
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0) as client:
        assert client.completions.create(model=model, prompt="Hi", max_tokens=1).choices[0].finish_reason
    assert_still_serves(api, model)


COMPLETION_ERRORS: list[tuple[dict[str, Any], str]] = [
    ({"prompt": 1}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [1, "a"]}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": [1, 2, 10**7]}, "prompt"),
    ({"prompt": "Hi", "temperature": "hot"}, "temperature"),
    ({"prompt": "Hi", "temperature": 3}, "temperature"),
    ({"prompt": "Hi", "top_p": 0}, "top_p"),
    ({"prompt": "Hi", "n": 0}, "n"),
    ({"prompt": "Hi", "n": 1.5}, "n"),
    ({"prompt": "Hi", "max_tokens": -1}, "max_tokens"),
    ({"prompt": "Hi", "logprobs": 50}, "logprobs"),
    ({"prompt": "Hi", "presence_penalty": 5}, "presence_penalty"),
    ({"prompt": "Hi", "frequency_penalty": -3}, "frequency_penalty"),
    ({"prompt": "Hi", "min_p": 2}, "min_p"),
    ({"prompt": "Hi", "logit_bias": {"10000000": 1}}, "logit_bias"),
    ({"prompt": "Hi", "logit_bias": {"5": 500}}, "logit_bias"),
    ({"prompt": "Hi", "stop": [""]}, "stop"),
    ({"prompt": "Hi", "stop_token_ids": [10**7]}, "stop_token_ids"),
    ({"prompt": "Hi", "min_tokens": 8, "max_tokens": 4}, "min_tokens"),
    ({"prompt": "Hi", "no_such_field": 1}, "no_such_field"),
    ({"prompt": "Hi", "stream_options": {"include_usage": True}}, "stream_options"),
    ({"prompt": "Hi", "suffix": "end"}, "suffix"),
    ({"prompt": "Hi", "best_of": 3}, "best_of"),
    ({"prompt": "Hi", "max_tokens": CONTEXT}, "max_tokens"),  # prompt + max_tokens > context
    ({"prompt": [5] * (CONTEXT + 10)}, "prompt"),  # the prompt alone
    ({"prompt": ["Hi", [5] * (CONTEXT + 10)]}, "prompt"),  # the second prompt fails: the first is aborted
]


@pytest.mark.parametrize(("body", "param"), COMPLETION_ERRORS)
def test_completion_bad_request(api: httpx.Client, model: str, body: dict[str, Any], param: str) -> None:
    assert_error(api.post("/v1/completions", json={"model": model, **body}), 400, param)
    assert_still_serves(api, model)


CHAT_ERRORS: list[tuple[dict[str, Any], str]] = [
    ({"messages": []}, "messages"),
    ({"messages": "Hi"}, "messages"),
    ({"messages": [{"role": "robot", "content": "Hi"}]}, "messages[0].role"),
    (
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        "messages[0].content",
    ),
    ({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 0}, "max_tokens"),
    (
        {"messages": [{"role": "user", "content": "Hi"}], "max_completion_tokens": CONTEXT},
        "max_completion_tokens",
    ),
    ({"messages": [{"role": "user", "content": "Hi " * CONTEXT}]}, "messages"),
    ({"messages": [{"role": "user", "content": "Hi"}], "top_logprobs": 2}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "Hi"}], "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    (
        {
            "messages": [{"role": "user", "content": "Hi"}],
            "response_format": {
                "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}
            },
        },
        "response_format",
    ),
    ({"messages": [{"role": "user", "content": "Hi"}], "regex": "[a-"}, "regex"),
    ({"messages": [{"role": "user", "content": "Hi"}], "tools": [{"type": "function"}]}, "tools"),
]


@pytest.mark.parametrize(("body", "param"), CHAT_ERRORS)
def test_chat_bad_request(api: httpx.Client, model: str, body: dict[str, Any], param: str) -> None:
    assert_error(api.post("/v1/chat/completions", json={"model": model, **body}), 400, param)
    assert_still_serves(api, model)


def test_malformed_and_missing(api: httpx.Client, model: str) -> None:
    bad_json = api.post("/v1/completions", content=b'{"model": "x", "prompt": ', headers=AUTH)
    assert_error(bad_json, 400, code="invalid_json")
    assert_error(api.post("/v1/completions", content=b""), 400, code="invalid_json")
    assert_error(api.post("/v1/completions", json=[1, 2]), 400)
    assert_error(api.post("/v1/completions", json={"prompt": "Hi"}), 400, "model")
    assert_error(
        api.post("/generate", json={"text": "Hi", "sampling_params": {"bogus": 1}}),
        400,
        "sampling_params.bogus",
    )
    assert_error(
        api.post("/generate", json={"text": "Hi", "sampling_params": {"top_k": -5}}),
        400,
        "sampling_params.top_k",
    )
    assert_error(api.post("/abort_request", json={}), 400, "rid")
    assert_error(api.get("/no/such/route"), 404)
    assert_error(api.get("/v1/completions"), 405)
    assert_still_serves(api, model)


def test_unknown_model(server: Server, api: httpx.Client, model: str) -> None:
    for path, body in (
        ("/v1/completions", {"prompt": "Hi"}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}),
    ):
        assert_error(api.post(path, json={"model": "gpt-17", **body}), 404, "model", "model_not_found")
    assert_error(api.get("/v1/models/gpt-17"), 404, "model", "model_not_found")
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0) as client:
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="gpt-17", messages=[{"role": "user", "content": "Hi"}])
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model=model, prompt="Hi", temperature=-1)
    assert_still_serves(api, model)


def test_body_too_large(api: httpx.Client, model: str) -> None:
    big = json.dumps({"model": model, "prompt": "x" * MAX_BYTES}).encode()
    assert_error(api.post("/v1/completions", content=big), 413, code="request_too_large")

    def chunked() -> Iterator[bytes]:  # no Content-Length: the limit is counted as the body arrives
        for i in range(0, len(big), 8192):
            yield big[i : i + 8192]

    assert_error(api.post("/v1/completions", content=chunked()), 413, code="request_too_large")
    assert_still_serves(api, model)


def test_queue_full(server: Server, api: httpx.Client, model: str) -> None:
    long = {
        "model": model,
        "prompt": "Tell me a story.",
        "max_tokens": 400,
        "stream": True,
        "ignore_eos": True,
    }
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as other:
        with (
            api.stream("POST", "/v1/completions", json=long) as first,
            other.stream("POST", "/v1/completions", json=long) as second,
        ):
            assert first.status_code == second.status_code == 200  # one running, one queued
            third = httpx.post(f"{server.url}/v1/completions", json={**long, "stream": False}, headers=AUTH)
            assert_error(third, 503, code="queue_full")
    # The two streams were cut off: their aborts free the queue.
    deadline = time.monotonic() + 30
    while True:
        out = api.post("/v1/completions", json={"model": model, "prompt": "Hi", "max_tokens": 1})
        if out.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert out.status_code == 200, out.text


def _worker_pids(server_pid: int) -> list[int]:
    with open(f"/proc/{server_pid}/task/{server_pid}/children") as f:
        return [int(p) for p in f.read().split()]


def test_engine_dead_last(server: Server, api: httpx.Client, model: str) -> None:
    """Runs last: kills the worker under a running stream. The stream ends with an error event, then every
    request gets 503 and /health tells the truth."""
    body = {
        "model": model,
        "prompt": "Tell me a story.",
        "max_tokens": 400,
        "stream": True,
        "ignore_eos": True,
    }
    events: list[str] = []
    with api.stream("POST", "/v1/completions", json=body) as stream:
        lines = stream.iter_lines()
        for line in lines:
            if line.startswith("data: {"):
                break
        for pid in _worker_pids(server.proc.pid):
            os.kill(pid, signal.SIGKILL)
        events = [line for line in lines if line.startswith("data: ")]
    errors = [json.loads(e[6:])["error"] for e in events if e.startswith('data: {"error"')]
    # NOTE: "aborted" when the request's error output reaches ingress before the engine's death notice does.
    assert len(errors) == 1 and errors[0]["code"] in ("engine_dead", "aborted"), events[-3:]
    assert events[-1] == "data: [DONE]"
    deadline = time.monotonic() + 10
    while api.get("/health").status_code != 503 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert_error(api.get("/health"), 503, code="engine_dead")
    dead = api.post("/v1/completions", json={"model": model, "prompt": "Hi", "max_tokens": 1})
    assert_error(dead, 503, code="engine_dead")
    streamed = api.post(
        "/v1/chat/completions",
        json={"model": model, "stream": True, "messages": [{"role": "user", "content": "Hi"}]},
    )
    assert_error(streamed, 503, code="engine_dead")
