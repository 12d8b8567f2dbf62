"""Engine: builds the actors, starts the worker process, and is the async API of radixserve.

    async with Engine() as engine:                       # the default model
        out = await engine.generate("The capital of France is", {"max_new_tokens": 16})
        async for delta in engine.stream(messages=[{"role": "user", "content": "Hi"}]):
            print(delta.text, end="")

Cancelling the task awaiting `generate` (or leaving a `stream` loop early) aborts the request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import os
import sys
import tempfile
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from typing import Any

import anyio
import anyio.abc
import torch

from radixserve.actors.detokenizer import Detokenizer
from radixserve.actors.ingress import Ingress, ModelLimits, RequestHandle
from radixserve.actors.mailbox import Inbox, Outbox, SocketMailbox, mailbox
from radixserve.actors.messages import (
    DetokenizerInbox,
    EngineFailed,
    FlushCache,
    IngressInbox,
    InitWorker,
    RequestOutput,
    SchedulerInbox,
    Shutdown,
    WorkerFailed,
    WorkerOutbox,
    WorkerReady,
)
from radixserve.actors.scheduler import Scheduler, pump_worker_results
from radixserve.actors.scheduler_core import SchedulerConfig, SchedulerCore
from radixserve.config import EngineConfig
from radixserve.errors import EngineDeadError, RequestAbortedError
from radixserve.models.config import ModelConfig
from radixserve.models.source import load_hf_config_dict, resolve_model_source
from radixserve.models.tokenizer import load_tokenizer
from radixserve.outputs import FinishReason, GenerateOutput, StreamDelta, TokenLogprob, Usage
from radixserve.sampling_params import SamplingParams

MAILBOX_CAPACITY = 4096
logger = logging.getLogger(__name__)


class Engine:
    def __init__(self, model_path: str | None = None, config: EngineConfig | None = None, **kwargs: Any) -> None:
        base = config or EngineConfig()
        self.config = replace(base, model_path=model_path if model_path is not None else base.model_path, **kwargs)
        self._stack: contextlib.AsyncExitStack | None = None
        self._procs: list[anyio.abc.Process] = []
        self.model_config: ModelConfig | None = None
        self.tokenizer: Any = None
        self.context_length = 0
        self.ready: WorkerReady | None = None

    # -------------------------------------------------------------------------------------- lifecycle

    async def __aenter__(self) -> Engine:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.shutdown()

    async def start(self) -> None:
        cfg = self.config
        source = resolve_model_source(cfg.model_path)
        self.model_config = ModelConfig.from_hf_dict(load_hf_config_dict(source))
        self.tokenizer = await anyio.to_thread.run_sync(load_tokenizer, source)
        device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
        context = min(cfg.context_length or self.model_config.max_position_embeddings,
                      self.model_config.max_position_embeddings if cfg.context_length is None else cfg.context_length)
        max_rows = cfg.max_running_requests + 1

        stack = contextlib.AsyncExitStack()
        self._stack = stack
        await stack.__aenter__()
        try:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="radixserve-"))
            worker = await self._start_worker(stack, os.path.join(tmp, "worker-0.sock"), InitWorker(
                rank=0, tp_size=1, model_path=cfg.model_path, dtype=dtype, device=device, context_length=context,
                max_rows=max_rows, max_total_tokens=cfg.max_total_tokens,
                mem_fraction_static=cfg.mem_fraction_static or 0.85, cpu_kv_gib=cfg.cpu_kv_gib,
                attention_backend=cfg.attention_backend, random_seed=cfg.random_seed,
                disable_cuda_graph=cfg.disable_cuda_graph, cuda_graph_max_bs=cfg.cuda_graph_max_bs,
            ))
            assert self.ready is not None
            # A lone request must always fit the pool, so that memory pressure can always be resolved.
            self.context_length = min(context, self.ready.num_slots - 1)
            await self._start_actors(stack, worker, max_rows)
        except BaseException:
            await self.shutdown()
            raise

    async def _start_worker(
        self, stack: contextlib.AsyncExitStack, path: str, init: InitWorker
    ) -> SocketMailbox[WorkerOutbox]:
        listener = await anyio.create_unix_listener(path)
        stack.push_async_callback(listener.aclose)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        proc = await anyio.open_process(
            [sys.executable, "-m", "radixserve.actors.gpu_worker", "--socket", path], stdout=None, stderr=None,
            env=env,
        )
        self._procs.append(proc)
        with anyio.fail_after(self.config.worker_start_timeout):
            async with anyio.create_task_group() as tg:
                async def watch() -> None:
                    code = await proc.wait()
                    raise EngineDeadError(f"worker process exited with code {code} during start-up")
                tg.start_soon(watch)
                stream = await listener.accept()
                worker: SocketMailbox[WorkerOutbox] = SocketMailbox(stream, WorkerOutbox)
                await worker.send(init)
                reply = await worker.receive()
                tg.cancel_scope.cancel()
        match reply:
            case WorkerReady():
                self.ready = reply
            case WorkerFailed():
                raise EngineDeadError(reply.message)
            case _:
                raise EngineDeadError(f"unexpected first message from the worker: {type(reply).__name__}")
        return worker

    async def _start_actors(
        self, stack: contextlib.AsyncExitStack, worker: SocketMailbox[WorkerOutbox], max_rows: int
    ) -> None:
        cfg, ready, mc = self.config, self.ready, self.model_config
        assert ready is not None and mc is not None
        to_scheduler, scheduler_inbox = mailbox(SchedulerInbox, MAILBOX_CAPACITY)
        to_detok, detok_inbox = mailbox(DetokenizerInbox, MAILBOX_CAPACITY)
        to_ingress, ingress_inbox = mailbox(IngressInbox, MAILBOX_CAPACITY)
        self._mailboxes: list[Outbox[Any] | Inbox[Any]] = [
            to_scheduler, scheduler_inbox, to_detok, detok_inbox, to_ingress, ingress_inbox
        ]
        core = SchedulerCore(SchedulerConfig(
            num_slots=ready.num_slots, max_rows=max_rows, chunked_prefill_size=cfg.chunked_prefill_size,
            max_prefill_tokens=cfg.max_prefill_tokens, max_running_requests=cfg.max_running_requests,
            schedule_policy=cfg.schedule_policy, disable_radix_cache=cfg.disable_radix_cache,
            overlap=not cfg.disable_overlap_schedule, new_token_ratio=cfg.new_token_ratio,
            min_new_token_ratio=cfg.min_new_token_ratio,
        ))
        self.scheduler = Scheduler(core, scheduler_inbox, [worker], to_detok)
        self.detokenizer = Detokenizer(self.tokenizer, detok_inbox, to_ingress, to_scheduler)
        eos = tuple(sorted(set(mc.eos_token_ids) | ({self.tokenizer.eos_token_id} - {None})))
        max_outstanding = None
        if cfg.max_queued_requests is not None:
            max_outstanding = cfg.max_running_requests + cfg.max_queued_requests
        self.ingress = Ingress(
            self.tokenizer, ModelLimits(self.context_length, ready.vocab_size, eos), ingress_inbox,
            to_scheduler, to_detok, max_outstanding, cfg.chat_template,
        )
        self._worker = worker
        self._to_scheduler = to_scheduler
        # The actors run in a task of their own, not in the caller's: `async with Engine()` may be entered and
        # exited from different tasks (ASGI lifespans, pytest fixtures), which a task group cannot span.
        self._actors_task = asyncio.get_running_loop().create_task(self._run_actors(worker, to_scheduler, to_ingress))

    async def _run_actors(
        self,
        worker: SocketMailbox[WorkerOutbox],
        to_scheduler: Outbox[SchedulerInbox],
        to_ingress: Outbox[IngressInbox],
    ) -> None:
        async def supervise(name: str, run: Any) -> None:
            try:
                await run()
                message = f"the {name} stopped"
            except Exception as e:
                message = f"the {name} crashed: {type(e).__name__}: {e}"
                logger.exception(message)
            self.ingress.fail_all(message)

        async def worker_results() -> None:
            await pump_worker_results(worker, 0, to_scheduler)
            # The scheduler turned the death into per-request errors; no new request may wait forever either.
            with contextlib.suppress(Exception):
                await to_ingress.send(EngineFailed("the worker process died"))

        async with anyio.create_task_group() as tg:
            tg.start_soon(supervise, "scheduler", self.scheduler.run)
            tg.start_soon(supervise, "detokenizer", self.detokenizer.run)
            tg.start_soon(supervise, "ingress", self.ingress.run)
            tg.start_soon(worker_results)

    async def shutdown(self) -> None:
        with anyio.CancelScope(shield=True):
            worker = getattr(self, "_worker", None)
            if worker is not None:
                with contextlib.suppress(Exception):
                    await worker.send(Shutdown())
            for proc in self._procs:
                with anyio.move_on_after(5):
                    await proc.wait()
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
            self._procs.clear()
            task = getattr(self, "_actors_task", None)
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                self._actors_task = None
            for box in getattr(self, "_mailboxes", []):
                box.close()
            if worker is not None:
                with contextlib.suppress(Exception):
                    await worker.aclose()
            if self._stack is not None:
                stack, self._stack = self._stack, None
                await stack.aclose()

    # -------------------------------------------------------------------------------------- requests

    async def open(
        self,
        prompt: str | None = None,
        sampling_params: SamplingParams | dict[str, Any] | None = None,
        *,
        input_ids: Sequence[int] | None = None,
        messages: list[dict[str, Any]] | None = None,
        rid: str | None = None,
    ) -> RequestHandle:
        if self._stack is None:
            raise EngineDeadError("the engine is not running (use `async with Engine(...)`)")
        return await self.ingress.open(
            prompt=prompt, input_ids=input_ids, messages=messages, sampling_params=sampling_params, rid=rid
        )

    async def outputs(self, handle: RequestHandle) -> AsyncIterator[RequestOutput]:
        """The request's outputs until it finishes; leaving early (or being cancelled) aborts it."""
        try:
            async for out in handle.outputs:
                if out.error is not None and out.finish_reason in (None, FinishReason.ABORT):
                    handle.finished = True
                    raise EngineDeadError(out.error) if self.ingress.dead else RequestAbortedError(out.error)
                yield out
                if out.finish_reason is not None:
                    handle.finished = True
                    return
            if not handle.finished:
                raise EngineDeadError(self.ingress.dead or "the engine stopped")
        finally:
            handle.outputs.close()
            if not handle.finished:
                with anyio.CancelScope(shield=True):
                    await self.ingress.abort(handle.rid)

    async def stream(
        self,
        prompt: str | None = None,
        sampling_params: SamplingParams | dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[StreamDelta]:
        handle = await self.open(prompt, sampling_params, **kwargs)
        async for out in self.outputs(handle):
            yield StreamDelta(
                rid=out.rid, text=out.text, token_ids=out.token_ids, logprobs=out.logprobs,
                finish_reason=out.finish_reason, matched_stop=out.matched_stop, usage=out.usage,
                prompt_logprobs=out.prompt_logprobs,
            )

    async def generate(
        self,
        prompt: str | None = None,
        sampling_params: SamplingParams | dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> GenerateOutput:
        handle = await self.open(prompt, sampling_params, **kwargs)
        text: list[str] = []
        tokens: list[int] = []
        logprobs: list[TokenLogprob] | None = [] if handle.params.logprobs is not None else None
        prompt_logprobs = None
        last: RequestOutput | None = None
        async for out in self.outputs(handle):
            text.append(out.text)
            tokens.extend(out.token_ids)
            if logprobs is not None and out.logprobs:
                logprobs.extend(out.logprobs)
            prompt_logprobs = prompt_logprobs or out.prompt_logprobs
            last = out
        assert last is not None and last.finish_reason is not None
        return GenerateOutput(
            rid=handle.rid, text="".join(text), token_ids=tokens, prompt_token_ids=handle.prompt_ids,
            finish_reason=last.finish_reason, usage=last.usage or Usage(len(handle.prompt_ids), len(tokens), 0),
            matched_stop=last.matched_stop, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
        )

    # -------------------------------------------------------------------------------------- introspection

    async def wait_idle(self, timeout: float = 30.0) -> None:
        with anyio.fail_after(timeout):
            while not self.scheduler.idle or self.ingress.num_outstanding:
                await anyio.sleep(0.01)

    async def check_integrity(self) -> None:
        """Wait until idle, then check the KV pool: free + cached == total, no leaked rows."""
        await self.wait_idle()
        self.scheduler.core.check_integrity()
        if self.scheduler.core.kv.private_slots:
            raise AssertionError(f"{self.scheduler.core.kv.private_slots} KV slots leaked while idle")




    def pool_stats(self) -> dict[str, int]:
        """KV pool occupancy in tokens: total == free + cached (evictable + locked) + held (private)."""
        kv = self.scheduler.core.kv
        return {
            "total": kv.total_slots,
            "free": kv.allocator.available_size,
            "cached": kv.tree.evictable_size + kv.tree.locked_size,
            "locked": kv.tree.locked_size,
            "held": kv.private_slots,
            "running_requests": len(self.scheduler.core.running),
            "waiting_requests": len(self.scheduler.core.waiting),
        }

    async def abort(self, rid: str) -> None:
        await self.ingress.abort(rid)

    async def flush_cache(self) -> None:
        """Drop the prefix cache as soon as the engine is idle."""
        await self._to_scheduler.send(FlushCache())
