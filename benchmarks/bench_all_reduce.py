"""All-reduce latency on this host's GPUs: NCCL against the one-shot symmetric-memory path, inside CUDA
graphs as the decode step runs them, over the message sizes of TP decode ([batch, hidden] bf16).

    python -m radixserve.benchmarks.bench_all_reduce --world-size 2 [--fused-norm]

Also checks the one-shot result against NCCL's and that every rank holds bitwise-equal sums (the workers
rely on it to sample the same tokens). Floor: a one-shot read of (world - 1) peer copies over NVLink.

--fused-norm: what a TP layer boundary costs, all-reduce + residual add + RMSNorm of [rows, 4096] bf16, as
NCCL then the add + norm kernel, one-shot then that kernel, and FlashInfer's fused kernel
(ops/allreduce_norm.py), with the fused result checked against the unfused one.
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

FUSED_HIDDEN = 4096  # Llama-3.1-8B
FUSED_ROWS = (1, 8, 64, 256)

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


@dataclass(frozen=True, slots=True)
class FusedTiming:
    rows: int
    nccl_norm_us: float  # NCCL all-reduce, then the add + RMSNorm kernel
    one_shot_norm_us: float  # one-shot all-reduce, then that kernel
    fused_us: float  # one kernel
    max_abs_diff: float  # fused vs one-shot + kernel, normed output


def fused_rows(rank: int, world: int, group: dist.ProcessGroup, device: torch.device,
               one_shot: OneShotAllReduce, replays: int) -> list[FusedTiming]:
    from radixserve.ops.allreduce_norm import FusedAllReduceRMSNorm
    from radixserve.ops.triton_fused import rms_norm

    fused = FusedAllReduceRMSNorm(group, rank, world, FUSED_HIDDEN, torch.bfloat16, device)
    weight = torch.rand(FUSED_HIDDEN, device=device, dtype=torch.bfloat16) + 0.5
    rows_out: list[FusedTiming] = []
    for rows in FUSED_ROWS:
        torch.manual_seed(100 + rank)
        x = torch.randn(rows, FUSED_HIDDEN, device=device, dtype=torch.bfloat16)
        torch.manual_seed(7)  # the residual stream is the same on every rank
        residual = torch.randn(rows, FUSED_HIDDEN, device=device, dtype=torch.bfloat16)
        ref_out, ref_res = rms_norm(one_shot(x.clone()), weight, 1e-5, residual.clone())
        out, res = fused(x.clone(), residual.clone(), weight, 1e-5)
        diff = max((out.float() - ref_out.float()).abs().max().item(),
                   (res.float() - ref_res.float()).abs().max().item())

        def unfused(reduce, residual=residual):  # type: ignore[no-untyped-def]
            return lambda t: rms_norm(reduce(t), weight, 1e-5, residual)

        nccl = graph_time_us(unfused(lambda t: (dist.all_reduce(t), t)[1]), x.clone(), replays)
        oneshot = graph_time_us(unfused(one_shot), x.clone(), replays)
        fused_us = graph_time_us(lambda t, r=residual: fused(t, r, weight, 1e-5), x.clone(), replays)
        rows_out.append(FusedTiming(rows, nccl, oneshot, fused_us, diff))
    return rows_out


def worker(rank: int, world: int, init_file: str, sizes: list[int], replays: int, queue,
           fused_norm: bool = False) -> None:
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
    fused = fused_rows(rank, world, group, device, one_shot, replays) if fused_norm else []
    if rank == 0:
        queue.put((rows, fused))
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world-size", type=int, default=torch.cuda.device_count())
    parser.add_argument("--sizes-kib", type=int, nargs="+", default=[8, 32, 128, 512, 1024, 2048, 4096])
    parser.add_argument("--replays", type=int, default=20)
    parser.add_argument("--fused-norm", action="store_true",
                        help="also all-reduce + add + RMSNorm: unfused vs FlashInfer's fused kernel")
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
                                         args.replays, queue, args.fused_norm),
                           nprocs=args.world_size, join=True, start_method="spawn")
    rows, fused = queue.get()
    print_grid(["bytes", "nccl_us", "one_shot_us", "max_abs_diff"],
               [[r.nbytes, r.nccl_us, r.one_shot_us, r.max_abs_diff] for r in rows])
    if fused:
        print(f"\nall-reduce + residual add + RMSNorm, [rows, {FUSED_HIDDEN}] bf16, us per layer boundary")
        print_grid(["rows", "nccl+norm", "one_shot+norm", "fused", "max_abs_diff"],
                   [[f.rows, f.nccl_norm_us, f.one_shot_norm_us, f.fused_us, f.max_abs_diff] for f in fused])
    path = write_result(args.result_dir, info, {"world_size": args.world_size, "sizes": rows,
                                                "fused_norm": fused})
    print(f"result: {path}")


if __name__ == "__main__":
    main()
