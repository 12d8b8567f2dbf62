"""Offline throughput: an in-process Engine, every prompt submitted at once (or --max-concurrency at a time).

    python -m radixserve.benchmarks.bench_offline --model-path /tmp/llama-8b --num-prompts 1000 \
        --random-input-len 1024 --random-output-len 256
    python -m radixserve.benchmarks.bench_offline --dataset-name generated-shared-prefix --disable-radix-cache

Reports what SGLang's bench_offline_throughput reports: request throughput, input / output / total tokens
per second and the duration, measured from the first submission to the last completion. Every EngineConfig
field is a flag (--max-total-tokens, --chunked-prefill-size, --disable-overlap-schedule, ...). Prompts are
token ids with fixed output lengths (ignore_eos), so any model works, random weights included.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from typing import Any

import anyio
import numpy as np

from radixserve.benchmarks.common import (
    add_common_args,
    add_engine_args,
    engine_kwargs,
    print_table,
    run_info,
    write_result,
)
from radixserve.benchmarks.datasets import (
    BenchRequest,
    add_dataset_args,
    build_dataset,
    random_requests,
    summary,
)
from radixserve.engine import Engine

FLUSH_TIMEOUT = 30.0
WARMUP_INPUT_LEN, WARMUP_OUTPUT_LEN = 256, 16  # SGLang's bench_offline_throughput warm-up


@dataclass(frozen=True, slots=True)
class OfflineResult:
    successful_requests: int
    duration_s: float
    total_input_tokens: int
    total_output_tokens: int
    cached_tokens: int  # prompt tokens served from the radix cache
    request_throughput: float  # requests / s
    input_throughput: float  # input tokens / s
    output_throughput: float  # output tokens / s
    total_throughput: float  # (input + output) tokens / s
    max_concurrency: int | None
    kv_slots: int
    dataset: dict[str, float]


def sampling_params(req: BenchRequest, temperature: float) -> dict[str, Any]:
    return {"max_new_tokens": req.output_len, "ignore_eos": True, "temperature": temperature}


async def run_requests(
    engine: Engine,
    requests: list[BenchRequest],
    max_concurrency: int | None,
    temperature: float,
    extra_params: dict[str, Any] | None = None,
) -> list[tuple[int, int]]:
    """Run every request (sampling params plus `extra_params`); (output tokens, cached prompt tokens) of each,
    in order."""
    results: list[tuple[int, int]] = [(0, 0)] * len(requests)
    limit = anyio.Semaphore(max_concurrency) if max_concurrency else None

    async def one(i: int, req: BenchRequest) -> None:
        if limit is not None:
            await limit.acquire()
        try:
            params = {**sampling_params(req, temperature), **(extra_params or {})}
            out = await engine.generate(input_ids=req.input_ids, sampling_params=params)
            results[i] = (len(out.token_ids), out.usage.cached_tokens)
        finally:
            if limit is not None:
                limit.release()

    async with anyio.create_task_group() as tg:
        for i, req in enumerate(requests):
            tg.start_soon(one, i, req)
    return results


async def flush_cache(engine: Engine) -> None:
    """Drop the prefix cache, so that warm-up prompts cannot serve the measured ones."""
    await engine.wait_idle(FLUSH_TIMEOUT)
    await engine.flush_cache()
    # NOTE: the engine flushes on its next idle turn and signals nothing; poll its pool.
    with anyio.fail_after(FLUSH_TIMEOUT):
        while engine.pool_stats()["cached"]:  # noqa: ASYNC110
            await anyio.sleep(0.01)


def check_fits(requests: list[BenchRequest], context_length: int) -> None:
    too_long = [r for r in requests if r.prompt_len + r.output_len > context_length]
    if too_long:
        worst = max(r.prompt_len + r.output_len for r in too_long)
        raise SystemExit(f"{len(too_long)} requests exceed the context length {context_length} "
                         f"(longest prompt + output: {worst}); shorten them or raise --context-length")


async def benchmark(args: argparse.Namespace) -> OfflineResult:
    async with Engine(args.model_path, **engine_kwargs(args)) as engine:
        assert engine.ready is not None
        vocab = engine.ready.vocab_size
        requests = build_dataset(args, vocab)
        check_fits(requests, engine.context_length)
        if args.warmup_prompts:
            rng = np.random.default_rng(args.seed + 1)
            input_len = min(WARMUP_INPUT_LEN, engine.context_length // 2)
            warm = random_requests(args.warmup_prompts, input_len, WARMUP_OUTPUT_LEN, 1.0, vocab, rng)
            await run_requests(engine, warm, None, args.temperature)
        await flush_cache(engine)

        start = time.perf_counter()
        results = await run_requests(engine, requests, args.max_concurrency, args.temperature)
        duration = time.perf_counter() - start
        kv_slots = engine.ready.num_slots

    total_in = sum(r.prompt_len for r in requests)
    total_out = sum(n for n, _ in results)
    expected = sum(r.output_len for r in requests)
    if total_out != expected:
        print(f"WARNING: {total_out} output tokens, expected {expected} (ignore_eos gives exact lengths)")
    return OfflineResult(
        successful_requests=len(results),
        duration_s=duration,
        total_input_tokens=total_in,
        total_output_tokens=total_out,
        cached_tokens=sum(c for _, c in results),
        request_throughput=len(results) / duration,
        input_throughput=total_in / duration,
        output_throughput=total_out / duration,
        total_throughput=(total_in + total_out) / duration,
        max_concurrency=args.max_concurrency,
        kv_slots=kv_slots,
        dataset=summary(requests),
    )


def report(result: OfflineResult, device: str) -> None:
    print_table(f"Offline Throughput ({device})", [
        ("Successful requests", result.successful_requests),
        ("Benchmark duration (s)", result.duration_s),
        ("Total input tokens", result.total_input_tokens),
        ("Total generated tokens", result.total_output_tokens),
        ("Cached prompt tokens", result.cached_tokens),
        ("Request throughput (req/s)", result.request_throughput),
        ("Input token throughput (tok/s)", result.input_throughput),
        ("Output token throughput (tok/s)", result.output_throughput),
        ("Total token throughput (tok/s)", result.total_throughput),
    ])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="radixserve offline throughput (in-process Engine)")
    parser.add_argument("--model-path", default=None, help="HF folder or GGUF file (default: SmolLM2)")
    parser.add_argument("--max-concurrency", type=int, default=None, help="requests in flight at most")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--warmup-prompts", type=int, default=16, help="warm-up requests (256 in, 16 out)")
    add_common_args(parser)
    add_dataset_args(parser)
    add_engine_args(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> OfflineResult:
    args = parse_args(argv)
    info = run_info("bench_offline", args)
    result = anyio.run(benchmark, args, backend_options={"use_uvloop": True})
    path = write_result(args.result_dir, info, result)
    report(result, info.device)
    print(f"result: {path}")
    return result


if __name__ == "__main__":
    main()
