"""Per-step timestamps inside the GPU worker, for measuring how long the GPU waits between steps.

Each step gets three marks, CUDA events recorded on the worker's stream (host clock on the CPU):

    begin    the worker enters ModelRunner.prepare      (the event completes once the GPU is done with
                                                         everything before it *and* the host got here)
    launch   ModelRunner.launch: the inputs are on the device, the forward pass comes next
    end      finish() returned: all of its work is queued (completes when the GPU has finished the step)

On the GPU timeline, `launch[n+1] - end[n]` is the time the GPU had nothing of the model to run between step n
and step n+1 (it includes the tiny host->device copy of the plan), and `launch[n+1] - launch[n]` is the step
period; with the overlap pipeline the host prepares step n+1 while the GPU runs step n, so the gap is ~0.
Host-clock copies of the marks are kept too. Optionally a torch.profiler trace (CUDA activity only, so that
the host is not slowed down) covers `profile_steps` decode steps of at least `min_rows` rows after
`profile_skip` of them.

The worker has no hook for this yet: `install()` patches ModelRunner's prepare, launch and finish from a
`sitecustomize` that `step_timing_env` puts on the worker's PYTHONPATH (used by profile_decode and by
`bench_offline --step-timing`; see the README for the proposed three-line hook that replaces the patch).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from radixserve.benchmarks.gc_pauses import GcPauses

ENV = "RADIXSERVE_STEP_TIMING"

# Columns of a step record (load_steps' arrays); times in ms: device marks since the clock's base, host marks
# since the timer's host base (`host_base_ns` in the dump, a time.perf_counter_ns() of the worker).
STEP, ROWS, TOKENS, BEGIN, LAUNCH, END, HOST_BEGIN, HOST_LAUNCH, HOST_END = range(9)


@dataclass(frozen=True, slots=True)
class StepTimingConfig:
    out_dir: str  # each worker process writes steps-<pid>.json here at exit
    min_rows: int = 1  # the profiler window counts decode steps of at least this many rows
    profile_skip: int = 20
    profile_steps: int = 0  # 0: no torch.profiler trace
    trace_path: str = ""
    profile_mixed: bool = False  # the window counts steps with prompt tokens instead of decode steps
    profile_host: bool = False  # the window also records host-side torch ops (their host durations)
    max_steps: int = 200_000

    def to_env(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_env(cls) -> StepTimingConfig | None:
        raw = os.environ.get(ENV)
        return cls(**json.loads(raw)) if raw else None


class _Clock:
    """Marks on the device's timeline: CUDA events on the current stream, or the host clock on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.base: Any = self.mark()

    def mark(self) -> Any:
        if not self.cuda:
            return time.perf_counter_ns()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def ms(self, mark: Any) -> float:
        """Milliseconds since the clock's base; call after the device synchronized."""
        if mark is None:
            return float("nan")
        if not self.cuda:
            return (mark - self.base) / 1e6
        return float(self.base.elapsed_time(mark))


class StepTimer:
    def __init__(self, cfg: StepTimingConfig, device: torch.device) -> None:
        self.cfg = cfg
        self.device = device
        self.clock = _Clock(device)
        self.host_base = time.perf_counter_ns()
        # Per step: [step, rows, tokens, begin, launch, end, host_begin, host_launch, host_end].
        self.records: list[list[Any]] = []
        # Steps begun and not ended yet: a worker prepares the next step while one waits for its grammar
        # masks.
        self.open: dict[int, list[Any]] = {}
        self.matching = 0  # decode steps of min_rows rows or more seen
        self.profiler: Any = None
        # Steps whose timing the profiler disturbed: [the one it started before, the one it stopped before].
        self.profiled: list[int] = []
        self.gc_pauses = GcPauses().install()

    # -- the three marks -----------------------------------------------------------------------------------

    def begin(self, plan: Any) -> None:
        rows = len(plan.req_rows) // 4
        tokens = len(plan.out_slots) // 4
        self._profile_window(plan.step, rows, tokens)
        if len(self.records) + len(self.open) >= self.cfg.max_steps:
            return
        mark, host = self.clock.mark(), self._host()
        self.open[plan.step] = [plan.step, rows, tokens, mark, None, None, host, None, None]

    def launch(self, step: int) -> None:
        if (record := self.open.get(step)) is not None:
            record[4] = self.clock.mark()
            record[7] = self._host()

    def end(self, step: int) -> None:
        if (record := self.open.pop(step, None)) is not None:
            record[5] = self.clock.mark()
            record[8] = self._host()
            self.records.append(record)

    def _host(self) -> float:
        return (time.perf_counter_ns() - self.host_base) / 1e6

    # -- the optional profiler window ----------------------------------------------------------------------

    def _profile_window(self, step: int, rows: int, tokens: int) -> None:
        cfg = self.cfg
        kind_ok = tokens > rows if cfg.profile_mixed else tokens == rows
        if not cfg.profile_steps or rows < cfg.min_rows or not kind_ok:
            if self.profiler is not None:  # the steady state ended before the window did
                self._stop_profiler(step)
            return
        self.matching += 1
        if self.matching == cfg.profile_skip + 1:
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CUDA] if self.clock.cuda else [ProfilerActivity.CPU]
            if cfg.profile_host and ProfilerActivity.CPU not in activities:
                activities.append(ProfilerActivity.CPU)
            self.profiler = profile(activities=activities)
            self.profiler.start()
            self.profiled = [step, step]
        elif self.matching == cfg.profile_skip + cfg.profile_steps + 1 and self.profiler is not None:
            self._stop_profiler(step)

    def _stop_profiler(self, step: int) -> None:
        self.profiled[1] = step
        self.profiler.stop()
        Path(self.cfg.trace_path).parent.mkdir(parents=True, exist_ok=True)
        self.profiler.export_chrome_trace(self.trace_path)
        self.profiler = None

    @property
    def trace_path(self) -> str:
        """The configured path for tensor-parallel rank 0 (and one GPU); other ranks add `.rank<r>`."""
        import torch.distributed as dist

        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        return self.cfg.trace_path if rank == 0 else f"{self.cfg.trace_path}.rank{rank}"

    # -- results -------------------------------------------------------------------------------------------

    def dump(self) -> Path:
        if self.profiler is not None:
            self._stop_profiler(self.records[-1][0] + 1 if self.records else 0)
        if self.clock.cuda:
            torch.cuda.synchronize(self.device)
        steps = [
            [step, rows, tokens, *(self.clock.ms(m) for m in (b, la, e)), hb, hl, he]
            for step, rows, tokens, b, la, e, hb, hl, he in self.records
        ]
        path = Path(self.cfg.out_dir) / f"steps-{os.getpid()}.json"
        body = {
            "device": str(self.device),
            "clock": "cuda_events" if self.clock.cuda else "host",
            "columns": ["step", "rows", "tokens", "begin_ms", "launch_ms", "end_ms",
                        "host_begin_ms", "host_launch_ms", "host_end_ms"],
            "steps": steps,
            "host_base_ns": self.host_base,
            "trace": self.trace_path if self.cfg.profile_steps else None,
            "profiled_steps": self.profiled,
            "gc_records": self.gc_pauses.records,
        }
        path.write_text(json.dumps(body), encoding="utf-8")
        return path


def install(cfg: StepTimingConfig) -> None:
    """Patch the worker's ModelRunner so that every step is timed; results are written at exit."""
    from radixserve.actors import model_runner

    timers: list[StepTimer] = []
    runner_cls = model_runner.ModelRunner
    prepare, launch, finish = runner_cls.prepare, runner_cls.launch, runner_cls.finish

    def timed_prepare(self: Any, plan: Any) -> Any:
        if not timers:
            timers.append(StepTimer(cfg, self.device))
            atexit.register(timers[0].dump)
        timers[0].begin(plan)
        return prepare(self, plan)

    def timed_launch(self: Any, prep: Any) -> Any:
        timers[0].launch(prep.plan.step)
        return launch(self, prep)

    def timed_finish(self: Any, launched: Any, *args: Any) -> Any:
        try:
            return finish(self, launched, *args)
        finally:
            timers[0].end(launched.prep.plan.step)

    runner_cls.prepare = timed_prepare  # type: ignore[method-assign]
    runner_cls.launch = timed_launch  # type: ignore[method-assign]
    runner_cls.finish = timed_finish  # type: ignore[method-assign]


# The sitecustomize that step_timing_env writes into a folder on the worker's PYTHONPATH. It patches only the
# GPU worker process, then hands over to any other sitecustomize on the path.
SITECUSTOMIZE = f'''\
import os, sys
if os.environ.get("{ENV}") and any("gpu_worker" in a for a in getattr(sys, "orig_argv", ())):
    from radixserve.benchmarks.step_timer import StepTimingConfig, install
    install(StepTimingConfig.from_env())
_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
_self = sys.modules.pop("sitecustomize")
try:
    import sitecustomize  # noqa: F401  (the next one on the path, if any)
except ImportError:
    sys.modules["sitecustomize"] = _self
'''


def write_sitecustomize(folder: Path) -> None:
    (folder / "sitecustomize.py").write_text(SITECUSTOMIZE, encoding="utf-8")


@contextlib.contextmanager
def step_timing_env(cfg: StepTimingConfig, shim_dir: Path) -> Iterator[None]:
    """Inside the block, worker processes started by this one time their steps (environment set for them);
    each writes its dump into cfg.out_dir at exit."""
    write_sitecustomize(shim_dir)
    saved = {k: os.environ.get(k) for k in (ENV, "PYTHONPATH")}
    os.environ[ENV] = cfg.to_env()
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(shim_dir), saved["PYTHONPATH"]) if p)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def load_steps(out_dir: str | Path) -> list[dict[str, Any]]:
    """Every worker's dump in `out_dir`, each as {"device", "clock", "steps": ndarray [N, 9], "trace"}."""
    dumps = []
    for path in sorted(Path(out_dir).glob("steps-*.json")):
        body = json.loads(path.read_text(encoding="utf-8"))
        body["steps"] = np.array(body["steps"], dtype=np.float64).reshape(-1, len(body["columns"]))
        dumps.append(body)
    return dumps


def steps_between(dump: dict[str, Any], start_ns: int, end_ns: int) -> np.ndarray:
    """The dump's steps that the worker began between two time.perf_counter_ns() of this process (a
    system-wide monotonic clock on Linux), in step order; all of them if the dump has no host base."""
    steps = dump["steps"]
    if dump.get("host_base_ns") is not None:
        begun_ns = dump["host_base_ns"] + steps[:, HOST_BEGIN] * 1e6
        steps = steps[(begun_ns >= start_ns) & (begun_ns <= end_ns)]
    return steps[np.argsort(steps[:, STEP], kind="stable")]
