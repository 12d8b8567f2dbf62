"""What every benchmark shares: the record of how a run was made, its JSON result file, the printed table,
and the engine flags (one per EngineConfig field, so they never drift from the config).

A result file is one JSON object:

    {"benchmark": "bench_offline", "run": {device, git_commit, command, params, ...}, "result": {...}}
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

PACKAGE_DIR = Path(__file__).resolve().parent.parent
# On the GPU machine the working tree arrives without .git: pass the commit in this variable.
GIT_COMMIT_ENV = "RADIXSERVE_GIT_COMMIT"
# Where result files go when --result-dir is not given: the device tool's $OUT when it is set.
DEFAULT_RESULT_DIR = os.environ.get("OUT") or "bench_results"


@dataclasses.dataclass(frozen=True, slots=True)
class RunInfo:
    benchmark: str
    device: str  # the card's name (torch.cuda.get_device_name), or "cpu"
    num_gpus: int  # visible CUDA devices
    git_commit: str
    git_dirty: bool | None  # None: unknown (no .git)
    command: str
    params: dict[str, Any]
    started_at: str
    python: str
    torch: str
    host: str


def device_name(device: str = "auto") -> str:
    """The accelerator a run uses: the CUDA card's name, or "cpu"."""
    import torch

    if device != "cpu" and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return "cpu"


def git_commit() -> tuple[str, bool | None]:
    """(HEAD's sha, whether the tree differs from it); read-only git calls only."""
    if sha := os.environ.get(GIT_COMMIT_ENV):
        return sha, None
    try:
        sha = subprocess.run(
            ["git", "-C", str(PACKAGE_DIR), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        # NOTE: --no-optional-locks keeps `status` from refreshing (writing) the index.
        status = subprocess.run(
            ["git", "--no-optional-locks", "-C", str(PACKAGE_DIR), "status", "--porcelain", "-uno"],
            capture_output=True, text=True, check=True,
        ).stdout
        return sha, bool(status.strip())
    except (OSError, subprocess.CalledProcessError):
        return "unknown", None


def run_info(benchmark: str, args: argparse.Namespace, device: str | None = None) -> RunInfo:
    import torch

    sha, dirty = git_commit()
    params = {k: v for k, v in vars(args).items() if not k.startswith("_")}
    return RunInfo(
        benchmark=benchmark,
        device=device if device is not None else device_name(getattr(args, "device", "auto") or "auto"),
        num_gpus=torch.cuda.device_count(),
        git_commit=sha,
        git_dirty=dirty,
        command=shlex.join(["python", "-m", f"radixserve.benchmarks.{benchmark}", *sys.argv[1:]]),
        params=params,
        started_at=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        python=platform.python_version(),
        torch=torch.__version__,
        host=platform.node(),
    )


def write_result(result_dir: str | Path, info: RunInfo, result: Any) -> Path:
    """Write {benchmark, run, result} to `<result_dir>/<benchmark>-<time>.json`; return the path."""
    folder = Path(result_dir)
    folder.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = folder / f"{info.benchmark}-{stamp}.json"
    n = 1
    while path.exists():
        path = folder / f"{info.benchmark}-{stamp}-{n}.json"
        n += 1
    body = {"benchmark": info.benchmark, "run": dataclasses.asdict(info), "result": result}
    path.write_text(json.dumps(body, indent=2, default=_plain) + "\n", encoding="utf-8")
    return path


def _plain(value: Any) -> Any:
    """JSON for what json does not know: dataclasses, numpy scalars and arrays."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return value.tolist()
    return str(value)


def print_table(title: str, rows: Sequence[tuple[str, Any]], width: int = 60) -> None:
    """SGLang's result layout: a titled rule, then `name: value` lines."""
    print(f"\n{f' {title} ':=^{width}}")
    for name, value in rows:
        text = f"{value:.2f}" if isinstance(value, float) else str(value)
        print(f"{name + ':':<{width - 16}}{text:>16}")
    print("=" * width)


def print_grid(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A plain column table (one row per configuration)."""
    cells = [[f"{c:.2f}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]
    print("  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True)))
    for row in cells:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--result-dir", default=DEFAULT_RESULT_DIR, help="JSON result folder ($OUT if set)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the dataset (SGLang's default: 1)")


# ----------------------------------------------------------------------------------------------------------
# engine flags
# ----------------------------------------------------------------------------------------------------------

# EngineConfig fields that are not flags here: the model path is positional-ish (--model-path), `extra` is a
# dict, and the rest only matter to the HTTP server.
_NOT_FLAGS = frozenset({"model_path", "extra", "served_model_name", "log_requests"})
_ALIASES = {"tp_size": ("--tp",), "dp_size": ("--dp",)}  # SGLang's short spellings


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """One `--field-name` flag per EngineConfig field; unset flags keep EngineConfig's defaults."""
    from radixserve.config import EngineConfig

    group = parser.add_argument_group("engine (EngineConfig fields)")
    for f in dataclasses.fields(EngineConfig):
        if f.name in _NOT_FLAGS:
            continue
        flags = ("--" + f.name.replace("_", "-"), *_ALIASES.get(f.name, ()))
        kind = str(f.type)
        if kind == "bool":
            group.add_argument(*flags, dest=f.name, action="store_true", default=None)
        elif "int" in kind:
            group.add_argument(*flags, dest=f.name, type=int, default=None)
        elif "float" in kind:
            group.add_argument(*flags, dest=f.name, type=float, default=None)
        else:
            group.add_argument(*flags, dest=f.name, type=str, default=None)


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The EngineConfig fields given on the command line."""
    from radixserve.config import EngineConfig

    names = {f.name for f in dataclasses.fields(EngineConfig)} - _NOT_FLAGS
    return {name: value for name in names if (value := getattr(args, name, None)) is not None}
