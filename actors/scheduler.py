"""The scheduler actor: owns the radix tree and the KV slot allocator (through SchedulerCore), issues step
plans to every worker, applies rank 0's results and streams token updates to the detokenizer.

Loop: drain the inbox, issue as many plans as the pipeline allows (two in flight with overlap), and block on
the inbox only when nothing can be issued, which is when a worker result (or new work) must come first.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import assert_never

from radixserve.actors.mailbox import Inbox, MailboxClosed, Outbox, SocketMailbox
from radixserve.actors.messages import (
    AbortRequest,
    DetokenizerInbox,
    FlushCache,
    RequestUpdate,
    SchedulerInbox,
    StepMask,
    StepPlan,
    StepResult,
    SubmitRequest,
    TokenBatch,
    WorkerDied,
    WorkerFailed,
    WorkerOutbox,
)
from radixserve.actors.scheduler_core import SchedulerCore
from radixserve.outputs import FinishReason

logger = logging.getLogger(__name__)


class Scheduler:
    def __init__(
        self,
        core: SchedulerCore,
        inbox: Inbox[SchedulerInbox],
        workers: Sequence[SocketMailbox[WorkerOutbox]],
        detokenizer: Outbox[DetokenizerInbox],
        check_integrity_when_idle: bool = False,
    ) -> None:
        self.core = core
        self.inbox = inbox
        self.workers = list(workers)
        self.detokenizer = detokenizer
        self.check_integrity_when_idle = check_integrity_when_idle
        self.dead: str | None = None
        self._flush_requested = False

    @property
    def idle(self) -> bool:
        return not self.core.has_work and self.core.num_inflight_steps == 0

    async def run(self) -> None:
        try:
            while True:
                for msg in self.inbox.drain():
                    await self._handle(msg)
                plan = None if self.dead else self.core.schedule()
                if plan is not None:
                    await self._send_to_workers(plan)
                    continue
                if self.idle:
                    self._on_idle()
                await self._handle(await self.inbox.receive())
        except MailboxClosed:
            return

    async def _handle(self, msg: SchedulerInbox) -> None:
        match msg:
            case SubmitRequest():
                if self.dead:
                    await self._publish([RequestUpdate(msg.rid, [], finish_reason=FinishReason.ABORT,
                                                       error=self.dead)])
                else:
                    self.core.submit(msg)
            case AbortRequest():
                await self._publish(self.core.abort(msg.rid, msg.reason))
            case StepResult():
                if not self.dead:
                    updates = self.core.apply(msg)
                    if (mask := self.core.take_step_mask()) is not None:
                        # The step in flight waits for these before sampling: they go before anything else
                        # (measured: sending the next plan first lengthens the chain result -> masks).
                        await self._send_to_workers(mask)
                    await self._publish(updates)
            case FlushCache():
                self._flush_requested = True
            case WorkerDied():
                if self.dead is None:
                    self.dead = f"worker {msg.rank} died: {msg.message}"
                    logger.error(self.dead)
                    await self._publish(self.core.fail_all(self.dead))
            case _:
                assert_never(msg)

    async def _send_to_workers(self, msg: StepPlan | StepMask) -> None:
        for worker in self.workers:
            try:
                await worker.send(msg)
            except MailboxClosed:
                await self._handle(WorkerDied(0, "a worker process closed its connection"))
                return

    def _on_idle(self) -> None:
        if self._flush_requested:
            self._flush_requested = not self.core.kv.flush()
        if self.check_integrity_when_idle:
            self.core.check_integrity()

    async def _publish(self, updates: list[RequestUpdate]) -> None:
        if updates:
            await self.detokenizer.send(TokenBatch(updates))


async def pump_worker_results(
    worker: SocketMailbox[WorkerOutbox], rank: int, scheduler_inbox: Outbox[SchedulerInbox]
) -> None:
    """Forward one worker's results into the scheduler's inbox; its death becomes a WorkerDied message."""
    message = "the worker process exited"
    try:
        while True:
            msg = await worker.receive()
            match msg:
                case StepResult():
                    await scheduler_inbox.send(msg)
                case WorkerFailed():
                    message = msg.message
                case _:
                    message = f"unexpected message from the worker: {type(msg).__name__}"
                    break
    except MailboxClosed:
        pass
    try:
        await scheduler_inbox.send(WorkerDied(rank, message))
    except MailboxClosed:
        pass
