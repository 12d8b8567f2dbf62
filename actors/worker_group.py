"""The engine's side of its worker processes: one `WorkerGroup` per data-parallel replica, each a
tensor-parallel group of tp_size processes joined by torch.distributed.

    replica g, rank r  ->  cuda:(g * tp + r) on node 0 (or the CPU); with --nnodes > 1 (dp 1), rank r runs on
                           node r // (tp / nnodes) as cuda:(r % (tp / nnodes))

Workers on this host are started here and connect to a Unix socket of their own. Workers on other nodes are
started by `worker_node.py` there and connect over TCP to `RemoteWorkers`, introducing themselves with
WorkerHello(rank). Every rank gets every StepPlan; rank 0 answers with the StepResults.

A group lives and dies as a whole: as soon as any rank's connection ends (its process died, or it reported
WorkerFailed), `supervise` kills every local process of the group and closes every connection. Ranks blocked
in a collective that waits for the dead one therefore never hang: local ones are killed, remote ones exit when
their connection closes (gpu_worker's hang-up watch).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import anyio
import anyio.abc
import msgspec

from radixserve.actors.mailbox import MailboxClosed, Outbox, SocketMailbox
from radixserve.actors.messages import (
    InitWorker,
    SchedulerInbox,
    Shutdown,
    WorkerFailed,
    WorkerHello,
    WorkerOutbox,
    WorkerReady,
)
from radixserve.actors.scheduler import pump_worker_results
from radixserve.errors import EngineDeadError
from radixserve.models.config import ModelConfig


@dataclass(frozen=True, slots=True)
class GroupSpec:
    """What one replica's workers run: `init` is rank 0's InitWorker (others differ in rank and device)."""

    replica: int
    init: InitWorker
    devices: Sequence[str]  # per rank, as that rank's host sees it: "cpu" or "cuda:N"
    local_ranks: range  # the ranks this host starts; the others connect from other nodes
    threads: int = 0  # torch threads per local worker process (0: torch's default)


class RemoteWorkers:
    """Node 0's TCP listener for the ranks of the other nodes (--nnodes > 1)."""

    def __init__(self, listener: anyio.abc.Listener[anyio.abc.SocketStream], ranks: Sequence[int]) -> None:
        self.listener = listener
        self._arrived = {r: anyio.Event() for r in ranks}
        self._workers: dict[int, SocketMailbox[WorkerOutbox]] = {}

    async def serve(self) -> None:
        """Accept connections until cancelled; each must say WorkerHello(rank) for an expected rank."""
        await self.listener.serve(self._handshake)

    async def _handshake(self, stream: anyio.abc.SocketStream) -> None:
        worker: SocketMailbox[WorkerOutbox] = SocketMailbox(stream, WorkerOutbox)
        hello = None
        with anyio.move_on_after(30), contextlib.suppress(MailboxClosed, msgspec.DecodeError):
            hello = await worker.receive()
        if (
            not isinstance(hello, WorkerHello)
            or hello.rank not in self._arrived
            or hello.rank in self._workers
        ):
            await worker.aclose()  # not one of ours, or a rank that is already here
            return
        self._workers[hello.rank] = worker
        self._arrived[hello.rank].set()

    async def get(self, rank: int) -> SocketMailbox[WorkerOutbox]:
        await self._arrived[rank].wait()
        return self._workers[rank]


class WorkerGroup:
    """One replica's worker processes and their connections, by rank."""

    def __init__(self, spec: GroupSpec) -> None:
        self.spec = spec
        self.size = spec.init.tp_size
        self.procs: dict[int, anyio.abc.Process] = {}  # local ranks only
        self.workers: list[SocketMailbox[WorkerOutbox] | None] = [None] * self.size
        self.readies: list[WorkerReady | None] = [None] * self.size
        self.dead = False

    @property
    def num_slots(self) -> int:
        """The KV pool the scheduler may use: the smallest of the ranks' (they may differ on GPUs)."""
        return min(r.num_slots for r in self.readies if r is not None)

    @property
    def connections(self) -> list[SocketMailbox[WorkerOutbox]]:
        return [w for w in self.workers if w is not None]

    async def start_rank(self, rank: int, socket_dir: str, remote: RemoteWorkers | None) -> None:
        spec = self.spec
        if rank in spec.local_ranks:
            worker = await self._spawn(rank, os.path.join(socket_dir, f"worker-{spec.replica}-{rank}.sock"))
        else:
            assert remote is not None, f"rank {rank} is on another node but nothing listens for it"
            worker = await remote.get(rank)
        self.workers[rank] = worker
        init = msgspec.structs.replace(spec.init, rank=rank, device=spec.devices[rank])
        try:
            await worker.send(init)
            reply = await worker.receive()
        except MailboxClosed:
            raise EngineDeadError(f"{self._name(rank)} exited during start-up") from None
        match reply:
            case WorkerReady():
                self.readies[rank] = reply
            case WorkerFailed():
                raise EngineDeadError(reply.message)
            case _:
                raise EngineDeadError(f"{self._name(rank)} sent {type(reply).__name__}, not WorkerReady")

    async def _spawn(self, rank: int, path: str) -> SocketMailbox[WorkerOutbox]:
        listener = await anyio.create_unix_listener(path)
        try:
            command = [sys.executable, "-m", "radixserve.actors.gpu_worker", "--socket", path]
            if self.spec.threads:
                command += ["--threads", str(self.spec.threads)]
            proc = await anyio.open_process(
                command, stdout=None, stderr=None, env=dict(os.environ, PYTHONUNBUFFERED="1")
            )
            self.procs[rank] = proc
            stream: anyio.abc.SocketStream | None = None
            async with anyio.create_task_group() as tg:

                async def accept() -> None:
                    nonlocal stream
                    stream = await listener.accept()
                    tg.cancel_scope.cancel()

                async def watch() -> None:
                    await proc.wait()
                    tg.cancel_scope.cancel()

                tg.start_soon(accept)
                tg.start_soon(watch)
            if stream is None:
                raise EngineDeadError(f"{self._name(rank)} exited ({proc.returncode}) during start-up")
            return SocketMailbox(stream, WorkerOutbox)
        finally:
            await listener.aclose()

    def _name(self, rank: int) -> str:
        return f"worker process (replica {self.spec.replica}, rank {rank})"

    async def supervise(self, scheduler: Outbox[SchedulerInbox]) -> None:
        """Forward the ranks' results to the scheduler until the first rank is gone, then kill the group.

        The rank that went first tells the scheduler (WorkerDied), which fails the replica's requests."""
        async with anyio.create_task_group() as tg:
            for rank, worker in enumerate(self.workers):
                assert worker is not None

                async def pump(rank: int = rank, worker: SocketMailbox[WorkerOutbox] = worker) -> None:
                    await pump_worker_results(worker, rank, scheduler)
                    tg.cancel_scope.cancel()

                tg.start_soon(pump)
        await self.kill()

    async def kill(self) -> None:
        """Kill every local process and close every connection (remote ranks exit on the hang-up)."""
        self.dead = True
        for proc in self.procs.values():
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
        with anyio.CancelScope(shield=True):
            for worker in self.connections:
                with contextlib.suppress(Exception):
                    await worker.aclose()

    async def shutdown(self, grace: float = 5.0) -> None:
        """Ask every rank to stop; kill what has not exited after `grace` seconds; close the connections."""
        with anyio.CancelScope(shield=True):
            for worker in self.connections:
                with contextlib.suppress(Exception):
                    await worker.send(Shutdown())
            with anyio.move_on_after(grace):
                for proc in self.procs.values():
                    await proc.wait()
            await self.kill()
            for proc in self.procs.values():
                await proc.wait()


async def start_groups(
    groups: Sequence[WorkerGroup],
    socket_dir: str,
    start_timeout: float,
    remote: RemoteWorkers | None = None,
) -> None:
    """Start every rank of every group at once (the ranks of a group meet in a rendezvous, so they must) and
    wait for all their WorkerReady messages. Raises EngineDeadError naming the first failure; the caller then
    kills the groups."""
    errors: list[BaseException] = []
    with anyio.move_on_after(start_timeout) as deadline:
        async with anyio.create_task_group() as tg:

            async def start(group: WorkerGroup, rank: int) -> None:
                try:
                    await group.start_rank(rank, socket_dir, remote)
                except Exception as e:
                    errors.append(e)
                    tg.cancel_scope.cancel()

            async def accept_remote() -> None:
                assert remote is not None
                try:
                    await remote.serve()
                except Exception as e:
                    errors.append(e)
                    tg.cancel_scope.cancel()

            if remote is not None:
                tg.start_soon(accept_remote)

            async def start_all() -> None:
                async with anyio.create_task_group() as ranks:
                    for group in groups:
                        for rank in range(group.size):
                            ranks.start_soon(start, group, rank)
                tg.cancel_scope.cancel()  # every rank is ready: stop accepting remote connections

            tg.start_soon(start_all)
    if errors:
        error = errors[0]
        if isinstance(error, EngineDeadError):
            raise error
        raise EngineDeadError(f"{type(error).__name__}: {error}")
    if deadline.cancelled_caught:
        raise EngineDeadError(f"the worker processes did not all start within {start_timeout:.0f} s")


def check_tensor_parallel(config: ModelConfig, tp: int) -> None:
    """Raise ValueError, before any process starts, when the model's layers cannot be split tp ways."""
    if tp == 1:
        return
    problems = [
        f"{name} ({n}) is not divisible by tp_size {tp}"
        for name, n in (
            ("num_attention_heads", config.num_heads), ("intermediate_size", config.intermediate_size)
        )
        if n % tp
    ]
    kv = config.num_kv_heads
    if (kv >= tp and kv % tp) or (kv < tp and tp % kv):
        problems.append(f"num_key_value_heads ({kv}) must divide by, or divide, tp_size {tp}")
    if problems:
        raise ValueError("tensor parallelism: " + "; ".join(problems))
