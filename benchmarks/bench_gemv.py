"""Decode-time linear layers on one GPU, each timed inside a CUDA graph as the decode step runs them.

Llama-3.1-8B's projections at TP1 and TP2, batch M = 1..128: cuBLAS (F.linear) against the Triton skinny GEMM
(ops/triton_gemv.py) in every candidate config; bandwidth = (W + x + y) bytes / time.

    python -m radixserve.benchmarks.bench_gemv [--peak-gbps 3350] [--out DIR] [--quick]

(Attention kernels: bench_decode_attention.py, with this file's graph timer.)

NOTE: a graph runs each op OPS_PER_GRAPH times over rotating copies of its weight (KV pool) that together
exceed the L2 cache a few times over, so every op reads HBM, as in a decode step where each layer has its own
weights. Replaying one 32 MB o_proj weight would be served from an H100's 50 MB L2 and report impossible
bandwidths.

Ends with a TUNED table to paste into ops/triton_gemv.py (the best Triton config per weight shape and batch).
torch and triton are imported inside the functions: `--help` runs on any machine.
"""

from __future__ import annotations

import argparse
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from radixserve.benchmarks.common import DEFAULT_RESULT_DIR, print_grid, run_info, write_result

OPS_PER_GRAPH = 50
MAX_REL_ERR = 1e-2  # against cuBLAS, both bf16 outputs of float32 sums: a bf16 ulp or two
BATCHES = (1, 2, 4, 8, 16, 32, 64, 128)


@dataclass(frozen=True, slots=True)
class Layer:
    name: str
    tp: int
    n: int  # output features (weight rows)
    k: int  # input features


LAYERS = (
    Layer("qkv", 1, 6144, 4096), Layer("o_proj", 1, 4096, 4096), Layer("gate_up", 1, 28672, 4096),
    Layer("down", 1, 4096, 14336), Layer("lm_head", 1, 128256, 4096),
    # TP2: column-parallel layers halve N, row-parallel ones halve K
    Layer("qkv", 2, 3072, 4096), Layer("o_proj", 2, 4096, 2048), Layer("gate_up", 2, 14336, 4096),
    Layer("down", 2, 4096, 7168),
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Timing:
    us: float  # per op: median replay time / OPS_PER_GRAPH
    gbps: float
    pct_peak: float


@dataclass(frozen=True, slots=True)
class TritonRun:
    config: str  # SkinnyConfig.name
    timing: Timing | None  # None: the config failed (see error)
    max_rel_err: float | None  # max |triton - cublas| / max |cublas|
    deterministic: bool | None  # two runs bitwise equal
    error: str | None = None


@dataclass(frozen=True, slots=True)
class LinearRow:
    layer: str
    tp: int
    n: int
    k: int
    m: int
    nbytes: int  # W + x + y
    cublas: Timing
    triton: list[TritonRun]
    best: str | None  # the fastest config whose output matches cuBLAS
    speedup: float | None  # cublas us / best us


def make_timing(us: float, nbytes: int, peak_gbps: float) -> Timing:
    gbps = nbytes / us / 1e3
    return Timing(us, gbps, 100 * gbps / peak_gbps)


def graph_us(ops: Sequence[Callable[[], object]], replays: int) -> float:
    """Median microseconds per op over `replays` replays of one CUDA graph that runs `ops` back to back."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up (compile, plan caches) outside the capture, on a side stream
        for op in ops:
            op()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for op in ops:
            op()
    graph.replay()  # the first replay uploads the graph
    events = [
        (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(replays)
    ]
    for start, end in events:
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    return 1e3 * statistics.median(s.elapsed_time(e) for s, e in events) / len(ops)


def rotation(nbytes: int) -> int:
    """How many distinct copies of an nbytes buffer to cycle through so that each read misses L2."""
    import torch

    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20)
    return max(1, math.ceil(4 * l2 / nbytes))


# ------------------------------------------------------------------------------------------------- linear


def bench_layer(layer: Layer, batches: Sequence[int], args: argparse.Namespace) -> list[LinearRow]:
    import torch
    import torch.nn.functional as F

    from radixserve.ops.triton_gemv import candidate_configs, skinny_matmul

    dtype, device = torch.bfloat16, torch.device("cuda")
    w0 = torch.randn(layer.n, layer.k, dtype=dtype, device=device) / math.sqrt(layer.k)
    weights = [w0] + [w0.clone() for _ in range(rotation(w0.nbytes) - 1)]
    cycle = [weights[i % len(weights)] for i in range(OPS_PER_GRAPH)]
    rows: list[LinearRow] = []
    for m in batches:
        x = torch.randn(m, layer.k, dtype=dtype, device=device)
        nbytes = w0.nbytes + x.nbytes + m * layer.n * x.element_size()
        ref = F.linear(x, w0)
        cublas_us = graph_us([partial(F.linear, x, w) for w in cycle], args.replays)
        cublas = make_timing(cublas_us, nbytes, args.peak_gbps)
        runs: list[TritonRun] = []
        for config in candidate_configs(m):
            # NOTE: one config failing (e.g. out of shared memory on another card) must not end the sweep.
            try:
                y = skinny_matmul(x, w0, config=config)
                err = ((y.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
                same = torch.equal(y, skinny_matmul(x, w0, config=config))
                us = graph_us([partial(skinny_matmul, x, w, config=config) for w in cycle], args.replays)
                runs.append(TritonRun(config.name, make_timing(us, nbytes, args.peak_gbps), err, same))
            except Exception as exc:
                runs.append(TritonRun(config.name, None, None, None, f"{type(exc).__name__}: {exc}"[:300]))
        good = {r.config: r.timing.us for r in runs if r.timing and r.deterministic and _close(r.max_rel_err)}
        best = min(good, key=good.__getitem__, default=None)
        speedup = cublas.us / good[best] if best else None
        rows.append(LinearRow(layer.name, layer.tp, layer.n, layer.k, m, nbytes, cublas, runs, best, speedup))
        failed = [r.config for r in runs if r.config not in good]
        print(
            f"{layer.name} tp{layer.tp} {layer.n}x{layer.k} M={m}: cublas {cublas.us:.1f} us "
            f"({cublas.pct_peak:.0f}%), best {best} {good[best] if best else math.nan:.1f} us"
            + (f"; failed, nondeterministic or wrong: {failed}" if failed else ""),
            flush=True,
        )
    del weights, cycle, w0
    torch.cuda.empty_cache()
    return rows


def _close(rel_err: float | None) -> bool:
    return rel_err is not None and rel_err < MAX_REL_ERR


def _summary(row: LinearRow) -> list[Any]:
    """One line of the final table: the layer, cuBLAS, and the best Triton config (dashes when none)."""
    cells: list[Any] = [row.layer, row.tp, row.n, row.k, row.m, row.cublas.us, row.cublas.pct_peak]
    best = next((t for t in row.triton if t.config == row.best), None)
    if best is None or best.timing is None:
        return cells + ["-"] * 5
    return cells + [best.timing.us, best.timing.pct_peak, row.speedup, row.best, f"{best.max_rel_err:.1e}"]


def tuned_table(rows: Sequence[LinearRow]) -> dict[tuple[int, int], list[tuple[int, Any]]]:
    """(N, K) -> [(largest M, best SkinnyConfig), ...]: consecutive batches with one winner merged; a batch
    between two measured ones takes the larger one's entry, and none past the largest measured batch has one
    (faster_than_cublas sends those to cuBLAS)."""
    from radixserve.ops.triton_gemv import CANDIDATES

    by_name = {c.name: c for c in CANDIDATES}
    table: dict[tuple[int, int], list[tuple[int, Any]]] = {}
    for row in sorted(rows, key=lambda r: (r.n, r.k, r.m)):
        if row.best is None:
            continue
        entries = table.setdefault((row.n, row.k), [])
        if entries and entries[-1][1].name == row.best:
            entries[-1] = (row.m, entries[-1][1])
        else:
            entries.append((row.m, by_name[row.best]))
    return table


def print_tuned(table: dict[tuple[int, int], list[tuple[int, Any]]], rows: Sequence[LinearRow]) -> None:
    """The table as Python for ops/triton_gemv.py, each shape with its speedups over cuBLAS as a comment
    (whether to call the Triton kernel at all is the caller's choice)."""
    print("\n# paste into ops/triton_gemv.py (device: see the result file)")
    print("TUNED: dict[tuple[int, int], tuple[tuple[int, SkinnyConfig], ...]] = {")
    for (n, k), entries in sorted(table.items()):
        mine = [r for r in rows if (r.n, r.k) == (n, k)]
        speedups = ", ".join(f"M={r.m} {r.speedup:.2f}x" for r in mine if r.speedup is not None)
        print(f"    # {mine[0].layer} tp{mine[0].tp}, speedup over cuBLAS: {speedups}")
        print(f"    ({n}, {k}): (")
        for m, config in entries:
            print(f"        ({m}, {config!r}),")
        print("    ),")
    print("}")


# --------------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = parser.add_argument
    add(
        "--peak-gbps", type=float, default=3350.0, help="HBM bandwidth that %% of peak refers to (H100: 3350)"
    )
    add(
        "--result-dir", "--out", dest="result_dir", default=DEFAULT_RESULT_DIR,
        help="JSON result folder ($OUT if set)",
    )  # fmt: skip
    add("--quick", action="store_true", help="TP1 shapes at M 1 and 8")
    add("--replays", type=int, default=None, help="graph replays per timing (default 10, with --quick 5)")
    add("--batches", type=int, nargs="+", default=None, help=f"batch sizes M (default {BATCHES})")
    add("--tp", type=int, choices=(1, 2), default=None, help="only this TP degree's shapes (default both)")
    args = parser.parse_args()
    if args.replays is None:
        args.replays = 5 if args.quick else 10

    import torch

    if not torch.cuda.is_available():
        raise SystemExit("bench_gemv needs a CUDA device")
    torch.manual_seed(0)
    info = run_info("bench_gemv", args)

    tp = 1 if args.quick else args.tp
    layers = [layer for layer in LAYERS if tp is None or layer.tp == tp]
    batches = tuple(args.batches or ((1, 8) if args.quick else BATCHES))
    linear = [row for layer in layers for row in bench_layer(layer, batches, args)]
    table = tuned_table(linear)
    result = {
        "peak_gbps": args.peak_gbps, "ops_per_graph": OPS_PER_GRAPH, "replays": args.replays,
        "linear": linear,
        "tuned": {f"{n}x{k}": [(m, c.name) for m, c in entries] for (n, k), entries in table.items()},
    }  # fmt: skip
    path = write_result(args.result_dir, info, result)
    if table:
        print_tuned(table, linear)
    print(f"\nresult: {path}  ({info.device}; % of {args.peak_gbps:.0f} GB/s)")
    if linear:
        header = ["layer", "tp", "N", "K", "M", "cublas_us", "cublas_%", "triton_us", "triton_%", "speedup"]
        print_grid([*header, "best", "rel_err"], [_summary(row) for row in linear])


if __name__ == "__main__":
    main()
