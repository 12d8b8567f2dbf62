"""GPU worker process: `python -m radixserve.actors.gpu_worker --socket PATH`, or
`--connect HOST:PORT --rank R` for a rank on another node (it introduces itself with WorkerHello).

Connects to the engine's Unix socket, receives InitWorker, joins its tensor-parallel group (torch.distributed:
NCCL on CUDA, gloo on the CPU), loads the model and allocates the KV pool, answers
WorkerReady, then runs every StepPlan in order and answers rank 0's StepResults. Plans are executed strictly
in arrival order: the scheduler relies on it (a later step may read KV that an earlier one writes).
"""

from __future__ import annotations

import argparse
import gc
import os
import queue
import select
import socket
import sys
import threading
import time
import traceback
from typing import Any, cast

import numpy as np
import torch
import torch.distributed as dist

from radixserve.actors.cuda_graph_runner import DISABLE_CASCADE_GRAPHS_ENV, CudaGraphRunner
from radixserve.actors.mailbox import BlockingSocketMailbox, MailboxClosed
from radixserve.actors.mask_ring import MaskRingReader
from radixserve.actors.messages import (
    InitWorker,
    Shutdown,
    StepMask,
    StepPlan,
    WorkerFailed,
    WorkerHello,
    WorkerInbox,
    WorkerReady,
)
from radixserve.actors.model_runner import LaunchedStep, ModelRunner, PendingStep
from radixserve.errors import UnsupportedFeatureError
from radixserve.memory.kv_pool import KVCache, ReqToTokenTable
from radixserve.models.config import ModelConfig
from radixserve.models.loader import load_model
from radixserve.models.source import load_hf_config_dict, resolve_model_source
from radixserve.ops.allreduce_norm import make_fused_all_reduce_norm
from radixserve.ops.attention.flashinfer_backend import FlashInferAttentionBackend
from radixserve.ops.attention.torch_backend import TorchAttentionBackend
from radixserve.ops.forward_batch import AttentionBackend
from radixserve.ops.kv_dtype import resolve_kv_dtype
from radixserve.ops.parallel import TPGroup
from radixserve.ops.sampler import Sampler
from radixserve.ops.symm_all_reduce import make_one_shot_all_reduce

# Set to a path prefix: the worker profiles its whole serve loop with cProfile and writes PATH.<pid>
# at shutdown.
PROFILE_ENV = "RADIXSERVE_WORKER_PROFILE"
# Cascade CUDA graphs (DISABLE_CASCADE_GRAPHS_ENV turns them off) up to this many rows: each size keeps
# its own logits buffer (rows x vocab in the model dtype: 263 MB at 1,024 rows of Llama-3's vocabulary).
CASCADE_GRAPH_MAX_BS = 1024
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def kv_pool_slots(init: InitWorker, bytes_per_slot: int, device: torch.device) -> int:
    """KV slots to allocate (slot 0 included): --max-total-tokens, else a share of free device memory."""
    if init.max_total_tokens is not None:
        return init.max_total_tokens + 1
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        budget = free - total * (1.0 - init.mem_fraction_static)
    else:
        budget = init.cpu_kv_gib * (1 << 30)
    slots = int(budget // bytes_per_slot)
    if slots < 2:
        raise RuntimeError(f"no memory left for the KV cache ({budget / (1 << 30):.2f} GiB budget)")
    return slots


def init_tensor_parallel(init: InitWorker, device: torch.device) -> TPGroup:
    """Join this worker's tensor-parallel group; it is the process's whole world (each DP replica has its own
    rendezvous). Size 1 joins nothing."""
    if init.tp_size == 1:
        return TPGroup()
    if not init.dist_init_method:
        raise RuntimeError("tp_size > 1 needs a dist_init_method")
    cuda = device.type == "cuda"
    dist.init_process_group(
        "nccl" if cuda else "gloo", init_method=init.dist_init_method, rank=init.rank,
        world_size=init.tp_size, device_id=device if cuda else None,
    )
    group = dist.group.WORLD
    dtype = _DTYPES[init.dtype]
    one_shot = fused_norm = None
    if cuda and not init.disable_custom_all_reduce:
        one_shot = make_one_shot_all_reduce(group, device, dtype)
    if init.enable_flashinfer_allreduce_fusion:
        from radixserve.ops.triton_launch import pdl_enabled

        source = resolve_model_source(init.model_path, need_weights=False)
        hidden = ModelConfig.from_hf_dict(load_hf_config_dict(source)).hidden_size
        fused_norm = make_fused_all_reduce_norm(group, init.rank, init.tp_size, hidden, dtype, device,
                                                pdl=cuda and pdl_enabled(device))
    return TPGroup(init.rank, init.tp_size, group, one_shot, fused_norm)


def local_kv_heads(model: Any) -> int:
    """KV heads this rank stores: num_kv_heads / tp, or 1 where a KV head is replicated on several ranks
    (fewer KV heads than ranks; see ops/linear.QKVParallelLinear)."""
    return int(model.model.layers[0].self_attn.qkv_proj.num_kv_heads_local)


def build_runner(init: InitWorker) -> tuple[ModelRunner, WorkerReady]:
    device = torch.device(init.device)
    dtype = _DTYPES[init.dtype]
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", init.rank % torch.cuda.device_count())
    if device.type == "cuda":
        torch.cuda.set_device(device)  # rank r of a group runs on cuda:r (kernels use the current device)
    tp = init_tensor_parallel(init, device)
    model, config = load_model(
        init.model_path, dtype=dtype, device=device, tp=tp, load_format=init.load_format
    )
    kv_heads = local_kv_heads(model)
    kv_dtype = resolve_kv_dtype(init.kv_cache_dtype, dtype)
    bytes_per_slot = KVCache.bytes_per_slot(config.num_layers, kv_heads, config.head_dim, kv_dtype)
    num_slots = kv_pool_slots(init, bytes_per_slot, device)
    kv = KVCache(config.num_layers, num_slots, kv_heads, config.head_dim, kv_dtype, device)
    # One extra, never-written row: CUDA-graph padding rows read it (all slot 0).
    table = ReqToTokenTable(init.max_rows + 1, init.context_length + 1, device)
    sampler = Sampler(config.vocab_size, config.eos_token_ids, device)
    backend = make_attention_backend(init.attention_backend, kv, model, device, dtype)
    graphs = None
    if device.type == "cuda" and not init.disable_cuda_graph:
        if not isinstance(backend, FlashInferAttentionBackend):
            raise UnsupportedFeatureError(
                f"CUDA graphs are captured with the flashinfer backend; with --attention-backend "
                f"{init.attention_backend} pass --disable-cuda-graph"
            )
        # The cascade family wherever decode runs Triton cascade (FP8 pools): a 1,000-row shared-prefix step
        # then replays instead of launching ~500 kernels (session 9, one H100: the worker's host time on
        # those steps 7.6 -> 0.8 s of a 10.3 s decode phase, outputs 1.8e-3 from eager).
        cascade_graphs = os.environ.get(DISABLE_CASCADE_GRAPHS_ENV, "0") != "1"
        cascade_max_bs = 0
        if cascade_graphs and backend.cascade_on_triton and backend.cascade_enabled:
            cascade_max_bs = min(init.max_rows, CASCADE_GRAPH_MAX_BS)
        graphs = CudaGraphRunner(model, backend, table.table, init.max_rows,
                                 min(init.cuda_graph_max_bs, init.max_rows), init.context_length + 1,
                                 cascade_max_bs=cascade_max_bs)
        graphs.capture()
    ready = WorkerReady(
        rank=init.rank,
        num_slots=num_slots,
        max_rows=init.max_rows,
        max_context=init.context_length,
        vocab_size=config.vocab_size,
        device=str(device),
        kv_bytes=num_slots * bytes_per_slot,
    )
    # NOTE: ranks of a TP group must sample the same tokens. They hold bitwise-equal logits (the LM head
    # all-gathers them), and the engine gives every rank the same seed, seeded here, after everything that
    # might draw random numbers: unseeded requests then draw the same noise on every rank, step after step
    # (seeded requests have their own generators). No collective per step is needed.
    if init.random_seed is not None:
        torch.manual_seed(init.random_seed)
    runner = ModelRunner(model, kv, table, sampler, backend, device, graphs)
    if tp.size > 1 and os.environ.get("RADIXSERVE_CHECK_TP_TOKENS") == "1":
        return TokenAgreementCheck(runner, tp), ready  # type: ignore[return-value]
    return runner, ready


class TokenAgreementCheck:
    """RADIXSERVE_CHECK_TP_TOKENS=1 (tests, debugging): after each step every rank all-gathers its sampled
    tokens and fails the step unless all agree. Costs a host sync and a collective per step."""

    def __init__(self, runner: ModelRunner, tp: TPGroup) -> None:
        self.runner = runner
        self.tp = tp

    def __getattr__(self, name: str) -> Any:
        return getattr(self.runner, name)

    def finish(self, launched: LaunchedStep, bitmask: bytes | np.ndarray | None = None) -> PendingStep:
        pending = self.runner.finish(launched, bitmask)
        tokens = torch.frombuffer(bytearray(pending.result().tokens), dtype=torch.int32)
        ranks = self.tp.all_gather(tokens.to(self.runner.device).unsqueeze(0), dim=0)  # [tp, B]
        if not bool((ranks == ranks[0]).all()):
            step = launched.prep.plan.step
            raise RuntimeError(f"step {step}: the tensor-parallel ranks sampled different tokens")
        return pending


def make_attention_backend(
    name: str, kv: KVCache, model: torch.nn.Module, device: torch.device, dtype: torch.dtype
) -> AttentionBackend:
    """The attention backend `name` over the pool `kv`, for queries of the model's `dtype`."""
    if name == "auto":
        name = "flashinfer" if device.type == "cuda" else "torch"
    attn = cast(Any, model).model.layers[0].self_attn  # per-rank head counts and the softmax scale
    num_q_heads = attn.qkv_proj.q_size // attn.head_dim
    if name == "torch":
        return TorchAttentionBackend(kv.k_buffers, kv.v_buffers)
    if name == "flashinfer":
        if device.type != "cuda":
            raise UnsupportedFeatureError("the flashinfer backend needs CUDA; use --attention-backend torch")
        try:
            return FlashInferAttentionBackend(
                kv.k_buffers, kv.v_buffers, num_q_heads, kv.k_buffers[0].shape[1], attn.head_dim, attn.scale,
                dtype=dtype,
            )
        except ImportError as e:
            raise UnsupportedFeatureError(
                f"flashinfer is not installed ({e}); pip install flashinfer-python"
            ) from e
    if name == "triton":
        if device.type != "cuda":
            raise UnsupportedFeatureError("the triton backend needs CUDA; use --attention-backend torch")
        from radixserve.ops.attention.triton_backend import TritonAttentionBackend

        return TritonAttentionBackend(kv.k_buffers, kv.v_buffers)
    raise UnsupportedFeatureError(
        f"attention backend {name!r} is not built (available: flashinfer, triton, torch)"
    )


class ResultSender:
    """Sends each step's result once its device->host copy is done, in step order, from its own thread: the
    main thread meanwhile receives and launches the next step, which is what keeps the GPU busy."""

    def __init__(self, mailbox: BlockingSocketMailbox[WorkerInbox]) -> None:
        self.mailbox = mailbox
        self.queue: queue.SimpleQueue[PendingStep | None] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._loop, name="result-sender", daemon=True)
        self.thread.start()

    def submit(self, pending: PendingStep) -> None:
        self.queue.put(pending)

    def _loop(self) -> None:
        while (pending := self.queue.get()) is not None:
            try:
                self.mailbox.send(pending.result())
            except MailboxClosed:
                return

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join(timeout=5)


def serve(mailbox: BlockingSocketMailbox[WorkerInbox]) -> None:
    init = mailbox.receive()
    if not isinstance(init, InitWorker):
        raise RuntimeError(f"expected InitWorker first, got {type(init).__name__}")
    rank = init.rank
    try:
        runner, ready = build_runner(init)
    except Exception as e:  # report why start-up failed, then exit
        mailbox.send(WorkerFailed(rank, f"worker {rank} failed to start: {type(e).__name__}: {e}"))
        raise
    mailbox.send(ready)
    # The model, its graphs and torch's modules live as long as the worker: keep them out of the cyclic GC's
    # full collections, which paused the step loop for ~0.3 s each in offline runs on an H100.
    gc.collect()
    gc.freeze()
    sender = ResultSender(mailbox) if rank == 0 and runner.device.type == "cuda" else None

    # A step launched and waiting for its grammar masks: the scheduler sends them before any later plan.
    waiting: LaunchedStep | None = None
    masks = MaskRingReader()  # StepMasks in the scheduler's shared memory

    def finished(pending: PendingStep) -> None:
        if sender is not None:
            sender.submit(pending)
        elif rank == 0:
            mailbox.send(pending.result())

    while True:
        msg = mailbox.receive()
        step = msg.step if isinstance(msg, StepPlan | StepMask) else -1
        try:
            match msg:
                case StepPlan():
                    if waiting is not None:
                        raise RuntimeError(f"step {step} arrived before the grammar masks of step "
                                           f"{waiting.prep.plan.step}")
                    launched = runner.launch(runner.prepare(msg))
                    if runner.needs_mask(launched):
                        waiting = launched
                    else:
                        finished(runner.finish(launched))
                case StepMask():
                    if waiting is None or waiting.prep.plan.step != step:
                        raise RuntimeError(f"grammar masks for step {step} arrived outside their step")
                    bitmask = msg.bitmask if msg.shared is None else masks.read(msg.shared)
                    finished(runner.finish(waiting, bitmask))
                    waiting = None
                case Shutdown():
                    if sender is not None:
                        sender.close()
                    masks.close()
                    return
                case InitWorker():
                    raise RuntimeError("InitWorker received twice")
                case _:
                    raise RuntimeError(f"unexpected message {type(msg).__name__}")
        except Exception as e:
            mailbox.send(WorkerFailed(rank, f"step {step} failed: {type(e).__name__}: {e}"))
            raise


def connect_tcp(address: str, timeout: float) -> socket.socket:
    """A connection to node 0's engine at HOST:PORT, retried until `timeout` (node 0 may start later)."""
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout
    while True:
        try:
            sock = socket.create_connection((host.strip("[]"), int(port)), timeout=10)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    sock.settimeout(None)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # plans are small frames; do not batch them
    return sock


def exit_when_engine_hangs_up(sock: socket.socket) -> None:
    """Exit as soon as the engine closes this worker's connection, even while the main thread is blocked in a
    collective that waits for a dead peer: the engine closes every connection of a group that lost a rank, and
    the ranks on other nodes are beyond its reach otherwise. A daemon thread polls for the hang-up only."""
    rdhup = getattr(select, "POLLRDHUP", 0)
    if not rdhup:
        return

    def watch() -> None:
        poller = select.poll()
        poller.register(sock.fileno(), rdhup)
        poller.poll()  # returns on the hang-up (or POLLHUP / POLLERR / POLLNVAL, always reported)
        os._exit(0)

    threading.Thread(target=watch, name="engine-hangup-watch", daemon=True).start()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="radixserve GPU worker (started by the engine)")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--socket", help="the engine's Unix socket (a worker on node 0)")
    target.add_argument("--connect", metavar="HOST:PORT", help="node 0's engine over TCP (another node)")
    parser.add_argument("--rank", type=int, default=0, help="this worker's TP rank (with --connect)")
    parser.add_argument("--connect-timeout", type=float, default=600.0)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.socket is not None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(args.socket)
    else:
        sock = connect_tcp(args.connect, args.connect_timeout)
    mailbox: BlockingSocketMailbox[WorkerInbox] = BlockingSocketMailbox(sock, WorkerInbox)
    exit_when_engine_hangs_up(sock)
    try:
        if args.connect is not None:
            mailbox.send(WorkerHello(args.rank))
        profile_path = os.environ.get(PROFILE_ENV)
        if profile_path:  # development: where the worker's host time goes (one file per rank)
            import cProfile

            with cProfile.Profile() as prof:
                serve(mailbox)
            prof.dump_stats(f"{profile_path}.{os.getpid()}")
        else:
            serve(mailbox)
        if dist.is_initialized():
            dist.destroy_process_group()
    except MailboxClosed:
        pass  # the engine went away: nothing left to serve
    except Exception:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    finally:
        mailbox.close()


if __name__ == "__main__":
    main()
