"""SGLang's native routes: /generate (text, ids, batches, streams, logprobs, prefill only) and the admin
routes (health, info, flush_cache, abort_request)."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from tests.server.conftest import Server

PROMPT = "Count from one to twenty: one, two, three,"


def gen(http: httpx.Client, **body: Any) -> Any:
    out = http.post("/generate", json=body)
    assert out.status_code == 200, out.text
    return out.json()


def greedy(max_new_tokens: int, **extra: Any) -> dict[str, Any]:
    return {"max_new_tokens": max_new_tokens, "temperature": 0, **extra}


def stream_events(http: httpx.Client, **body: Any) -> list[Any]:
    with http.stream("POST", "/generate", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[6:]) for line in lines[:-1]]


def server_info(http: httpx.Client) -> dict[str, Any]:
    return http.get("/get_server_info").json()


def wait_for(http: httpx.Client, ok: Any, timeout: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        stats = server_info(http)["pool_stats"]
        if ok(stats) or time.monotonic() > deadline:
            return stats
        time.sleep(0.05)


def test_generate_text_and_ids(http: httpx.Client, smollm_tokenizer) -> None:
    out = gen(http, text=PROMPT, sampling_params=greedy(8, ignore_eos=True))
    assert set(out) == {"text", "output_ids", "meta_info"} and len(out["output_ids"]) == 8 and out["text"]
    meta = out["meta_info"]
    assert meta["finish_reason"] == {"type": "length", "length": 8}
    assert meta["completion_tokens"] == 8 and meta["prompt_tokens"] == len(smollm_tokenizer.encode(PROMPT))
    assert meta["cached_tokens"] >= 0 and meta["e2e_latency"] > 0 and meta["id"]
    by_ids = gen(http, input_ids=smollm_tokenizer.encode(PROMPT), sampling_params=greedy(8, ignore_eos=True))
    assert by_ids["output_ids"] == out["output_ids"] and by_ids["text"] == out["text"]
    assert by_ids["meta_info"]["cached_tokens"] > 0  # the same prompt again: served from the radix cache


def test_generate_stop(http: httpx.Client) -> None:
    out = gen(http, text=PROMPT, sampling_params=greedy(16, stop=[" six"]))
    assert out["meta_info"]["finish_reason"] in (
        {"type": "stop", "matched": " six"},
        {"type": "length", "length": 16},
    )


def test_generate_stream_is_cumulative(http: httpx.Client) -> None:
    whole = gen(http, text=PROMPT, sampling_params=greedy(10))
    events = stream_events(http, text=PROMPT, sampling_params=greedy(10))
    texts = [e["text"] for e in events]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:], strict=False))
    assert texts[-1] == whole["text"] and events[-1]["output_ids"] == whole["output_ids"]
    assert [e["meta_info"]["finish_reason"] is not None for e in events].count(True) == 1


def test_generate_batch_and_n(http: httpx.Client) -> None:
    prompts = [PROMPT, "The capital of France is"]
    out = gen(http, text=prompts, sampling_params=[greedy(4, ignore_eos=True), greedy(6, ignore_eos=True)])
    assert isinstance(out, list) and len(out) == 2
    assert [o["meta_info"]["completion_tokens"] for o in out] == [4, 6]
    assert out[0]["text"] == gen(http, text=PROMPT, sampling_params=greedy(4, ignore_eos=True))["text"]
    fanned = gen(http, text=prompts, sampling_params=greedy(4, n=2, ignore_eos=True))
    assert len(fanned) == 4 and fanned[0]["text"] == fanned[1]["text"] == out[0]["text"]
    events = stream_events(http, text=prompts, sampling_params=greedy(4))
    assert {e["index"] for e in events} == {0, 1}


def test_logprobs(http: httpx.Client) -> None:
    out = gen(
        http,
        text=PROMPT,
        sampling_params=greedy(5),
        return_logprob=True,
        top_logprobs_num=3,
        logprob_start_len=0,
        return_text_in_logprobs=True,
    )
    meta = out["meta_info"]
    n_prompt = meta["prompt_tokens"]
    assert len(meta["input_token_logprobs"]) == n_prompt and meta["input_token_logprobs"][0][0] is None
    assert meta["input_top_logprobs"][0] is None and all(len(t) == 3 for t in meta["input_top_logprobs"][1:])
    assert [t[1] for t in meta["output_token_logprobs"]] == out["output_ids"]
    for (_, token, text), top in zip(meta["output_token_logprobs"], meta["output_top_logprobs"], strict=True):
        assert len(top) == 3 and top[0][1] == token and isinstance(text, str)  # greedy: the best one
    tail = gen(http, text=PROMPT, sampling_params=greedy(2), return_logprob=True, logprob_start_len=3)
    assert len(tail["meta_info"]["input_token_logprobs"]) == n_prompt - 3
    none = gen(http, text=PROMPT, sampling_params=greedy(2), return_logprob=True)  # start -1: output only
    assert (
        none["meta_info"]["input_token_logprobs"] == []
        and len(none["meta_info"]["output_token_logprobs"]) == 2
    )


def test_prefill_only(http: httpx.Client) -> None:
    out = gen(
        http, text=PROMPT, sampling_params={"max_new_tokens": 0}, return_logprob=True, logprob_start_len=0
    )
    assert out["text"] == "" and out["output_ids"] == [] and out["meta_info"]["completion_tokens"] == 0
    assert len(out["meta_info"]["input_token_logprobs"]) == out["meta_info"]["prompt_tokens"]


def test_info_routes(http: httpx.Client, model: str) -> None:
    assert http.get("/health").status_code == 200
    assert http.get("/health_generate").status_code == 200
    info = http.get("/get_model_info").json()
    assert info["served_model_name"] == model and info["is_generation"] and info["context_length"] > 0
    server = server_info(http)
    assert server["port"] and server["version"] and server["max_total_tokens"] == 16384
    stats = server["pool_stats"]
    assert stats["total"] == stats["free"] + stats["cached"] + stats["held"]


def test_flush_cache(http: httpx.Client) -> None:
    gen(http, text="A prompt to cache " * 4, sampling_params=greedy(2))
    assert wait_for(http, lambda s: s["running_requests"] == 0)["cached"] > 0
    assert http.post("/flush_cache").status_code == 200
    stats = wait_for(http, lambda s: s["cached"] == 0)
    assert stats["cached"] == 0 and stats["free"] == stats["total"]


def test_abort_request(server: Server, http: httpx.Client) -> None:
    long = greedy(2000, ignore_eos=True)
    with ThreadPoolExecutor(2) as pool, httpx.Client(base_url=server.url, timeout=60) as other:
        one = pool.submit(gen, other, text=PROMPT, sampling_params=long, rid="abort-me")
        wait_for(http, lambda s: s["running_requests"] == 1)
        assert http.post("/abort_request", json={"rid": "abort-me"}).status_code == 200
        assert one.result(timeout=30)["meta_info"]["finish_reason"]["type"] == "abort"

        many = pool.submit(stream_events, other, text=[PROMPT, "Hello"], sampling_params=long)
        wait_for(http, lambda s: s["running_requests"] == 2)
        assert http.post("/abort_request", json={"abort_all": True}).status_code == 200
        finishes = [
            e["meta_info"]["finish_reason"]
            for e in many.result(timeout=30)
            if e["meta_info"]["finish_reason"]
        ]
        assert [f["type"] for f in finishes] == ["abort", "abort"]
    stats = wait_for(http, lambda s: s["running_requests"] == 0 and s["held"] == 0)
    assert stats["held"] == 0 and stats["free"] + stats["cached"] == stats["total"]
