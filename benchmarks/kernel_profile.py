"""Where a CUDA-graph decode step spends GPU time: torch.profiler over replays of one batch size."""
from __future__ import annotations

import argparse
import sys

import torch

from radixserve.actors.gpu_worker import build_runner
from radixserve.actors.messages import InitWorker, SubmitRequest
from radixserve.actors.scheduler_config import SchedulerConfig
from radixserve.actors.scheduler_core import SchedulerCore
from radixserve.sampling_params import SamplingParams


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--bs", type=int, default=1)
    p.add_argument("--input-len", type=int, default=1024)
    a = p.parse_args()
    runner, ready = build_runner(InitWorker(
        rank=0, tp_size=1, model_path=a.model, dtype="bfloat16", device="cuda", context_length=8192,
        max_rows=a.bs + 1, max_total_tokens=None, mem_fraction_static=0.85, cpu_kv_gib=1,
        attention_backend="auto", cuda_graph_max_bs=max(a.bs, 1), load_format="dummy"))
    core = SchedulerCore(SchedulerConfig(num_slots=ready.num_slots, max_rows=a.bs + 1))
    for i in range(a.bs):
        core.submit(SubmitRequest(f"r{i}", torch.randint(100, 30000, (a.input_len,)).tolist(),
                                  SamplingParams(temperature=0), 64, [], 0.0))
    pending = []
    def step() -> None:
        plan = core.schedule()
        pending.append(runner.step(plan))
        if len(pending) == 2:
            core.apply(pending.pop(0).result())
    for _ in range(10):
        step()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        step()
    end.record()
    torch.cuda.synchronize()
    print(f"bs={a.bs}: {start.elapsed_time(end) / 20:.3f} ms per step (wall, pipelined)")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            step()
        torch.cuda.synchronize()
    events = prof.key_averages()
    total = sum(e.device_time_total for e in events) / 10
    count = sum(e.count for e in events) / 10
    print(f"GPU time per step {total / 1e3:.3f} ms over {count:.0f} kernels")
    print(events.table(sort_by="device_time_total", row_limit=18, max_name_column_width=60))


if __name__ == "__main__":
    main()
    sys.stdout.flush()
