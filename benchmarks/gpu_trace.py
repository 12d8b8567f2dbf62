"""GPU busy and idle time from a torch.profiler (Kineto) chrome trace.

Every GPU operation (kernels, memcpys, memsets) is an interval on the device timeline. Over the traced window:

    idle fraction          1 - |union of intervals| / window        every gap, inside steps and between them
    between-step idle      from the end of each step's device->host copy of its sampled tokens (the last
                           thing a step does on the GPU) to the start of the next GPU operation

A decode step copies exactly one tensor to the host (its tokens; logprobs add more), so DtoH copies delimit
steps. The idle fraction bounds the between-step idle from above.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

GPU_CATEGORIES = frozenset({"kernel", "gpu_memcpy", "gpu_memset"})


@dataclass(frozen=True, slots=True)
class TraceStats:
    gpu_ops: int
    window_ms: float
    busy_ms: float
    idle_fraction: float
    steps: int  # step periods measured between DtoH copies
    median_step_ms: float
    between_step_idle_ms: float  # summed over the measured periods
    between_step_idle_fraction: float  # of the summed periods
    max_between_step_gap_ms: float


def load_trace(path: str | Path) -> dict[str, Any]:
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        trace: dict[str, Any] = json.load(f)
    return trace


def gpu_ops(trace: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """([N, 2] start/end in microseconds sorted by start, [N] bool: is a device->host copy)."""
    ops = [
        (float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0.0)), _is_dtoh(e))
        for e in trace.get("traceEvents", [])
        if e.get("ph") == "X" and e.get("cat") in GPU_CATEGORIES
    ]
    ops.sort()
    intervals = np.array([(s, e) for s, e, _ in ops], dtype=np.float64).reshape(-1, 2)
    return intervals, np.array([d for _, _, d in ops], dtype=bool)


def kernel_totals(trace: dict[str, Any], top: int = 15) -> list[tuple[str, int, float]]:
    """The `top` kernel names by total device time: (name cut to 90 chars, count, total ms)."""
    totals: dict[str, list[float]] = {}
    for e in trace.get("traceEvents", []):
        if e.get("ph") == "X" and e.get("cat") in GPU_CATEGORIES:
            entry = totals.setdefault(str(e.get("name", ""))[:90], [0, 0.0])
            entry[0] += 1
            entry[1] += float(e.get("dur", 0.0)) / 1e3
    ranked = sorted(totals.items(), key=lambda kv: -kv[1][1])[:top]
    return [(name, int(count), total) for name, (count, total) in ranked]


def host_op_totals(trace: dict[str, Any], top: int = 15) -> list[tuple[str, int, float, float]]:
    """The `top` host-side torch ops (category cpu_op, recorded with the profiler's CPU activity) by total
    host time: (name cut to 60 chars, count, total ms, mean us). Durations are inclusive (an op's own nested
    ops are in it too), so read top-level ops such as aten::linear by themselves."""
    totals: dict[str, list[float]] = {}
    for e in trace.get("traceEvents", []):
        if e.get("ph") == "X" and e.get("cat") == "cpu_op":
            entry = totals.setdefault(str(e.get("name", ""))[:60], [0, 0.0])
            entry[0] += 1
            entry[1] += float(e.get("dur", 0.0)) / 1e3
    ranked = sorted(totals.items(), key=lambda kv: -kv[1][1])[:top]
    return [(name, int(count), total, 1e3 * total / count) for name, (count, total) in ranked]


def largest_gaps(trace: dict[str, Any], top: int = 8) -> list[tuple[float, float, str]]:
    """The `top` longest stretches with nothing on the GPU: (ms into the window, gap ms, name of the operation
    that ends it cut to 60 chars), longest first. Inside a step, a gap before an attention kernel is the GPU
    waiting for the host (planning); after a device->host copy, for the next step."""
    events = sorted(
        (float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0.0)), str(e.get("name", ""))[:60])
        for e in trace.get("traceEvents", [])
        if e.get("ph") == "X" and e.get("cat") in GPU_CATEGORIES
    )
    if not events:
        return []
    origin, covered = events[0][0], events[0][1]
    gaps = []
    for start, end, name in events[1:]:
        if start > covered:
            gaps.append(((covered - origin) / 1e3, (start - covered) / 1e3, name))
        covered = max(covered, end)
    return sorted(gaps, key=lambda g: -g[1])[:top]


def _is_dtoh(event: dict[str, Any]) -> bool:
    return event.get("cat") == "gpu_memcpy" and "DtoH" in event.get("name", "")


def union_length(intervals: np.ndarray) -> float:
    """Total length covered by sorted-by-start intervals (overlaps counted once)."""
    total, cur_start, cur_end = 0.0, None, None
    for start, end in intervals:
        if cur_end is None or start > cur_end:
            if cur_end is not None:
                total += cur_end - cur_start
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    if cur_end is not None:
        total += cur_end - cur_start
    return float(total)


def analyze(trace: dict[str, Any], skip_steps: int = 2) -> TraceStats | None:
    """None when the trace holds no GPU operations (a CPU run)."""
    intervals, dtoh = gpu_ops(trace)
    if not len(intervals):
        return None
    window = float(intervals[:, 1].max() - intervals[0, 0])
    busy = union_length(intervals)
    # Step boundaries: ends of DtoH copies; the gap after each is the wait for the next step's first op.
    boundaries = np.sort(intervals[dtoh, 1])[skip_steps:]
    starts = intervals[:, 0]
    gaps, periods = [], []
    for b0, b1 in zip(boundaries[:-1], boundaries[1:], strict=True):
        nxt = starts[np.searchsorted(starts, b0, side="left")] if starts[-1] >= b0 else b0
        gaps.append(max(0.0, min(nxt, b1) - b0))
        periods.append(b1 - b0)
    period_sum = float(sum(periods))
    return TraceStats(
        gpu_ops=len(intervals),
        window_ms=window / 1e3,
        busy_ms=busy / 1e3,
        idle_fraction=1.0 - busy / window if window > 0 else 0.0,
        steps=len(periods),
        median_step_ms=float(np.median(periods)) / 1e3 if periods else float("nan"),
        between_step_idle_ms=float(sum(gaps)) / 1e3,
        between_step_idle_fraction=float(sum(gaps)) / period_sum if period_sum > 0 else float("nan"),
        max_between_step_gap_ms=max(gaps, default=0.0) / 1e3,
    )
