"""The cyclic garbage collector's pauses in one process, through gc.callbacks (benchmark instrumentation).

A full collection stops the process while it scans every tracked object; in the engine's event loop or the GPU
worker's step loop that is time the GPU may sit idle. bench_offline --step-timing records them in the engine
process and, through the step timer, in each worker, and counts those inside the measured window (pause starts
are time.perf_counter_ns(), one monotonic clock for every process of the host).
"""

from __future__ import annotations

import gc
import time
from typing import Any

# (generation, start in perf_counter_ns, duration in ms)
GcRecord = tuple[int, int, float]


class GcPauses:
    def __init__(self) -> None:
        self.records: list[GcRecord] = []
        self._start_ns = 0

    def install(self) -> GcPauses:
        gc.callbacks.append(self._callback)
        return self

    def uninstall(self) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        now = time.perf_counter_ns()
        if phase == "start":
            self._start_ns = now
        elif self._start_ns:
            self.records.append((int(info["generation"]), self._start_ns, (now - self._start_ns) / 1e6))
            self._start_ns = 0


def summarize(records: list[GcRecord], start_ns: int, end_ns: int) -> dict[str, Any]:
    """Collections that began in [start_ns, end_ns], per generation: count, total and longest pause (ms); and
    the pauses of 5 ms or more as (generation, ms into the window, ms)."""
    inside = [(g, t, ms) for g, t, ms in records if start_ns <= t <= end_ns]
    out: dict[str, Any] = {}
    for gen in (0, 1, 2):
        pauses = [ms for g, _, ms in inside if g == gen]
        out[f"gen{gen}"] = {"count": len(pauses), "total_ms": round(sum(pauses), 2),
                            "max_ms": round(max(pauses, default=0.0), 2)}
    out["long_pauses"] = [
        (g, round((t - start_ns) / 1e6, 1), round(ms, 2)) for g, t, ms in inside if ms >= 5.0]
    return out
