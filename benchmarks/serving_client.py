"""One streamed request to a running server, timed as SGLang's bench_serving times it.

    sglang   POST /generate       {"input_ids": [...], "sampling_params": {...}, "stream": true}; each SSE
                                  chunk carries the cumulative output and meta_info.completion_tokens
    openai   POST /v1/completions {"prompt": [token ids], "max_tokens": n, "ignore_eos": true, "stream": true}

NOTE: SGLang's native client counts a chunk as carrying tokens when its text is non-empty; here the native
client uses meta_info.completion_tokens instead, which is exact even where the text of a few tokens is held
back (a random-weight model emits incomplete UTF-8 now and then). The OpenAI client follows SGLang: a chunk
with text is one ITL gap, and the output length comes from the usage chunk (stream_options.include_usage),
else the requested length.
"""

from __future__ import annotations

import json
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx

from radixserve.benchmarks.datasets import BenchRequest
from radixserve.benchmarks.serving_metrics import RequestOutcome

RequestFunc = Callable[[httpx.AsyncClient, str, BenchRequest, dict[str, Any]], Awaitable[RequestOutcome]]


async def _events(response: httpx.Response) -> AsyncIterator[str]:
    """The `data:` payloads of an SSE stream, [DONE] included."""
    async for line in response.aiter_lines():
        line = line.strip()
        if line.startswith("data:"):
            yield line[5:].strip()


async def _fail(out: RequestOutcome, response: httpx.Response) -> RequestOutcome:
    body = (await response.aread()).decode("utf-8", "replace")
    out.error = f"HTTP {response.status_code}: {body[:500]}"
    return out


async def request_sglang(
    client: httpx.AsyncClient, base_url: str, req: BenchRequest, opts: dict[str, Any]
) -> RequestOutcome:
    payload = {
        "input_ids": req.input_ids,
        "sampling_params": {
            "temperature": 0.0,
            "max_new_tokens": req.output_len,
            "ignore_eos": not opts["disable_ignore_eos"],
        },
        "stream": not opts["disable_stream"],
        **opts["extra_request_body"],
    }
    out = RequestOutcome(prompt_len=req.prompt_len)
    start = time.perf_counter()
    last_time, last_len = start, 0
    try:
        async with client.stream("POST", base_url + "/generate", json=payload) as response:
            if response.status_code != 200:
                return await _fail(out, response)
            if opts["disable_stream"]:
                data = json.loads(await response.aread())
                out.latency = out.ttft = time.perf_counter() - start
                out.output_len = int(data["meta_info"]["completion_tokens"])
                out.generated_text, out.success = data["text"], True
                return out
            async for chunk in _events(response):
                if chunk == "[DONE]":
                    continue
                data = json.loads(chunk)
                output_len = int(data["meta_info"]["completion_tokens"])
                if output_len <= last_len:
                    continue
                now = time.perf_counter()
                if last_len == 0:
                    out.ttft = now - start
                else:
                    n = output_len - last_len
                    out.itl.extend([(now - last_time) / n] * n)
                last_time, last_len = now, output_len
                out.generated_text = data["text"]
            out.latency = time.perf_counter() - start
            out.output_len, out.success = last_len, True
    except Exception:
        out.error = traceback.format_exc()
    return out


async def request_openai(
    client: httpx.AsyncClient, base_url: str, req: BenchRequest, opts: dict[str, Any]
) -> RequestOutcome:
    stream = not opts["disable_stream"]
    payload: dict[str, Any] = {
        "model": opts["model"],
        "prompt": req.input_ids,
        "temperature": 0.0,
        "max_tokens": req.output_len,
        "ignore_eos": not opts["disable_ignore_eos"],
        "stream": stream,
        **opts["extra_request_body"],
    }
    if stream:
        payload["stream_options"] = {"include_usage": True}
    out = RequestOutcome(prompt_len=req.prompt_len)
    start = time.perf_counter()
    last_time = start
    output_len = req.output_len
    text: list[str] = []
    try:
        async with client.stream("POST", base_url + "/v1/completions", json=payload) as response:
            if response.status_code != 200:
                return await _fail(out, response)
            if not stream:
                data = json.loads(await response.aread())
                out.latency = out.ttft = time.perf_counter() - start
                out.output_len = int((data.get("usage") or {}).get("completion_tokens", output_len))
                out.generated_text, out.success = data["choices"][0]["text"], True
                return out
            async for chunk in _events(response):
                if chunk == "[DONE]":
                    continue
                data = json.loads(chunk)
                if data.get("usage"):
                    output_len = int(data["usage"].get("completion_tokens", output_len))
                choices = data.get("choices") or []
                if not (choices and choices[0].get("text")):
                    continue
                now = time.perf_counter()
                if not text:
                    out.ttft = now - start
                else:
                    out.itl.append(now - last_time)
                last_time = now
                text.append(choices[0]["text"])
            out.latency = time.perf_counter() - start
            out.output_len, out.generated_text, out.success = output_len, "".join(text), True
    except Exception:
        out.error = traceback.format_exc()
    return out


BACKENDS: dict[str, RequestFunc] = {"sglang": request_sglang, "openai": request_openai}
