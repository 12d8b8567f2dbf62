"""Latency of one static batch through the model runner alone: no scheduler, no worker process, no sockets.

    python -m radixserve.benchmarks.bench_one_batch --model-path /tmp/llama-8b \
        --batch-size 1 8 32 64 --input-len 1024 --output-len 32

For each batch size: one prefill step of `batch_size` prompts of `input_len` random tokens (SGLang's
bench_one_batch does the same; `--max-prefill-tokens` splits it as the engine's step budget would), then
`output_len - 1` decode steps in which every row feeds back the token it sampled, on the device, as the
engine's overlap pipeline does. Each step is timed from handing the plan to
ModelRunner.step until its sampled tokens are on the host. Reports SGLang's numbers: prefill latency and
throughput, median decode latency and throughput, total latency and throughput.

The runner is built by the worker's own `build_runner` (model, KV pool, attention backend, CUDA graphs), and
StepPlans are written here directly: rows 0..B-1, each request's KV slots contiguous after padding slot 0.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from radixserve.actors.gpu_worker import build_runner
from radixserve.actors.messages import InitWorker, NewRequest, StepPlan
from radixserve.benchmarks.common import add_common_args, print_grid, run_info, write_result
from radixserve.sampling_params import SamplingParams

GREEDY = SamplingParams(max_new_tokens=None, temperature=0.0, ignore_eos=True)


@dataclass(frozen=True, slots=True)
class BatchResult:
    batch_size: int
    input_len: int
    output_len: int
    prefill_latency_s: float
    prefill_throughput: float  # prompt tokens / s
    median_decode_latency_s: float
    decode_throughput: float  # output tokens / s at the median step
    total_latency_s: float
    total_throughput: float  # (input + output) tokens / s, SGLang's definition
    decode_latencies_s: list[float]


def _i32(values: Any) -> bytes:
    return np.asarray(values, dtype="<i4").tobytes()


class PlanWriter:
    """StepPlans for one static batch. Request b owns KV slots 1 + b*L ... (b+1)*L, L = input + output."""

    def __init__(self, batch_size: int, input_len: int, output_len: int, first_step: int) -> None:
        self.B, self.input_len, self.L = batch_size, input_len, input_len + output_len
        self.rows = np.arange(batch_size)
        self.base = 1 + self.rows * self.L  # first slot of each request
        self.next_step = first_step

    def _step(self) -> int:
        self.next_step += 1
        return self.next_step - 1

    def prefill(self, prompts: np.ndarray, released: list[int], max_tokens: int | None) -> list[StepPlan]:
        """The prompts ([B, input_len]) in steps of at most `max_tokens` tokens (None: one step, as SGLang):
        whole prompts while they fit, else each prompt in chunks; a row samples at its prompt's end."""
        n = self.input_len
        limit = max_tokens or self.B * n
        if n <= limit:
            per_step = limit // n
            groups = [self.rows[i : i + per_step] for i in range(0, self.B, per_step)]
            pieces = [[(int(r), 0, n) for r in group] for group in groups]
        else:
            starts = range(0, n, limit)
            pieces = [[(int(r), start, min(limit, n - start))] for r in self.rows for start in starts]
        plans = []
        for i, piece in enumerate(pieces):  # piece: (row, first position, tokens) per row of the step
            rows = [r for r, _, _ in piece]
            ends = [s + k for _, s, k in piece]
            new = [NewRequest(req_row=r, params=GREEDY, prefix_slots=b"") for r, s, _ in piece if s == 0]
            plans.append(StepPlan(
                step=self._step(),
                req_rows=_i32(rows),
                seq_lens=_i32(ends),
                extend_lens=_i32([k for _, _, k in piece]),
                prev_rows=_i32([-1] * len(rows)),
                sample_mask=np.array([end == n for end in ends], dtype=np.uint8).tobytes(),
                output_lens=_i32([0] * len(rows)),
                input_ids=_i32(np.concatenate([prompts[r, s : s + k] for r, s, k in piece])),
                out_slots=_i32(np.concatenate([self.base[r] + np.arange(s, s + k) for r, s, k in piece])),
                new_requests=new,
                released_rows=released if i == 0 else [],
            ))
        return plans

    def decode(self, i: int, first_tokens: np.ndarray | None = None) -> StepPlan:
        """Decode step i (0-based). Step 0 takes the prefill's tokens from the host (they may come from
        several steps); later steps take row b's input from what row b sampled in the step before, on the
        device, as the engine's overlap pipeline does."""
        B = self.B
        from_host = first_tokens is not None
        return StepPlan(
            step=self._step(),
            req_rows=_i32(self.rows),
            seq_lens=_i32([self.input_len + i + 1] * B),
            extend_lens=_i32([1] * B),
            prev_rows=_i32([-1] * B if from_host else self.rows),
            sample_mask=np.ones(B, dtype=np.uint8).tobytes(),
            output_lens=_i32([i + 1] * B),
            input_ids=_i32(first_tokens if first_tokens is not None else [0] * B),
            out_slots=_i32(self.base + self.input_len + i),
        )


def timed_step(runner: Any, plan: StepPlan) -> tuple[float, np.ndarray]:
    """(seconds from handing over the plan until its tokens are on the host, the tokens of its rows)."""
    start = time.perf_counter()
    result = runner.step(plan).result()
    seconds = time.perf_counter() - start
    return seconds, np.frombuffer(result.tokens, dtype="<i4")


def generate(
    runner: Any, plans: PlanWriter, prompts: np.ndarray, output_len: int, released: list[int],
    max_prefill_tokens: int | None = None,
) -> tuple[float, list[float], np.ndarray]:
    """Run the batch: (prefill seconds, seconds of each decode step, the output tokens [B, output_len])."""
    B = len(prompts)
    out = np.zeros((B, output_len), dtype=np.int64)
    prefill = 0.0
    for plan in plans.prefill(prompts, released, max_prefill_tokens):
        seconds, tokens = timed_step(runner, plan)
        prefill += seconds
        rows, sampled = np.frombuffer(plan.req_rows, dtype="<i4"), np.frombuffer(plan.sample_mask, dtype="u1")
        out[rows[sampled == 1], 0] = tokens[sampled == 1]
    decodes = []
    for i in range(output_len - 1):
        seconds, tokens = timed_step(runner, plans.decode(i, out[:, 0] if i == 0 else None))
        decodes.append(seconds)
        out[:, i + 1] = tokens
    return prefill, decodes, out


def run_batch(
    runner: Any, batch_size: int, input_len: int, output_len: int, vocab_size: int, rng: np.random.Generator,
    first_step: int, released: list[int], max_prefill_tokens: int | None = None,
) -> tuple[BatchResult, int]:
    plans = PlanWriter(batch_size, input_len, output_len, first_step)
    prompts = rng.integers(0, vocab_size, size=(batch_size, input_len))
    prefill, decodes, _ = generate(runner, plans, prompts, output_len, released, max_prefill_tokens)
    median = float(np.median(decodes)) if decodes else float("nan")
    total = prefill + sum(decodes)
    result = BatchResult(
        batch_size=batch_size,
        input_len=input_len,
        output_len=output_len,
        prefill_latency_s=prefill,
        prefill_throughput=batch_size * input_len / prefill,
        median_decode_latency_s=median,
        decode_throughput=batch_size / median if decodes else float("nan"),
        total_latency_s=total,
        total_throughput=batch_size * (input_len + output_len) / total,
        decode_latencies_s=decodes,
    )
    return result, plans.next_step


def make_init(args: argparse.Namespace) -> InitWorker:
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
    max_bs = max(args.batch_size)
    fields: dict[str, Any] = dict(
        rank=0, tp_size=1, model_path=args.model_path, dtype=dtype, device=device,
        context_length=args.input_len + args.output_len, max_rows=max_bs + 1,
        max_total_tokens=max_bs * (args.input_len + args.output_len), mem_fraction_static=0.85,
        cpu_kv_gib=2.0, attention_backend=args.attention_backend, random_seed=args.random_seed,
        disable_cuda_graph=args.disable_cuda_graph, cuda_graph_max_bs=max_bs, load_format=args.load_format,
    )
    # InitWorker grows with the worker; pass only the fields this version has.
    return InitWorker(**{k: v for k, v in fields.items() if k in InitWorker.__struct_fields__})


def benchmark(args: argparse.Namespace) -> list[BatchResult]:
    init = make_init(args)
    runner, ready = build_runner(init)
    rng = np.random.default_rng(args.seed)
    step, released = 0, list[int]()
    if not args.skip_warmup:  # first-use costs: allocator, cuBLAS heuristics, kernel compilation
        _, step = run_batch(runner, max(args.batch_size), args.input_len, min(args.output_len, 4),
                            ready.vocab_size, rng, step, released, args.max_prefill_tokens)
        released = list(range(max(args.batch_size)))
    results = []
    for bs in args.batch_size:
        result, step = run_batch(
            runner, bs, args.input_len, args.output_len, ready.vocab_size, rng, step, released,
            args.max_prefill_tokens,
        )
        released = list(range(bs))
        results.append(result)
        print(f"batch {bs}: prefill {result.prefill_latency_s * 1e3:.2f} ms, "
              f"decode {result.median_decode_latency_s * 1e3:.2f} ms/step", flush=True)
    return results


def report(results: list[BatchResult], device: str) -> None:
    print(f"\nbench_one_batch ({device})")
    print_grid(
        ["batch", "input", "output", "prefill ms", "prefill tok/s", "decode ms", "decode tok/s", "total ms",
         "total tok/s"],
        [
            [r.batch_size, r.input_len, r.output_len, r.prefill_latency_s * 1e3, r.prefill_throughput,
             r.median_decode_latency_s * 1e3, r.decode_throughput, r.total_latency_s * 1e3,
             r.total_throughput]
            for r in results
        ],
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="radixserve model-runner latency of one static batch")
    parser.add_argument("--model-path", default=None)
    parser.add_argument("--batch-size", type=int, nargs="+", default=[1])
    parser.add_argument("--input-len", type=int, default=1024)
    parser.add_argument("--output-len", type=int, default=16)
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--attention-backend", default="auto")
    parser.add_argument("--load-format", default="auto", choices=["auto", "dummy"],
                        help="dummy: random weights from config.json")
    parser.add_argument("--max-prefill-tokens", type=int, default=None,
                        help="prefill in steps of at most this many tokens (default: the batch in one step)")
    parser.add_argument("--disable-cuda-graph", action="store_true")
    parser.add_argument("--random-seed", type=int, default=0, help="the worker's torch seed")
    parser.add_argument("--skip-warmup", action="store_true")
    add_common_args(parser)
    args = parser.parse_args(argv)
    if args.output_len < 1 or args.input_len < 1:
        parser.error("--input-len and --output-len must be >= 1")
    return args


def main(argv: list[str] | None = None) -> list[BatchResult]:
    args = parse_args(argv)
    info = run_info("bench_one_batch", args)
    results = benchmark(args)
    path = write_result(args.result_dir, info, {"batches": results})
    report(results, info.device)
    print(f"result: {path}")
    return results


if __name__ == "__main__":
    main()
