"""GPU idle time between decode steps, measured inside the worker of a full engine (scheduler + worker).

    python -m radixserve.benchmarks.profile_decode --model-path /tmp/llama-8b --batch-size 64 \
        --input-len 1024 --output-len 256 --torch-profile-steps 32

`--batch-size` requests of `--input-len` random tokens each generate `--output-len` tokens (ignore_eos); once
every prompt is prefilled the engine should run decode steps of exactly `--batch-size` rows, and those steps
(after `--skip-steps` of them) are measured. If the scheduler never puts all requests in one step, every
steady decode step is measured instead, and the rows per step say how the batch was split. The worker
records CUDA events per step (step_timer.py):

    between-step idle = launch[n+1] - end[n]     the GPU finished step n and step n+1's inputs were not there
    step period       = launch[n+1] - launch[n]
    idle fraction     = sum(idle) / sum(period)  the issue's target: < 3% at batch 64

With `--torch-profile-steps N` the worker also writes a Kineto trace of N such steps (CUDA activity only), and
gpu_trace.py reports the idle time it shows: the fraction of the window with no kernel or copy on the GPU
(every gap, inside steps too: an upper bound) and the gaps that follow each step's final device->host copy.
The trace opens in chrome://tracing or Perfetto.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import anyio
import numpy as np

from radixserve.benchmarks import gpu_trace
from radixserve.benchmarks.bench_offline import run_requests
from radixserve.benchmarks.common import (
    add_engine_args,
    engine_kwargs,
    print_grid,
    print_table,
    run_info,
    write_result,
)
from radixserve.benchmarks.datasets import BenchRequest, random_ids
from radixserve.benchmarks.step_timer import (
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
)
from radixserve.engine import Engine


@dataclass(frozen=True, slots=True)
class DecodeGapStats:
    clock: str  # "cuda_events" or "host"
    batch_size: int  # requests in flight
    full_batch: bool  # the measured steps carried all of them (else: every steady decode step)
    mean_rows: float  # rows per measured step
    steps: int  # consecutive steady decode steps measured
    median_step_ms: float
    p99_step_ms: float
    decode_tokens_per_s: float  # sum(rows) / sum(period)
    median_idle_ms: float
    p99_idle_ms: float
    idle_fraction: float  # sum(idle) / sum(period)
    median_host_step_ms: float  # host time inside ModelRunner.step
    median_host_between_ms: float  # host time from step() returning to the next step()


@dataclass(frozen=True, slots=True)
class ProfileDecodeResult:
    engine_seconds: float
    gaps: DecodeGapStats
    trace: gpu_trace.TraceStats | None
    trace_path: str | None
    # The traced steps' kernels by total device time: (name, launches, ms); empty without a trace.
    kernels: list[tuple[str, int, float]]
    max_idle_fraction: float
    passed: bool


def steady_decode_steps(
    steps: np.ndarray, batch_size: int, skip: int, profiled: tuple[int, int] | None = None
) -> tuple[np.ndarray, bool]:
    """The steady state: pure decode steps (one token per row) after the last step with a prompt chunk,
    less the first `skip`, less `profiled[0]..profiled[1]` (the profiler's start, trace and export). Only the
    steps that carry all `batch_size` requests when there are some (then True)."""
    decode = steps[:, TOKENS] == steps[:, ROWS]
    last_prefill = steps[~decode, STEP].max() if (~decode).any() else -1
    steady = steps[decode & (steps[:, STEP] > last_prefill)][skip:]
    if profiled:
        steady = steady[(steady[:, STEP] < profiled[0]) | (steady[:, STEP] > profiled[1])]
    full = steady[steady[:, ROWS] == batch_size]
    return (full, True) if len(full) >= 3 else (steady, False)


def decode_gaps(
    steps: np.ndarray, clock: str, batch_size: int, skip: int, profiled: tuple[int, int] | None = None
) -> DecodeGapStats:
    """Idle and period over consecutive pairs of steady decode steps (see steady_decode_steps)."""
    steady, full = steady_decode_steps(steps, batch_size, skip, profiled)
    consecutive = np.diff(steady[:, STEP]) == 1
    a, b = steady[:-1][consecutive], steady[1:][consecutive]
    if len(a) < 2:
        raise SystemExit(f"only {len(a)} pairs of consecutive steady decode steps after skipping {skip}: "
                         "raise --output-len or lower --skip-steps")
    period = b[:, LAUNCH] - a[:, LAUNCH]
    idle = np.maximum(b[:, LAUNCH] - a[:, END], 0.0)
    return DecodeGapStats(
        clock=clock,
        batch_size=batch_size,
        full_batch=full,
        mean_rows=float(b[:, ROWS].mean()),
        steps=len(period),
        median_step_ms=float(np.median(period)),
        p99_step_ms=float(np.percentile(period, 99)),
        decode_tokens_per_s=float(b[:, ROWS].sum() / period.sum() * 1e3),
        median_idle_ms=float(np.median(idle)),
        p99_idle_ms=float(np.percentile(idle, 99)),
        idle_fraction=float(idle.sum() / period.sum()),
        median_host_step_ms=float(np.median(steady[:, HOST_END] - steady[:, HOST_BEGIN])),
        median_host_between_ms=float(np.median(b[:, HOST_BEGIN] - a[:, HOST_END])),
    )


async def run_engine(args: argparse.Namespace) -> float:
    kwargs = engine_kwargs(args)
    kwargs.setdefault("max_running_requests", max(args.batch_size, 1))
    async with Engine(args.model_path, **kwargs) as engine:
        assert engine.ready is not None
        rng = np.random.default_rng(args.seed)
        requests = [
            BenchRequest(random_ids(rng, args.input_len, engine.ready.vocab_size), args.output_len)
            for _ in range(args.batch_size)
        ]
        start = time.perf_counter()
        await run_requests(engine, requests, None, 0.0, {"ebnf": args.ebnf} if args.ebnf else None)
        return time.perf_counter() - start


def run_with_step_timing(args: argparse.Namespace, cfg: StepTimingConfig, shim_dir: Path) -> float:
    """Run the engine with the step timer installed in its worker processes (environment set for them)."""
    with step_timing_env(cfg, shim_dir):
        return anyio.run(run_engine, args, backend_options={"use_uvloop": True})


def report(result: ProfileDecodeResult, device: str) -> None:
    g = result.gaps
    rows: list[tuple[str, Any]] = [
        ("Clock", g.clock),
        ("Requests in flight", g.batch_size),
        ("Rows per measured decode step", g.mean_rows),
        ("Decode steps measured", g.steps),
        ("Median step period (ms)", g.median_step_ms),
        ("P99 step period (ms)", g.p99_step_ms),
        ("Decode throughput (tok/s)", g.decode_tokens_per_s),
        ("Median GPU idle between steps (ms)", g.median_idle_ms),
        ("P99 GPU idle between steps (ms)", g.p99_idle_ms),
        ("GPU idle between steps (% of period)", 100 * g.idle_fraction),
        ("Median host time in step() (ms)", g.median_host_step_ms),
        ("Median host time between steps (ms)", g.median_host_between_ms),
    ]
    if (t := result.trace) is not None:
        rows += [
            ("Trace: steps", t.steps),
            ("Trace: median step (ms)", t.median_step_ms),
            ("Trace: idle after DtoH (% of period)", 100 * t.between_step_idle_fraction),
            ("Trace: all GPU idle (% of window)", 100 * t.idle_fraction),
        ]
    verdict = "PASS" if result.passed else "FAIL"
    rows.append((f"Idle < {100 * result.max_idle_fraction:.1f}% of step", verdict))
    print_table(f"Decode GPU idle ({device})", rows)
    if result.kernels:
        print("\nKernels of the traced steps")
        print_grid(["kernel", "count", "ms"], result.kernels)
    if not g.full_batch:
        print(f"WARNING: no steady decode step carried all {g.batch_size} requests (mean {g.mean_rows:.1f} "
              "rows): the scheduler split the batch; the numbers above cover every steady decode step")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="GPU idle time between decode steps (full engine)")
    parser.add_argument("--model-path", default=None)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=1024)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--skip-steps", type=int, default=16, help="steady decode steps left out first")
    parser.add_argument("--torch-profile-steps", type=int, default=0, help="decode steps in a Kineto trace")
    parser.add_argument("--ebnf", default=None,
                        help='constrain every request by this grammar (e.g. "root ::= [a-z ]*")')
    parser.add_argument("--max-idle-fraction", type=float, default=0.03, help="the pass mark")
    parser.add_argument("--result-dir", default=os.environ.get("OUT") or "bench_results")
    parser.add_argument("--seed", type=int, default=1)
    add_engine_args(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> ProfileDecodeResult:
    args = parse_args(argv)
    info = run_info("profile_decode", args)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    trace_path = str(Path(args.result_dir).resolve() / f"profile_decode-trace-{stamp}.json")
    with tempfile.TemporaryDirectory(prefix="radixserve-steps-") as tmp:
        cfg = StepTimingConfig(
            out_dir=tmp, min_rows=max(args.batch_size // 2, 1), profile_skip=args.skip_steps,
            profile_steps=args.torch_profile_steps, trace_path=trace_path,
        )
        seconds = run_with_step_timing(args, cfg, Path(tmp))
        dumps = load_steps(tmp)
    if not dumps:
        raise SystemExit("the worker wrote no step timings (did it exit cleanly?)")
    dump = max(dumps, key=lambda d: len(d["steps"]))  # rank 0 of a TP group has the same steps as the rest
    profiled = dump.get("profiled_steps") or None
    gaps = decode_gaps(dump["steps"], dump["clock"], args.batch_size, args.skip_steps, profiled)
    trace, kernels = None, []
    if args.torch_profile_steps and Path(trace_path).is_file():
        events = gpu_trace.load_trace(trace_path)
        trace, kernels = gpu_trace.analyze(events), gpu_trace.kernel_totals(events, top=25)
    result = ProfileDecodeResult(
        engine_seconds=seconds,
        gaps=gaps,
        trace=trace,
        trace_path=trace_path if Path(trace_path).is_file() else None,
        kernels=kernels,
        max_idle_fraction=args.max_idle_fraction,
        passed=gaps.idle_fraction < args.max_idle_fraction,
    )
    path = write_result(args.result_dir, info, {**asdict(result), "steps": dump["steps"].tolist(),
                                                "step_columns": dump["columns"]})
    report(result, info.device)
    print(f"result: {path}")
    return result


if __name__ == "__main__":
    main()
