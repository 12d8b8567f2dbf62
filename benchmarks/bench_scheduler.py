"""Host time of the scheduler's logic per decode step, by number of running requests (no model, no GPU).

    python -m radixserve.benchmarks.bench_scheduler --rows 64 256 800

SchedulerCore alone: N requests (a shared system prompt plus a question each, as the shared-prefix dataset
has them) are admitted and prefilled with fabricated results, then steady decode steps run with up to 2 in
flight, as the scheduler actor drives them. Reported per step: schedule() (admission + plan), apply() (the
result and the updates for the detokenizer), both together, in milliseconds (median over the measured steps)
and per row in microseconds. On a GPU this is the work that must hide under the device's step: at 800 rows
an H100 decode step of Llama-8B takes ~46 ms.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

import numpy as np

from radixserve.actors.messages import StepPlan, StepResult, SubmitRequest
from radixserve.actors.scheduler_config import SchedulerConfig
from radixserve.actors.scheduler_core import SchedulerCore
from radixserve.benchmarks.common import print_grid, run_info, write_result
from radixserve.sampling_params import SamplingParams


@dataclass(frozen=True, slots=True)
class SchedulerStepCost:
    rows: int
    steps: int
    schedule_ms: float
    apply_ms: float
    total_ms: float
    us_per_row: float


def fabricated_result(plan: StepPlan, rng: np.random.Generator) -> StepResult:
    """A token for every row (tokens >= 4, so no stop token ends a request early)."""
    rows = len(plan.req_rows) // 4
    return StepResult(step=plan.step, tokens=rng.integers(4, 30000, rows, dtype="<i4").tobytes())


def measure(rows: int, steps: int, system_len: int, question_len: int, seed: int = 0) -> SchedulerStepCost:
    rng = np.random.default_rng(seed)
    per_request = system_len + question_len + steps + 64
    core = SchedulerCore(SchedulerConfig(num_slots=system_len + rows * per_request + 1, max_rows=rows + 1,
                                         max_running_requests=rows, chunked_prefill_size=16384))
    system = rng.integers(4, 30000, system_len).tolist()
    params = SamplingParams(temperature=0, ignore_eos=True)
    for i in range(rows):
        question = rng.integers(4, 30000, question_len).tolist()
        core.submit(SubmitRequest(f"r{i}", system + question, params, steps + 64, [], 0.0))
    inflight: list[StepPlan] = []
    schedule_s: list[float] = []
    apply_s: list[float] = []
    while len(schedule_s) < steps:
        t0 = time.perf_counter()
        plan = core.schedule()
        t1 = time.perf_counter()
        steady = plan is not None and len(plan.input_ids) // 4 == rows == len(plan.req_rows) // 4
        if plan is not None:
            inflight.append(plan)
        if len(inflight) == 2 or (plan is None and inflight):
            t2 = time.perf_counter()
            core.apply(fabricated_result(inflight.pop(0), rng))
            if steady:
                schedule_s.append(t1 - t0)
                apply_s.append(time.perf_counter() - t2)
    core.check_integrity()
    sched, app = 1e3 * statistics.median(schedule_s), 1e3 * statistics.median(apply_s)
    return SchedulerStepCost(rows, steps, sched, app, sched + app, 1e3 * (sched + app) / rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=[64, 256, 800])
    p.add_argument("--steps", type=int, default=50, help="steady decode steps measured per size")
    p.add_argument("--system-len", type=int, default=2048)
    p.add_argument("--question-len", type=int, default=128)
    p.add_argument("--result-dir", default="bench_results")
    args = p.parse_args()
    costs = [measure(n, args.steps, args.system_len, args.question_len) for n in args.rows]
    print_grid(["rows", "steps", "schedule ms", "apply ms", "total ms", "us / row"],
               [(c.rows, c.steps, c.schedule_ms, c.apply_ms, c.total_ms, c.us_per_row) for c in costs])
    path = write_result(args.result_dir, run_info("bench_scheduler", args, device="cpu (host only)"), costs)
    print(f"result: {path}")


if __name__ == "__main__":
    main()
