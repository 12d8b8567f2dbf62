"""All-reduce latency on this host's GPUs: NCCL against the one-shot symmetric-memory path, inside CUDA
graphs as the decode step runs them, over the message sizes of TP decode ([batch, hidden] bf16).

    python -m radixserve.benchmarks.bench_all_reduce --world-size 2

Also checks the one-shot result against NCCL's and that every rank holds bitwise-equal sums (the workers
rely on it to sample the same tokens). Floor: a one-shot read of (world - 1) peer copies over NVLink.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from radixserve.benchmarks.common import add_common_args, print_grid, run_info, write_result
from radixserve.ops.symm_all_reduce import OneShotAllReduce

OPS_PER_GRAPH = 64  # a TP decode step of a 32-layer model runs 64 all-reduces back to back


@dataclass(frozen=True, slots=True)
class SizeTiming:
    nbytes: int
    nccl_us: float
    one_shot_us: float | None  # None: larger than the symmetric buffer
    max_abs_diff: float | None  # one-shot vs NCCL


def graph_time_us(fn, x: torch.Tensor, replays: int) -> float:
    """Microseconds per call of fn(x) inside a captured graph of OPS_PER_GRAPH calls."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn(x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(OPS_PER_GRAPH):
            fn(x)
    graph.replay()
    torch.cuda.synchronize()
    dist.barrier()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return 1e3 * start.elapsed_time(end) / (replays * OPS_PER_GRAPH)


def worker(rank: int, world: int, init_file: str, sizes: list[int], replays: int, queue) -> None:
    torch.cuda.set_device(rank)
    device = torch.device("cuda", rank)
    dist.init_process_group("nccl", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            device_id=device)
    group = dist.group.WORLD
    one_shot = OneShotAllReduce(group, device, torch.bfloat16, max(sizes))
    rows: list[SizeTiming] = []
    for nbytes in sizes:
        n = nbytes // 2
        torch.manual_seed(rank)
        x = torch.randn(n, device=device, dtype=torch.bfloat16)
        ref = x.clone()
        dist.all_reduce(ref)
        got = one_shot(x.clone())
        gathered = [torch.empty_like(got) for _ in range(world)]
        dist.all_gather(gathered, got)
        if not all(torch.equal(g, gathered[0]) for g in gathered):
            raise RuntimeError(f"one-shot all-reduce of {nbytes} bytes differs between ranks")
        diff = (got.float() - ref.float()).abs().max().item()
        nccl_us = graph_time_us(lambda t: dist.all_reduce(t), x.clone(), replays)
        os_us = graph_time_us(one_shot, x.clone(), replays)
        rows.append(SizeTiming(nbytes, nccl_us, os_us, diff))
    if rank == 0:
        queue.put(rows)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world-size", type=int, default=torch.cuda.device_count())
    parser.add_argument("--sizes-kib", type=int, nargs="+", default=[8, 32, 128, 512, 1024, 2048, 4096])
    parser.add_argument("--replays", type=int, default=20)
    add_common_args(parser)
    args = parser.parse_args()
    if args.world_size < 2 or args.world_size > torch.cuda.device_count():
        raise SystemExit(f"--world-size must be in [2, {torch.cuda.device_count()}] (visible GPUs)")
    info = run_info("bench_all_reduce", args)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        mp.start_processes(worker, args=(args.world_size, init_file, [k << 10 for k in args.sizes_kib],
                                         args.replays, queue),
                           nprocs=args.world_size, join=True, start_method="spawn")
    rows: list[SizeTiming] = queue.get()
    print_grid(["bytes", "nccl_us", "one_shot_us", "max_abs_diff"],
               [[r.nbytes, r.nccl_us, r.one_shot_us, r.max_abs_diff] for r in rows])
    path = write_result(args.result_dir, info, {"world_size": args.world_size, "sizes": rows})
    print(f"result: {path}")


if __name__ == "__main__":
    main()
