"""Offline throughput: an in-process Engine, every prompt submitted at once (or --max-concurrency at a time).

    python -m radixserve.benchmarks.bench_offline --model-path /tmp/llama-8b --num-prompts 1000 \
        --random-input-len 1024 --random-output-len 256
    python -m radixserve.benchmarks.bench_offline --dataset-name generated-shared-prefix --disable-radix-cache

Reports what SGLang's bench_offline_throughput reports: request throughput, input / output / total tokens
per second and the duration, measured from the first submission to the last completion. Every EngineConfig
field is a flag (--max-total-tokens, --chunked-prefill-size, --disable-overlap-schedule, ...). Prompts are
token ids with fixed output lengths (ignore_eos), so any model works, random weights included.

With `--step-timing` the worker also marks every step (step_timer.py: CUDA events on the GPU, the host clock
on the CPU), and the result adds where the device time of the measured run went (warm-up steps left out),
by kind of step: decode steps (one token per row) that replay a CUDA graph (rows <= the largest captured
size: cuda_graph_max_bs, capped by max_running_requests + 1 and the capture sizes), decode steps run eagerly,
and steps with prompt tokens (mixed / prefill). A step's period is launch[n+1] - launch[n] (the last one's:
end - launch), so the periods add up to the device span of the run; idle after a step is
max(launch[n+1] - end[n], 0). With --tp-size > 1 every rank runs the same steps; with --dp-size > 1 only the
replica with the most steps is reported.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import anyio
import numpy as np

from radixserve.benchmarks import gpu_trace
from radixserve.benchmarks.common import (
    add_common_args,
    add_engine_args,
    engine_kwargs,
    print_grid,
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
from radixserve.benchmarks.gc_pauses import GcPauses
from radixserve.benchmarks.gc_pauses import summarize as gc_pauses_summary
from radixserve.benchmarks.step_timer import (
    BEGIN,
    END,
    HOST_BEGIN,
    HOST_END,
    LAUNCH,
    ROWS,
    STEP,
    TOKENS,
    StepTimingConfig,
    load_steps,
    step_timing_env,
    steps_between,
)
from radixserve.config import EngineConfig
from radixserve.engine import Engine

FLUSH_TIMEOUT = 30.0
WARMUP_INPUT_LEN, WARMUP_OUTPUT_LEN = 256, 16  # SGLang's bench_offline_throughput warm-up
# Buckets of rows per decode step (inclusive; None: no upper end) for --step-timing's histogram.
DECODE_ROW_BUCKETS: tuple[tuple[int, int | None], ...] = (
    (1, 16), (17, 64), (65, 160), (161, 256), (257, 512), (513, None),
)
SLOWEST_STEPS = 3  # --step-timing lists this many of the longest steps


@dataclass(frozen=True, slots=True)
class StepKindStats:
    kind: str  # "decode_graph", "decode_eager" or "mixed" (prompt tokens in the step)
    steps: int
    period_s: float  # sum of the steps' periods
    share: float  # of the run's device span (the sum of every period)
    idle_s: float  # device idle right after these steps: sum of max(launch[n+1] - end[n], 0)
    mean_rows: float  # requests per step
    mean_tokens: float  # tokens through the model per step (prompt tokens + one per decode row)
    tokens_per_s: float  # sum(tokens) / period_s
    # The worker's host time on these steps (prepare, launch, finish: host_end - host_begin). Near period_s,
    # the host is what paces them: the device waits for launches.
    host_s: float = 0.0


@dataclass(frozen=True, slots=True)
class SlowStep:
    step: int
    rows: int
    tokens: int
    period_ms: float
    host_ms: float  # the worker's host time on it: a stall far above the usual (a compile, say) shows here


@dataclass(frozen=True, slots=True)
class RowBucket:
    rows: str  # "1-16", ..., ">512"
    steps: int  # decode steps with that many rows
    period_s: float
    share: float  # of the run's device span


@dataclass(frozen=True, slots=True)
class StepBreakdown:
    clock: str  # "cuda_events" or "host"
    graph_max_rows: int  # decode steps of at most this many rows replay a CUDA graph (0: none)
    steps: int
    span_s: float  # sum of every period: first launch to last end on the device's clock
    idle_s: float
    idle_fraction: float  # idle_s / span_s
    kinds: tuple[StepKindStats, ...]  # decode_graph, decode_eager, mixed
    decode_rows: tuple[RowBucket, ...]  # decode steps by rows (DECODE_ROW_BUCKETS)
    profiler_export_s: float = 0.0  # the gap left out: the worker writing the profiler's trace
    slowest: tuple[SlowStep, ...] = ()  # the longest periods, longest first
    # Host time (perf_counter, all processes) from the first submission to the worker beginning the first
    # measured step, and from the last step's host begin + device period to the last completion: the run's
    # duration outside the device span. NaN where the worker wrote no host base.
    lead_in_s: float = float("nan")
    lead_out_s: float = float("nan")


@dataclass(frozen=True, slots=True)
class MeasuredRun:
    start_ns: int  # time.perf_counter_ns() at the first submission
    end_ns: int  # ... and after the last completion
    graph_max_rows: int


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
    step_breakdown: StepBreakdown | None = None  # --step-timing


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


def graph_max_rows(config: EngineConfig, device: str) -> int:
    """The most rows a decode step may have and replay a CUDA graph (gpu_worker's limit; 0: no graphs)."""
    if not device.startswith("cuda") or config.disable_cuda_graph:
        return 0
    from radixserve.actors.cuda_graph_runner import capture_sizes

    # The worker captures up to min(cuda_graph_max_bs, max_rows); the engine's max_rows has one pad row.
    return capture_sizes(min(config.cuda_graph_max_bs, config.max_running_requests + 1))[-1]


def step_breakdown(
    steps: np.ndarray, graph_max_rows: int, clock: str = "cuda_events", profiler_stop: int | None = None
) -> StepBreakdown:
    """Where the device time of a run of step_timer records (ms, any order) went, by kind of step.

    `profiler_stop`: the step at whose start a profiler window closed (step_timer's profiled_steps[1]); the
    gap before it is the worker writing the trace, which is left out of the idle time and the span."""
    steps = steps[np.isfinite(steps[:, [LAUNCH, END]]).all(axis=1)]
    steps = steps[np.argsort(steps[:, STEP], kind="stable")]
    if not len(steps):
        raise ValueError("no timed steps")
    launch, end, rows, tokens = steps[:, LAUNCH], steps[:, END], steps[:, ROWS], steps[:, TOKENS]
    period = np.append(np.diff(launch), end[-1] - launch[-1]) / 1e3
    idle = np.append(np.maximum(launch[1:] - end[:-1], 0.0), 0.0) / 1e3
    export = 0.0
    if profiler_stop is not None:
        before = np.nonzero(steps[1:, STEP] == profiler_stop)[0]  # the step whose period ends at the gap
        if len(before):
            i = int(before[0])
            export = float(idle[i])
            period[i] -= export
            idle[i] = 0.0
    span = float(period.sum())
    decode = tokens == rows
    host = (steps[:, HOST_END] - steps[:, HOST_BEGIN]) / 1e3

    def share(seconds: float) -> float:
        return seconds / span if span > 0 else 0.0

    def kind(name: str, mask: np.ndarray) -> StepKindStats:
        n, seconds = int(mask.sum()), float(period[mask].sum())
        return StepKindStats(
            kind=name, steps=n, period_s=seconds, share=share(seconds), idle_s=float(idle[mask].sum()),
            mean_rows=float(rows[mask].mean()) if n else 0.0,
            mean_tokens=float(tokens[mask].mean()) if n else 0.0,
            tokens_per_s=float(tokens[mask].sum()) / seconds if seconds > 0 else 0.0,
            host_s=float(np.nansum(host[mask])),
        )

    buckets = []
    for low, high in DECODE_ROW_BUCKETS:
        mask = decode & (rows >= low) & (rows <= (high if high is not None else np.inf))
        seconds = float(period[mask].sum())
        label = f"{low}-{high}" if high is not None else f">{low - 1}"
        buckets.append(RowBucket(rows=label, steps=int(mask.sum()), period_s=seconds, share=share(seconds)))
    return StepBreakdown(
        clock=clock,
        graph_max_rows=graph_max_rows,
        steps=len(steps),
        span_s=span,
        idle_s=float(idle.sum()),
        idle_fraction=share(float(idle.sum())),
        kinds=(
            kind("decode_graph", decode & (rows <= graph_max_rows)),
            kind("decode_eager", decode & (rows > graph_max_rows)),
            kind("mixed", ~decode),
        ),
        decode_rows=tuple(buckets),
        profiler_export_s=export,
        slowest=tuple(
            SlowStep(int(steps[i, STEP]), int(rows[i]), int(tokens[i]), float(period[i] * 1e3),
                     float(host[i] * 1e3))
            for i in np.argsort(-period, kind="stable")[:SLOWEST_STEPS]
        ),
    )


async def benchmark(args: argparse.Namespace) -> tuple[OfflineResult, MeasuredRun]:
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

        start = time.perf_counter_ns()
        results = await run_requests(engine, requests, args.max_concurrency, args.temperature)
        end = time.perf_counter_ns()
        duration = (end - start) / 1e9
        kv_slots = engine.ready.num_slots
        measured = MeasuredRun(start, end, graph_max_rows(engine.config, engine.ready.device))

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
    ), measured


def run_with_step_timing(args: argparse.Namespace) -> tuple[OfflineResult, dict[str, Any]]:
    """The benchmark with every worker step timed; the result with its step breakdown, and the measured
    steps ({"columns", "steps": ndarray})."""
    with tempfile.TemporaryDirectory(prefix="radixserve-steps-") as tmp:
        mixed = not args.profile_decode_steps
        kind = "mixed" if mixed else "decode"
        trace = str(Path(args.result_dir or tmp) / f"trace_{kind}_steps.json")
        window = args.profile_mixed_steps or args.profile_decode_steps
        cfg = StepTimingConfig(out_dir=tmp, profile_steps=window, profile_skip=args.profile_skip_steps,
                               trace_path=trace,
                               profile_mixed=mixed, min_rows=args.profile_min_rows,
                               profile_host=args.profile_host)
        engine_gc = GcPauses().install()
        with step_timing_env(cfg, Path(tmp)):
            result, measured = anyio.run(benchmark, args, backend_options={"use_uvloop": True})
        engine_gc.uninstall()
        dumps = load_steps(tmp)
    if not dumps:
        raise SystemExit("the worker wrote no step timings (did it exit cleanly?)")
    if (args.dp_size or 1) > 1:
        print(f"NOTE: {len(dumps)} workers timed; the step breakdown covers the one with the most steps")
    dump = max(dumps, key=lambda d: len(d["steps"]))  # TP ranks run the same steps
    profiled = args.profile_mixed_steps or args.profile_decode_steps
    if profiled and dump.get("trace") and Path(dump["trace"]).exists():
        what = "steps with prompt tokens" if args.profile_mixed_steps else "decode steps"
        print(f"\nKernels of {profiled} {what} of >= {args.profile_min_rows} rows ({dump['trace']})")
        trace = gpu_trace.load_trace(dump["trace"])
        kernels = gpu_trace.kernel_totals(trace)
        if kernels:
            print_grid(["kernel", "count", "ms"], kernels)
            stats = gpu_trace.analyze(trace, skip_steps=0)
            assert stats is not None
            print(f"window {stats.window_ms:.2f} ms, GPU busy {stats.busy_ms:.2f} ms "
                  f"(idle {100 * stats.idle_fraction:.1f}%); longest gaps (at ms, ms, the op after):")
            print_grid(["at ms", "gap ms", "next op"], gpu_trace.largest_gaps(trace))
        else:
            print("(no device kernels in the trace: a CPU run)")
        if args.profile_host:
            print(f"\nHost-side torch ops of the same {profiled} steps (inclusive host time)")
            print_grid(["op", "count", "ms", "mean us"], gpu_trace.host_op_totals(trace))
    steps = steps_between(dump, measured.start_ns, measured.end_ns)
    stop = (dump.get("profiled_steps") or [None, None])[1] if profiled else None
    breakdown = step_breakdown(steps, measured.graph_max_rows, dump["clock"], profiler_stop=stop)
    if dump.get("host_base_ns") is not None and len(steps):
        base, last = dump["host_base_ns"], steps[-1]
        last_end_ns = base + 1e6 * (last[HOST_BEGIN] + last[END] - last[BEGIN])
        lead_in_ns = base + 1e6 * steps[0, HOST_BEGIN] - measured.start_ns
        lead_out_ns = measured.end_ns - last_end_ns
        breakdown = replace(breakdown, lead_in_s=lead_in_ns / 1e9, lead_out_s=lead_out_ns / 1e9)
    window = (measured.start_ns, measured.end_ns)
    gc_pauses = {"engine": gc_pauses_summary(engine_gc.records, *window),
                 "worker": gc_pauses_summary(dump.get("gc_records", []), *window)}
    report_gc(gc_pauses)
    return replace(result, step_breakdown=breakdown), {"columns": dump["columns"], "steps": steps,
                                                       "gc_pauses": gc_pauses}


def report_gc(gc_pauses: dict[str, Any]) -> None:
    """One line per process: full (gen 2) collections, their total and longest pause."""
    print("\nGarbage-collector pauses in the measured window")
    for proc, pauses in gc_pauses.items():
        g2 = pauses["gen2"]
        print(f"  {proc}: {g2['count']} full collections, {g2['total_ms']:.1f} ms (longest "
              f"{g2['max_ms']:.1f}); {len(pauses['long_pauses'])} pauses >= 5 ms")


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
    if (b := result.step_breakdown) is not None:
        report_steps(b)


def report_steps(b: StepBreakdown) -> None:
    n = b.graph_max_rows
    # Past n rows decode runs eagerly, except shared-prefix steps over an FP8 pool: those replay the cascade
    # family of graphs (cuda_graph_runner.py), which this breakdown cannot tell apart.
    labels = {"decode_graph": f"decode <= {n} rows (graph)" if n else "decode (graph: none)",
              "decode_eager": f"decode > {n} rows (eager/cascade graph)" if n else "decode (eager)",
              "mixed": "mixed / prefill"}
    print(f"\nDevice time by kind of step ({b.clock} clock, {b.steps} steps, span {b.span_s:.3f} s)")
    print_grid(
        ["kind", "steps", "period s", "share %", "idle s", "host s", "mean rows", "mean tokens", "tok/s"],
        [(labels[k.kind], k.steps, k.period_s, 100 * k.share, k.idle_s, k.host_s, k.mean_rows, k.mean_tokens,
          round(k.tokens_per_s)) for k in b.kinds],
    )
    print("(host s: the worker's host time on those steps; near their period, launches pace the device)")
    print("Slowest steps: " + "; ".join(
        f"step {s.step} ({s.rows} rows, {s.tokens} tokens) {s.period_ms:.1f} ms, host {s.host_ms:.1f} ms"
        for s in b.slowest))
    print("\nDecode steps by rows")
    print_grid(["rows", "steps", "period s", "share %"],
               [(r.rows, r.steps, r.period_s, 100 * r.share) for r in b.decode_rows])
    print(f"\nDevice idle between steps: {b.idle_s:.3f} s ({100 * b.idle_fraction:.2f}% of the span)")
    print(f"Outside the span: {b.lead_in_s:.3f} s from the first submission to the first step, "
          f"{b.lead_out_s:.3f} s from the last step's end to the last completion")
    if b.profiler_export_s:
        print(f"(left out: {b.profiler_export_s:.3f} s of the worker writing the profiler's trace)")
    if not b.graph_max_rows:
        print("(no CUDA graphs in this run: every decode step ran eagerly)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="radixserve offline throughput (in-process Engine)")
    parser.add_argument("--model-path", default=None, help="HF folder or GGUF file (default: SmolLM2)")
    parser.add_argument("--max-concurrency", type=int, default=None, help="requests in flight at most")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--warmup-prompts", type=int, default=16, help="warm-up requests (256 in, 16 out)")
    parser.add_argument("--step-timing", action="store_true",
                        help="time every worker step; add the device time by kind of step to the result")
    parser.add_argument("--profile-mixed-steps", type=int, default=0,
                        help="with --step-timing: a torch.profiler trace of this many steps with prompt "
                             "tokens (after --profile-skip-steps of them), and their kernels by total time")
    parser.add_argument("--profile-decode-steps", type=int, default=0,
                        help="the same for decode steps (one token per row)")
    parser.add_argument("--profile-skip-steps", type=int, default=5,
                        help="matching steps run before the profiler window opens")
    parser.add_argument("--profile-min-rows", type=int, default=1,
                        help="profiled steps have at least this many rows")
    parser.add_argument("--profile-host", action="store_true",
                        help="the profiler window also records host-side torch ops, and lists them by host "
                             "time (where a host-paced step's launch time goes)")
    add_common_args(parser)
    add_dataset_args(parser)
    add_engine_args(parser)
    args = parser.parse_args(argv)
    if args.profile_mixed_steps and args.profile_decode_steps:
        parser.error("--profile-mixed-steps and --profile-decode-steps: one profiler window per run")
    if (args.profile_mixed_steps or args.profile_decode_steps) and not args.step_timing:
        parser.error("the profiler window needs --step-timing")
    if args.profile_host and not (args.profile_mixed_steps or args.profile_decode_steps):
        parser.error("--profile-host needs --profile-decode-steps or --profile-mixed-steps")
    return args


def main(argv: list[str] | None = None) -> OfflineResult:
    args = parse_args(argv)
    info = run_info("bench_offline", args)
    body: Any
    if args.step_timing:
        result, timed = run_with_step_timing(args)
        body = {**asdict(result), "step_columns": timed["columns"], "steps": timed["steps"].tolist(),
                "gc_pauses": timed["gc_pauses"]}
    else:
        result, _ = anyio.run(benchmark, args, backend_options={"use_uvloop": True})
        body = result
    path = write_result(args.result_dir, info, body)
    report(result, info.device)
    print(f"result: {path}")
    return result


if __name__ == "__main__":
    main()
