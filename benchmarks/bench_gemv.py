"""Decode-time kernels on one GPU, each timed inside a CUDA graph as the decode step runs them.

  linear     Llama-3.1-8B's projections at TP1 and TP2, batch M = 1..16: cuBLAS (F.linear) against the Triton
             skinny GEMM (ops/triton_gemv.py) in every candidate config; bandwidth = (W + x + y) bytes / time.
             Then at M = 1, the GEMVs with a fused prologue (ops/fused_decode.py) against the unfused pair:
             rms_norm + skinny_matmul (qkv, gate_up) and silu_and_mul + skinny_matmul (down).

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
BATCHES = (1, 2, 4, 8, 16)
FUSED_PROLOGUES = {"qkv": "rms_norm", "gate_up": "rms_norm", "down": "silu_mul"}  # the op before each GEMV
EPS = 1e-5  # Llama-3.1's rms_norm_eps


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


@dataclass(frozen=True, slots=True)
class FusedRow:
    layer: str
    tp: int
    n: int
    k: int  # the GEMV's K (for down, gate_up is [1, 2 * K])
    prologue: str  # "rms_norm" (with a residual) or "silu_mul"
    config: str  # pick_fma_config(N, K): what the unfused GEMV and the fused kernel run with
    gemv_us: float  # skinny_matmul alone
    unfused_us: float  # the elementwise kernel + skinny_matmul
    fused_us: float
    max_rel_err: float  # max |fused - unfused| / max |unfused|
    bitwise: bool  # fused == unfused
    residual_equal: bool | None  # rms_norm's residual out, bitwise; None for silu_mul
    deterministic: bool  # two fused runs bitwise equal
    best_config: str | None  # the fastest fused candidate config that matches and is deterministic
    best_us: float | None
    failed: list[str]  # candidate configs that failed, mismatched or were nondeterministic


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


# ------------------------------------------------------------------------------- fused prologue (M == 1)


def _norm_then_gemv(x: Any, residual: Any, norm_w: Any, w: Any, config: Any) -> Any:
    from radixserve.ops.triton_fused import rms_norm
    from radixserve.ops.triton_gemv import skinny_matmul

    normed, _ = rms_norm(x, norm_w, EPS, residual)
    return skinny_matmul(normed, w, config=config)


def _silu_then_gemv(gate_up: Any, w: Any, config: Any) -> Any:
    from radixserve.ops.triton_fused import silu_and_mul
    from radixserve.ops.triton_gemv import skinny_matmul

    return skinny_matmul(silu_and_mul(gate_up), w, config=config)


def bench_fused(layer: Layer, args: argparse.Namespace) -> FusedRow:
    """One GEMV at M = 1 with the op before it: the unfused pair, the fused kernel with the same config, and
    the fused kernel in every CUDA-core candidate config."""
    import torch

    from radixserve.ops.fused_decode import rms_norm_matmul, silu_mul_matmul
    from radixserve.ops.triton_gemv import candidate_configs, pick_fma_config, skinny_matmul

    dtype, device = torch.bfloat16, torch.device("cuda")
    prologue = FUSED_PROLOGUES[layer.name]
    w0 = torch.randn(layer.n, layer.k, dtype=dtype, device=device) / math.sqrt(layer.k)
    weights = [w0] + [w0.clone() for _ in range(rotation(w0.nbytes) - 1)]
    cycle = [weights[i % len(weights)] for i in range(OPS_PER_GRAPH)]
    picked = pick_fma_config(layer.n, layer.k)
    # The activations are a few KB and L2-resident, as the previous kernel's outputs are in a decode step.
    if prologue == "rms_norm":
        x, residual = (torch.randn(1, layer.k, dtype=dtype, device=device) for _ in range(2))
        norm_w = 1 + 0.1 * torch.randn(layer.k, dtype=dtype, device=device)
        gemv_in = torch.randn(1, layer.k, dtype=dtype, device=device)
        unfused_op: Callable[..., Any] = partial(_norm_then_gemv, x, residual, norm_w)

        def fused(w: Any, config: Any) -> tuple[Any, Any]:
            return rms_norm_matmul(x, residual, norm_w, EPS, w, config=config)
    else:
        gate_up = torch.randn(1, 2 * layer.k, dtype=dtype, device=device)
        gemv_in = torch.randn(1, layer.k, dtype=dtype, device=device)
        unfused_op = partial(_silu_then_gemv, gate_up)

        def fused(w: Any, config: Any) -> tuple[Any, Any]:
            return silu_mul_matmul(gate_up, w, config=config), None

    gemv_us = graph_us([partial(skinny_matmul, gemv_in, w, config=picked) for w in cycle], args.replays)
    unfused = unfused_op(w0, picked)
    y, res_out = fused(w0, picked)
    residual_equal = None
    if prologue == "rms_norm":
        from radixserve.ops.triton_fused import rms_norm

        residual_equal = torch.equal(res_out, rms_norm(x, norm_w, EPS, residual)[1])
    err = ((y.float() - unfused.float()).abs().max() / unfused.float().abs().max()).item()
    again = fused(w0, picked)
    deterministic = torch.equal(again[0], y) and (res_out is None or torch.equal(again[1], res_out))
    unfused_us = graph_us([partial(unfused_op, w, picked) for w in cycle], args.replays)
    fused_us = graph_us([partial(fused, w, picked) for w in cycle], args.replays)
    good: dict[str, float] = {}
    failed: list[str] = []
    for config in candidate_configs(1):
        if config.tensor_cores:
            continue
        # NOTE: as in bench_layer, one config failing must not end the sweep.
        try:
            out = fused(w0, config)[0]
            ok = _close(((out.float() - unfused.float()).abs().max() / unfused.float().abs().max()).item())
            if ok and torch.equal(fused(w0, config)[0], out):
                good[config.name] = graph_us([partial(fused, w, config) for w in cycle], args.replays)
            else:
                failed.append(config.name)
        except Exception as exc:
            failed.append(f"{config.name} ({type(exc).__name__}: {exc})"[:300])
    best = min(good, key=good.__getitem__, default=None)
    row = FusedRow(
        layer.name, layer.tp, layer.n, layer.k, prologue, picked.name, gemv_us, unfused_us, fused_us, err,
        torch.equal(y, unfused), residual_equal, deterministic, best, good[best] if best else None, failed,
    )  # fmt: skip
    print(
        f"fused {prologue} + {layer.name} tp{layer.tp} {layer.n}x{layer.k} ({picked.name}): "
        f"gemv {gemv_us:.1f} us, unfused {unfused_us:.1f} us, fused {fused_us:.1f} us; best fused {best} "
        f"{good[best] if best else math.nan:.1f} us" + (f"; failed: {failed}" if failed else ""),
        flush=True,
    )
    del weights, cycle, w0
    torch.cuda.empty_cache()
    return row


def _fused_summary(row: FusedRow) -> list[Any]:
    ok = row.deterministic and row.residual_equal is not False and _close(row.max_rel_err)
    return [
        row.layer, row.tp, row.n, row.k, row.prologue, row.config, row.gemv_us, row.unfused_us, row.fused_us,
        row.unfused_us - row.fused_us, row.unfused_us / row.fused_us, row.best_config or "-",
        row.best_us if row.best_us is not None else "-", "yes" if row.bitwise else f"{row.max_rel_err:.1e}",
        "ok" if ok else "BAD",
    ]  # fmt: skip


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
    """(N, K) -> [(largest M, best SkinnyConfig), ...]: consecutive batches with one winner merged, the last
    entry stretched to MAX_M (the best guess for batches between the last measured one and MAX_M)."""
    from radixserve.ops.triton_gemv import CANDIDATES, MAX_M

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
    for entries in table.values():
        entries[-1] = (MAX_M, entries[-1][1])
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
    args = parser.parse_args()
    if args.replays is None:
        args.replays = 5 if args.quick else 10

    import torch

    if not torch.cuda.is_available():
        raise SystemExit("bench_gemv needs a CUDA device")
    torch.manual_seed(0)
    info = run_info("bench_gemv", args)

    layers = [layer for layer in LAYERS if layer.tp == 1] if args.quick else LAYERS
    batches = (1, 8) if args.quick else BATCHES
    linear = [row for layer in layers for row in bench_layer(layer, batches, args)]
    fused = [bench_fused(layer, args) for layer in layers if layer.name in FUSED_PROLOGUES]
    table = tuned_table(linear)
    result = {
        "peak_gbps": args.peak_gbps, "ops_per_graph": OPS_PER_GRAPH, "replays": args.replays,
        "linear": linear, "fused": fused,
        "tuned": {f"{n}x{k}": [(m, c.name) for m, c in entries] for (n, k), entries in table.items()},
    }  # fmt: skip
    path = write_result(args.result_dir, info, result)
    if table:
        print_tuned(table, linear)
    print(f"\nresult: {path}  ({info.device}; % of {args.peak_gbps:.0f} GB/s)")
    if linear:
        header = ["layer", "tp", "N", "K", "M", "cublas_us", "cublas_%", "triton_us", "triton_%", "speedup"]
        print_grid([*header, "best", "rel_err"], [_summary(row) for row in linear])
    if fused:
        print("\nM = 1, the op before the GEMV fused into it (us per op; unfused: same config, 2 kernels)")
        print_grid(
            ["layer", "tp", "N", "K", "prologue", "config", "gemv_us", "unfused_us", "fused_us", "saved_us",
             "speedup", "best_fused", "best_us", "bitwise", "checks"],
            [_fused_summary(row) for row in fused],
        )  # fmt: skip


if __name__ == "__main__":
    main()
