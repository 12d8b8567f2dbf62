"""Single-stream latency through the whole engine: one request at a time, its TTFT and decode speed.

    python -m radixserve.benchmarks.bench_latency --model-path M --load-format dummy --context-length 8192 \
        --input-len 1024 --output-len 256 --repeats 3 [--tp-size 2 ...]

This is the batch-1 decode number (tokens/s of one stream) that SGLang and the issues quote; unlike
bench_one_batch it runs through the scheduler, the worker processes and, with --tp-size, the all-reduces.
Each repeat sends a fresh random prompt (no prefix-cache hit) and streams its tokens; decode speed is
(tokens - 1) / (last token time - first token time). Every EngineConfig field is a flag.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

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
from radixserve.engine import Engine


@dataclass(frozen=True, slots=True)
class StreamTiming:
    ttft_s: float
    median_itl_ms: float
    p99_itl_ms: float
    decode_tok_s: float


@dataclass(frozen=True, slots=True)
class LatencyResult:
    input_len: int
    output_len: int
    runs: list[StreamTiming]
    median_ttft_ms: float
    median_itl_ms: float
    decode_tok_s: float  # median over the runs


async def one_stream(engine: Engine, prompt: list[int], output_len: int) -> StreamTiming:
    stamps: list[float] = []
    params = {"max_new_tokens": output_len, "ignore_eos": True, "temperature": 0}
    t0 = time.perf_counter()
    async for delta in engine.stream(input_ids=prompt, sampling_params=params):
        stamps.extend([time.perf_counter()] * max(1, len(delta.token_ids)))
    if len(stamps) < 2:
        raise SystemExit(f"got {len(stamps)} tokens; --output-len must be at least 2")
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False) if b > a]
    return StreamTiming(
        ttft_s=stamps[0] - t0,
        median_itl_ms=1e3 * statistics.median(gaps),
        p99_itl_ms=1e3 * float(np.percentile(gaps, 99)),
        decode_tok_s=(len(stamps) - 1) / (stamps[-1] - stamps[0]),
    )


async def benchmark(args: argparse.Namespace) -> LatencyResult:
    rng = np.random.default_rng(args.seed)
    async with Engine(args.model_path, **engine_kwargs(args)) as engine:
        assert engine.ready is not None
        vocab = engine.ready.vocab_size

        def prompt(n: int) -> list[int]:
            return rng.integers(100, min(vocab, 32000), n).tolist()

        await one_stream(engine, prompt(min(args.input_len, 256)), 32)  # warm-up
        profile = None
        if args.cprofile:  # the engine's process (scheduler, ingress, detokenizer) during the measured runs
            import cProfile

            profile = cProfile.Profile()
            profile.enable()
        runs = [await one_stream(engine, prompt(args.input_len), args.output_len)
                for _ in range(args.repeats)]
        if profile is not None:
            profile.disable()
            profile.dump_stats(args.cprofile)
    return LatencyResult(
        input_len=args.input_len,
        output_len=args.output_len,
        runs=runs,
        median_ttft_ms=1e3 * statistics.median(r.ttft_s for r in runs),
        median_itl_ms=statistics.median(r.median_itl_ms for r in runs),
        decode_tok_s=statistics.median(r.decode_tok_s for r in runs),
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="radixserve single-stream latency (in-process Engine)")
    parser.add_argument("--model-path", default=None, help="HF folder or GGUF file (default: SmolLM2)")
    parser.add_argument("--input-len", type=int, default=1024)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cprofile", default=None, help="write the engine process's cProfile stats here")
    add_common_args(parser)
    add_engine_args(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> LatencyResult:
    args = parse_args(argv)
    info = run_info("bench_latency", args)
    result = anyio.run(benchmark, args, backend_options={"use_uvloop": True})
    path = write_result(args.result_dir, info, result)
    print_table(f"Single-stream latency ({info.device}, tp {args.tp_size or 1})", [
        ("Input / output tokens", f"{result.input_len} / {result.output_len}"),
        ("Median TTFT (ms)", result.median_ttft_ms),
        ("Median ITL (ms)", result.median_itl_ms),
        ("Decode (tok/s)", result.decode_tok_s),
    ])
    print(f"result: {path}")
    return result


if __name__ == "__main__":
    main()
