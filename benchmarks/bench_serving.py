"""Online serving benchmark against a running server, with SGLang bench_serving's flags and metrics.

    python -m radixserve.launch_server --model-path /tmp/llama-8b --port 30000 &
    python -m radixserve.benchmarks.bench_serving --port 30000 --dataset-name random \
        --num-prompts 1000 --random-input-len 1024 --random-output-len 256 --request-rate 8
    python -m radixserve.benchmarks.bench_serving --backend openai --max-concurrency 64 ...

Requests are token-id prompts with fixed output lengths (ignore_eos), streamed. `--request-rate` draws
Poisson arrivals (exponential gaps; inf sends everything at once); `--max-concurrency` caps the requests in
flight (a request that arrives while the cap is reached waits, as in SGLang). One warm-up request runs first.
Metrics: serving_metrics.py.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from typing import Any

import anyio
import httpx
import numpy as np

from radixserve.benchmarks.common import add_common_args, print_table, run_info, write_result
from radixserve.benchmarks.datasets import BenchRequest, add_dataset_args, build_dataset, summary
from radixserve.benchmarks.serving_client import BACKENDS
from radixserve.benchmarks.serving_metrics import RequestOutcome, ServingMetrics, calculate_metrics


@dataclass(frozen=True, slots=True)
class ServingResult:
    backend: str
    request_rate: float
    max_concurrency: int | None
    model: str
    metrics: ServingMetrics
    dataset: dict[str, float]
    first_error: str


async def server_info(client: httpx.AsyncClient, base_url: str) -> tuple[str, int]:
    """(served model name, vocabulary size) from SGLang's /get_model_info."""
    response = await client.get(base_url + "/get_model_info")
    response.raise_for_status()
    info = response.json()
    return str(info.get("served_model_name") or info.get("model_path") or "default"), int(info["vocab_size"])


def arrival_gaps(n: int, request_rate: float, rng: np.random.Generator) -> np.ndarray:
    """Seconds to wait after sending request i: Poisson arrivals, or none at an infinite rate."""
    if request_rate == float("inf"):
        return np.zeros(n)
    return rng.exponential(1.0 / request_rate, size=n)


async def run_requests(
    client: httpx.AsyncClient,
    base_url: str,
    requests: list[BenchRequest],
    opts: dict[str, Any],
    request_rate: float,
    max_concurrency: int | None,
    rng: np.random.Generator,
) -> list[RequestOutcome]:
    send = BACKENDS[opts["backend"]]
    outcomes: list[RequestOutcome] = [RequestOutcome(prompt_len=r.prompt_len) for r in requests]
    limit = anyio.Semaphore(max_concurrency) if max_concurrency else None

    async def one(i: int) -> None:
        if limit is None:
            outcomes[i] = await send(client, base_url, requests[i], opts)
            return
        async with limit:
            outcomes[i] = await send(client, base_url, requests[i], opts)

    async with anyio.create_task_group() as tg:
        for i, gap in enumerate(arrival_gaps(len(requests), request_rate, rng)):
            tg.start_soon(one, i)
            if gap:
                await anyio.sleep(gap)
    return outcomes


async def benchmark(args: argparse.Namespace) -> ServingResult:
    base_url = args.base_url or f"http://{args.host}:{args.port}"
    # NOTE: httpx allows 100 connections by default, which would cap the concurrency silently.
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=httpx.Timeout(None), limits=limits) as client:
        model, vocab = await server_info(client, base_url)
        requests = build_dataset(args, vocab)
        opts = {
            "backend": args.backend,
            "model": args.model or model,
            "disable_stream": args.disable_stream,
            "disable_ignore_eos": args.disable_ignore_eos,
            "extra_request_body": json.loads(args.extra_request_body) if args.extra_request_body else {},
        }
        if args.warmup_requests:
            warm = BenchRequest(requests[0].input_ids, min(requests[0].output_len, 32))
            warm_all = [warm] * args.warmup_requests
            no_rng = np.random.default_rng(0)  # unused at an infinite rate
            done = await run_requests(client, base_url, warm_all, opts, float("inf"), None, no_rng)
            if not any(o.success for o in done):
                raise SystemExit(f"warm-up failed: {done[0].error}")
        if args.flush_cache:
            (await client.post(base_url + "/flush_cache")).raise_for_status()
        await anyio.sleep(1.0)  # as SGLang: let the server settle after the warm-up

        rng = np.random.default_rng(args.seed)
        start = time.perf_counter()
        outcomes = await run_requests(
            client, base_url, requests, opts, args.request_rate, args.max_concurrency, rng
        )
        duration = time.perf_counter() - start
    errors = [o.error for o in outcomes if not o.success]
    return ServingResult(
        backend=args.backend,
        request_rate=args.request_rate,
        max_concurrency=args.max_concurrency,
        model=opts["model"],
        metrics=calculate_metrics(outcomes, duration),
        dataset=summary(requests),
        first_error=errors[0] if errors else "",
    )


def report(result: ServingResult, device: str) -> None:
    m = result.metrics
    print_table(f"Serving Benchmark Result ({device})", [
        ("Backend", result.backend),
        ("Traffic request rate", result.request_rate),
        ("Max request concurrency", result.max_concurrency or "not set"),
        ("Successful requests", m.completed),
        ("Failed requests", m.failed),
        ("Benchmark duration (s)", m.duration_s),
        ("Total input tokens", m.total_input),
        ("Total generated tokens", m.total_output),
        ("Request throughput (req/s)", m.request_throughput),
        ("Input token throughput (tok/s)", m.input_throughput),
        ("Output token throughput (tok/s)", m.output_throughput),
        ("Total token throughput (tok/s)", m.total_throughput),
        ("Concurrency", m.concurrency),
        ("Mean E2E Latency (ms)", m.mean_e2e_latency_ms),
        ("Median E2E Latency (ms)", m.median_e2e_latency_ms),
        ("P99 E2E Latency (ms)", m.p99_e2e_latency_ms),
        ("Mean TTFT (ms)", m.mean_ttft_ms),
        ("Median TTFT (ms)", m.median_ttft_ms),
        ("P99 TTFT (ms)", m.p99_ttft_ms),
        ("Mean TPOT (ms, excl. 1st token)", m.mean_tpot_ms),
        ("Median TPOT (ms)", m.median_tpot_ms),
        ("P99 TPOT (ms)", m.p99_tpot_ms),
        ("Mean ITL (ms)", m.mean_itl_ms),
        ("Median ITL (ms)", m.median_itl_ms),
        ("P95 ITL (ms)", m.p95_itl_ms),
        ("P99 ITL (ms)", m.p99_itl_ms),
        ("Max ITL (ms)", m.max_itl_ms),
    ])
    if result.first_error:
        print(f"first error:\n{result.first_error}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="radixserve online serving benchmark (SGLang's metrics)")
    parser.add_argument("--backend", default="sglang", choices=sorted(BACKENDS),
                        help="sglang: native /generate with input_ids; openai: /v1/completions")
    parser.add_argument("--base-url", default=None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=30000)
    parser.add_argument("--model", default=None, help="the model name sent to /v1/completions")
    parser.add_argument("--request-rate", type=float, default=float("inf"), help="req/s; inf: all at once")
    parser.add_argument("--max-concurrency", type=int, default=None)
    parser.add_argument("--warmup-requests", type=int, default=1)
    parser.add_argument("--flush-cache", action="store_true", help="POST /flush_cache before the run")
    parser.add_argument("--disable-stream", action="store_true")
    parser.add_argument("--disable-ignore-eos", action="store_true")
    parser.add_argument("--extra-request-body", default=None, help="JSON merged into every request body")
    parser.add_argument("--device-name", default=None, help="the server's card, for the record (default: "
                        "this machine's first CUDA card, or cpu)")
    add_common_args(parser)
    add_dataset_args(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> ServingResult:
    args = parse_args(argv)
    info = run_info("bench_serving", args, device=args.device_name)
    result = anyio.run(benchmark, args)
    path = write_result(args.result_dir, info, result)
    report(result, info.device)
    print(f"result: {path}")
    return result


if __name__ == "__main__":
    main()
