"""Engine: builds the actors, starts the worker processes, and is the async API of radixserve.

With --dp-size D and --tp-size T it runs D replicas (a scheduler with its own radix tree and KV pool, and a
WorkerGroup of T processes: actors/worker_group.py) behind one ingress, whose Router (actors/router.py) sends
each request to the replica that most likely caches its prefix.

    async with Engine() as engine:                       # the default model
        out = await engine.generate("The capital of France is", {"max_new_tokens": 16})
        async for delta in engine.stream(messages=[{"role": "user", "content": "Hi"}]):
            print(delta.text, end="")

Cancelling the task awaiting `generate` (or leaving a `stream` loop early) aborts the request.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import secrets
import tempfile
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from typing import Any

import anyio
import anyio.abc
import torch
from msgspec.structs import replace as replace_struct

from radixserve.actors.detokenizer import Detokenizer
from radixserve.actors.grammar import GrammarCache
from radixserve.actors.ingress import Ingress, ModelLimits, RequestHandle
from radixserve.actors.mailbox import Inbox, Outbox, mailbox
from radixserve.actors.messages import (
    DetokenizerInbox,
    EngineFailed,
    FlushCache,
    IngressInbox,
    InitWorker,
    ReplicaFailed,
    RequestOutput,
    SchedulerInbox,
    WorkerReady,
)
from radixserve.actors.router import Router
from radixserve.actors.scheduler import Scheduler
from radixserve.actors.scheduler_config import SchedulerConfig
from radixserve.actors.scheduler_core import SchedulerCore
from radixserve.actors.worker_group import (
    GroupSpec,
    RemoteWorkers,
    WorkerGroup,
    check_tensor_parallel,
    start_groups,
)
from radixserve.config import EngineConfig
from radixserve.errors import EngineDeadError, RequestAbortedError, UnsupportedFeatureError
from radixserve.models.config import ModelConfig
from radixserve.models.source import load_hf_config_dict, resolve_model_source
from radixserve.models.tokenizer import load_tokenizer
from radixserve.outputs import FinishReason, GenerateOutput, StreamDelta, TokenLogprob, Usage
from radixserve.sampling_params import SamplingParams

MAILBOX_CAPACITY = 4096
logger = logging.getLogger(__name__)


class Engine:
    def __init__(
        self, model_path: str | None = None, config: EngineConfig | None = None, **kwargs: Any
    ) -> None:
        base = config or EngineConfig()
        self.config = replace(
            base, model_path=model_path if model_path is not None else base.model_path, **kwargs
        )
        self._stack: contextlib.AsyncExitStack | None = None
        self._procs: list[anyio.abc.Process] = []  # this host's worker processes, by replica then rank
        self._groups: list[WorkerGroup] = []
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
        if cfg.node_rank != 0:
            raise ValueError(
                f"node_rank {cfg.node_rank} runs workers only: python -m radixserve.actors.worker_node "
                "(node 0 runs the engine)"
            )
        source = resolve_model_source(cfg.model_path, need_weights=cfg.load_format != "dummy")
        self.model_config = ModelConfig.from_hf_dict(load_hf_config_dict(source))
        check_tensor_parallel(self.model_config, cfg.tp_size)
        self.tokenizer = await anyio.to_thread.run_sync(load_tokenizer, source)
        device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        if cfg.enable_flashinfer_allreduce_fusion and device != "cuda":
            raise UnsupportedFeatureError("--enable-flashinfer-allreduce-fusion needs CUDA GPUs")
        dtype = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
        context = min(cfg.context_length or self.model_config.max_position_embeddings,
                      self.model_config.max_position_embeddings if cfg.context_length is None
                      else cfg.context_length)
        max_rows = cfg.max_running_requests + 1
        # Every rank of a TP group must draw the same sampling noise: give them one seed (gpu_worker.py).
        seed = cfg.random_seed
        if seed is None and cfg.tp_size > 1:
            seed = secrets.randbits(62)

        stack = contextlib.AsyncExitStack()
        self._stack = stack
        await stack.__aenter__()
        try:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="radixserve-"))
            await self._start_workers(stack, tmp, device, InitWorker(
                rank=0, tp_size=cfg.tp_size, model_path=cfg.model_path, dtype=dtype, device=device,
                context_length=context, max_rows=max_rows, max_total_tokens=cfg.max_total_tokens,
                mem_fraction_static=cfg.mem_fraction_static or 0.85, cpu_kv_gib=cfg.cpu_kv_gib,
                attention_backend=cfg.attention_backend, random_seed=seed,
                disable_cuda_graph=cfg.disable_cuda_graph, cuda_graph_max_bs=cfg.cuda_graph_max_bs,
                load_format=cfg.load_format, kv_cache_dtype=cfg.kv_cache_dtype,
                enable_flashinfer_allreduce_fusion=cfg.enable_flashinfer_allreduce_fusion,
                # One-shot all-reduce needs peer access to every rank's memory: one host only.
                disable_custom_all_reduce=cfg.disable_custom_all_reduce or cfg.nnodes > 1,
            ))
            assert self.ready is not None
            # A lone request must always fit the pool, so that memory pressure can always be resolved.
            self.context_length = min(context, self.ready.num_slots - 1)
            await self._start_actors(max_rows)
            if not cfg.disable_gc_freeze:
                # What lives now (modules, tokenizer, configs) lives as long as the engine: out of the
                # cyclic GC's scans, whose full collections paused offline runs for ~0.3 s each (workers
                # do the same).
                gc.collect()
                gc.freeze()
                # After the freeze, every 10th gen-1 collection is a full one (the heap it compares against
                # is empty): three full collections of ~100-140 ms each paused a 20 s shared-prefix run on an
                # H100 (1,024 requests in flight). A tenth as many; cyclic garbage is rare here.
                gen0, gen1, gen2 = gc.get_threshold()
                gc.set_threshold(gen0, gen1, max(gen2, 100))
        except BaseException:
            with anyio.CancelScope(shield=True):
                for group in self._groups:
                    await group.kill()  # ranks may wait in a rendezvous for one that failed: no grace period
            await self.shutdown()
            raise

    async def _start_workers(
        self, stack: contextlib.AsyncExitStack, tmp: str, device: str, init: InitWorker
    ) -> None:
        """Start dp_size groups of tp_size workers (those of this node) and wait until every rank is ready."""
        cfg = self.config
        tp, per_node = cfg.tp_size, cfg.tp_size // cfg.nnodes
        local = per_node * cfg.dp_size  # worker processes on this host
        if device == "cuda" and torch.cuda.device_count() < local:
            raise ValueError(f"{local} GPUs needed (tp * dp / nnodes), {torch.cuda.device_count()} visible")
        # CPU workers share the cores: without a limit each would start a thread per core.
        threads = max(1, (os.cpu_count() or 1) // local) if device == "cpu" and local > 1 else 0
        remote = None
        if cfg.nnodes > 1:
            host, port = cfg.dist_init_endpoint()
            listener = await anyio.create_tcp_listener(local_host=host, local_port=port + 1)
            stack.push_async_callback(listener.aclose)
            remote = RemoteWorkers(listener, range(per_node, tp))
        specs = []
        for g in range(cfg.dp_size):
            if cfg.nnodes > 1:
                method = f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"
                devices = [f"cuda:{r % per_node}" if device == "cuda" else "cpu" for r in range(tp)]
            else:
                method = f"file://{tmp}/rendezvous-{g}" if tp > 1 else ""
                devices = [f"cuda:{g * tp + r}" if device == "cuda" else "cpu" for r in range(tp)]
            seed = None if init.random_seed is None else init.random_seed + g
            group_init = replace_struct(init, dist_init_method=method, random_seed=seed)
            specs.append(GroupSpec(g, group_init, devices, range(per_node), threads))
        self._groups = [WorkerGroup(spec) for spec in specs]
        try:
            await start_groups(self._groups, tmp, cfg.worker_start_timeout, remote)
        finally:
            self._procs = [group.procs[r] for group in self._groups for r in sorted(group.procs)]
        first = self._groups[0].readies[0]
        assert first is not None
        self.ready = replace_struct(first, num_slots=min(group.num_slots for group in self._groups))
        logger.info(
            "KV cache: %d tokens per replica (%.2f GiB a rank, kv_cache_dtype %s); %d replica(s) x TP %d",
            self.ready.num_slots - 1, first.kv_bytes / (1 << 30), self.config.kv_cache_dtype,
            len(self._groups), self.config.tp_size,
        )

    async def _start_actors(self, max_rows: int) -> None:
        cfg, ready, mc = self.config, self.ready, self.model_config
        assert ready is not None and mc is not None
        to_detok, detok_inbox = mailbox(DetokenizerInbox, MAILBOX_CAPACITY)
        to_ingress, ingress_inbox = mailbox(IngressInbox, MAILBOX_CAPACITY)
        self._mailboxes: list[Outbox[Any] | Inbox[Any]] = [to_detok, detok_inbox, to_ingress, ingress_inbox]
        self.schedulers: list[Scheduler] = []
        self._to_schedulers: list[Outbox[SchedulerInbox]] = []
        eos = tuple(sorted(set(mc.eos_token_ids) | ({self.tokenizer.eos_token_id} - {None})))
        # Compiled grammars: filled by the ingress (in threads), read by every replica's scheduler.
        self.grammars = GrammarCache(self.tokenizer, ready.vocab_size, eos)
        for group in self._groups:  # one scheduler (radix tree, KV pool) per data-parallel replica
            to_scheduler, scheduler_inbox = mailbox(SchedulerInbox, MAILBOX_CAPACITY)
            self._mailboxes += [to_scheduler, scheduler_inbox]
            core = SchedulerCore(SchedulerConfig(
                num_slots=group.num_slots, max_rows=max_rows, chunked_prefill_size=cfg.chunked_prefill_size,
                max_prefill_tokens=cfg.max_prefill_tokens, max_running_requests=cfg.max_running_requests,
                schedule_policy=cfg.schedule_policy, disable_radix_cache=cfg.disable_radix_cache,
                overlap=not cfg.disable_overlap_schedule, new_token_ratio=cfg.new_token_ratio,
                min_new_token_ratio=cfg.min_new_token_ratio, disable_jump_forward=cfg.disable_jump_forward,
                shared_masks=cfg.nnodes == 1,  # the ranks of other nodes cannot map this host's memory
            ), self.grammars)
            self.schedulers.append(Scheduler(core, scheduler_inbox, group.connections, to_detok))
            self._to_schedulers.append(to_scheduler)
        self.scheduler = self.schedulers[0]
        self.router = Router(
            self._to_schedulers, [s.core.kv.total_slots for s in self.schedulers],
            balance_threshold=cfg.dp_balance_threshold, cache_threshold=cfg.dp_cache_threshold,
        )
        self.detokenizer = Detokenizer(self.tokenizer, detok_inbox, to_ingress, self._to_schedulers)
        max_outstanding = None
        if cfg.max_queued_requests is not None:
            max_outstanding = cfg.dp_size * cfg.max_running_requests + cfg.max_queued_requests
        self.ingress = Ingress(
            self.tokenizer, ModelLimits(self.context_length, ready.vocab_size, eos), ingress_inbox,
            self.router, to_detok, max_outstanding, cfg.chat_template, grammars=self.grammars,
        )
        # The actors run in a task of their own, not in the caller's: `async with Engine()` may be entered and
        # exited from different tasks (ASGI lifespans, pytest fixtures), which a task group cannot span.
        self._actors_task = asyncio.get_running_loop().create_task(self._run_actors(to_ingress))

    async def _run_actors(self, to_ingress: Outbox[IngressInbox]) -> None:
        async def supervise(name: str, run: Any) -> None:
            try:
                await run()
                message = f"the {name} stopped"
            except Exception as e:
                message = f"the {name} crashed: {type(e).__name__}: {e}"
                logger.exception(message)
            self.ingress.fail_all(message)

        async def watch_workers(g: int) -> None:
            # Returns once a rank of the group is gone (and the group killed). Its scheduler has turned that
            # into per-request errors; no new request may wait forever on the replica either.
            await self._groups[g].supervise(self._to_schedulers[g])
            with contextlib.suppress(Exception):
                if len(self._groups) == 1:
                    await to_ingress.send(EngineFailed("a worker process died"))
                else:
                    await to_ingress.send(ReplicaFailed(g, f"a worker process of replica {g} died"))

        async with anyio.create_task_group() as tg:
            for g, scheduler in enumerate(self.schedulers):
                name = "scheduler" if len(self.schedulers) == 1 else f"scheduler {g}"
                tg.start_soon(supervise, name, scheduler.run)
                tg.start_soon(watch_workers, g)
            tg.start_soon(supervise, "detokenizer", self.detokenizer.run)
            tg.start_soon(supervise, "ingress", self.ingress.run)

    async def shutdown(self) -> None:
        with anyio.CancelScope(shield=True):
            # Actors first: a worker that exits on Shutdown is then not reported as a crash.
            task = getattr(self, "_actors_task", None)
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                self._actors_task = None
            ingress = getattr(self, "ingress", None)
            if ingress is not None:
                ingress.fail_all("the engine shut down")
            async with anyio.create_task_group() as tg:
                for group in self._groups:
                    tg.start_soon(group.shutdown)
            self._procs.clear()
            for scheduler in getattr(self, "schedulers", []):
                scheduler.core.close()
            for box in getattr(self, "_mailboxes", []):
                box.close()
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
        stream: bool = True,
    ) -> RequestHandle:
        """Submit a request; `outputs(handle)` yields its outputs. stream=False: one output, at the finish."""
        if self._stack is None:
            raise EngineDeadError("the engine is not running (use `async with Engine(...)`)")
        return await self.ingress.open(
            prompt=prompt, input_ids=input_ids, messages=messages, sampling_params=sampling_params, rid=rid,
            stream=stream,
        )

    async def outputs(self, handle: RequestHandle) -> AsyncIterator[RequestOutput]:
        """The request's outputs until it finishes; leaving early (or being cancelled) aborts it."""
        try:
            async for out in handle.outputs:
                if out.error is not None and out.finish_reason in (None, FinishReason.ABORT):
                    handle.finished = True
                    # A dead scheduler marks itself before it fails its requests, so this sees it.
                    replica = handle.replica
                    dead = self.ingress.dead or self.router.is_dead(replica) or self.schedulers[replica].dead
                    raise EngineDeadError(out.error) if dead else RequestAbortedError(out.error)
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
        handle = await self.open(prompt, sampling_params, stream=False, **kwargs)
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
            finish_reason=last.finish_reason,
            usage=last.usage or Usage(len(handle.prompt_ids), len(tokens), 0),
            matched_stop=last.matched_stop, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
        )

    # -------------------------------------------------------------------------------------- introspection

    async def wait_idle(self, timeout: float = 30.0) -> None:  # noqa: ASYNC109 (the public API's timeout)
        with anyio.fail_after(timeout):
            # Polled on purpose: Scheduler.idle and ingress.num_outstanding set no event to wait on.
            while not all(s.idle for s in self.schedulers) or self.ingress.num_outstanding:  # noqa: ASYNC110
                await anyio.sleep(0.01)

    async def check_integrity(self) -> None:
        """Wait until idle, then check each live replica's KV pool: free + cached == total, no leaked rows."""
        await self.wait_idle()
        for scheduler in self.schedulers:
            if scheduler.dead:
                continue  # its requests were failed wholesale; its pool is gone with its workers
            scheduler.core.check_integrity()
            if scheduler.core.kv.private_slots:
                raise AssertionError(f"{scheduler.core.kv.private_slots} KV slots leaked while idle")

    def pool_stats(self) -> dict[str, Any]:
        """KV pool occupancy in tokens: total == free + cached (evictable + locked) + held (private), and the
        prefix cache hit rate (cached prompt tokens / prompt tokens). With dp_size > 1 the flat keys are the
        sums over the replicas and "replicas" lists each one's own (plus what the router sent it)."""
        replicas = [self._replica_stats(g) for g in range(len(self.schedulers))]
        summed = [k for k in replicas[0] if k not in ("cache_hit_rate", "dead")]
        total: dict[str, Any] = {k: sum(r[k] for r in replicas) for k in summed}
        total["cache_hit_rate"] = _hit_rate(total)
        if len(replicas) > 1:
            total["replicas"] = replicas
        return total

    def _replica_stats(self, g: int) -> dict[str, Any]:
        core = self.schedulers[g].core
        kv = core.kv
        stats: dict[str, Any] = {
            "total": kv.total_slots,
            "free": kv.allocator.available_size,
            "cached": kv.tree.evictable_size + kv.tree.locked_size,
            "locked": kv.tree.locked_size,
            "held": kv.private_slots,
            "running_requests": len(core.running),
            "waiting_requests": len(core.waiting),
            "prompt_tokens": core.num_prompt_tokens,
            "cached_prompt_tokens": core.num_cached_prompt_tokens,
        }
        stats["cache_hit_rate"] = _hit_rate(stats)
        if len(self.schedulers) > 1:
            stats.update(self.router.stats(g))
        return stats

    async def abort(self, rid: str) -> None:
        await self.ingress.abort(rid)

    async def flush_cache(self) -> None:
        """Drop the prefix cache (of every replica) as soon as the engine is idle."""
        for to_scheduler in self._to_schedulers:
            await to_scheduler.send(FlushCache())


def _hit_rate(stats: dict[str, Any]) -> float:
    return stats["cached_prompt_tokens"] / stats["prompt_tokens"] if stats["prompt_tokens"] else 0.0
