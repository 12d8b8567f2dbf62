"""The worker-only process of node k > 0 in multi-node tensor parallelism:

    node 0:  python -m radixserve.launch_server --tp 4 --nnodes 2 --node-rank 0 --dist-init-addr 10.0.0.1:5000
    node 1:  python -m radixserve.launch_server --tp 4 --nnodes 2 --node-rank 1 --dist-init-addr 10.0.0.1:5000
             (or python -m radixserve.actors.worker_node with the same four flags)

Starts the worker processes of ranks k*tp/nnodes .. (k+1)*tp/nnodes - 1 of this node. Each connects over TCP
to node 0's engine at HOST:PORT+1 (retrying until it listens), says WorkerHello(rank), receives InitWorker
(model, KV size, device cuda:(rank % (tp/nnodes)), the torch.distributed rendezvous tcp://HOST:PORT) and then
every StepPlan. There is no scheduler or ingress here: node 0 owns both.

This process only supervises: when one of its workers fails it kills the others, and it exits once all have
exited. The workers exit when the engine shuts down, or when it closes their connections (it does so for the
whole group as soon as any rank, on any node, dies), so nothing here can outlive a failed group.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import subprocess
import sys
import time

from radixserve.config import EngineConfig


def node_ranks(config: EngineConfig) -> range:
    per_node = config.tp_size // config.nnodes
    return range(config.node_rank * per_node, (config.node_rank + 1) * per_node)


def _die_with_parent() -> None:
    """In the child, before exec: SIGKILL it when this supervisor dies, however it dies (Linux only)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def run_worker_node(config: EngineConfig, threads: int = 0, poll: float = 0.2) -> int:
    """Run this node's workers until they have all exited; the exit status: 0, or the first failure's."""
    if config.nnodes < 2 or config.node_rank == 0:
        raise ValueError("a worker-only node needs nnodes > 1 and node_rank > 0 (node 0 runs the engine)")
    host, port = config.dist_init_endpoint()
    ranks = node_ranks(config)
    if not threads:
        threads = max(1, (os.cpu_count() or 1) // len(ranks))
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "radixserve.actors.gpu_worker", "--connect", f"{host}:{port + 1}",
             "--rank", str(rank), "--threads", str(threads),
             "--connect-timeout", str(config.worker_start_timeout)],
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
        for rank in ranks
    ]  # fmt: skip

    def stop(*_: object) -> None:
        for p in procs:
            if p.poll() is None:
                p.kill()

    signal.signal(signal.SIGTERM, stop)
    status = 0
    try:
        while any(p.poll() is None for p in procs):
            failed = [p.returncode for p in procs if p.returncode not in (None, 0)]
            if failed and status == 0:
                status = failed[0]
                stop()  # the group is lost: peers blocked in a collective would wait for the dead rank
            time.sleep(poll)
    finally:
        stop()
        for p in procs:
            p.wait()
    return status or next((p.returncode for p in procs if p.returncode), 0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="radixserve worker-only node (multi-node TP)")
    parser.add_argument("--tp-size", "--tp", dest="tp_size", type=int, required=True)
    parser.add_argument("--nnodes", type=int, required=True)
    parser.add_argument("--node-rank", type=int, required=True)
    parser.add_argument("--dist-init-addr", required=True, help="node 0's HOST:PORT")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per worker (CPU)")
    args = parser.parse_args(argv)
    try:
        config = EngineConfig(
            tp_size=args.tp_size, nnodes=args.nnodes, node_rank=args.node_rank,
            dist_init_addr=args.dist_init_addr,
        )
        code = run_worker_node(config, threads=args.threads)
    except ValueError as e:
        print(f"radixserve worker node: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
