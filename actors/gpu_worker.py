"""GPU worker process: `python -m radixserve.actors.gpu_worker --socket PATH`.

Connects to the engine's Unix socket, receives InitWorker, loads the model and allocates the KV pool, answers
WorkerReady, then runs every StepPlan in order and answers rank 0's StepResults. Plans are executed strictly
in arrival order: the scheduler relies on it (a later step may read KV that an earlier one writes).
"""

from __future__ import annotations

import argparse
import os
import queue
import socket
import sys
import threading
import traceback

import torch

from radixserve.actors.mailbox import BlockingSocketMailbox, MailboxClosed
from radixserve.actors.messages import (
    InitWorker,
    Shutdown,
    StepPlan,
    WorkerFailed,
    WorkerInbox,
    WorkerReady,
)
from radixserve.actors.cuda_graph_runner import CudaGraphRunner
from radixserve.actors.model_runner import ModelRunner, PendingStep
from radixserve.errors import UnsupportedFeatureError
from radixserve.memory.kv_pool import KVCache, ReqToTokenTable
from radixserve.models.loader import load_model
from radixserve.ops.attention.flashinfer_backend import FlashInferAttentionBackend
from radixserve.ops.attention.torch_backend import TorchAttentionBackend
from radixserve.ops.forward_batch import AttentionBackend
from radixserve.ops.sampler import Sampler

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


def build_runner(init: InitWorker) -> tuple[ModelRunner, WorkerReady]:
    device = torch.device(init.device)
    dtype = _DTYPES[init.dtype]
    if init.random_seed is not None:
        torch.manual_seed(init.random_seed)
    model, config = load_model(init.model_path, dtype=dtype, device=device)
    bytes_per_slot = KVCache.bytes_per_slot(config.num_layers, config.num_kv_heads, config.head_dim, dtype)
    num_slots = kv_pool_slots(init, bytes_per_slot, device)
    kv = KVCache(config.num_layers, num_slots, config.num_kv_heads, config.head_dim, dtype, device)
    # One extra, never-written row: CUDA-graph padding rows read it (all slot 0).
    table = ReqToTokenTable(init.max_rows + 1, init.context_length + 1, device)
    sampler = Sampler(config.vocab_size, config.eos_token_ids, device)
    backend = make_attention_backend(init.attention_backend, kv, model, device)
    graphs = None
    if device.type == "cuda" and not init.disable_cuda_graph:
        if not isinstance(backend, FlashInferAttentionBackend):
            raise UnsupportedFeatureError("CUDA graphs need the flashinfer backend; pass --disable-cuda-graph")
        graphs = CudaGraphRunner(model, backend, table.table, init.max_rows,
                                 min(init.cuda_graph_max_bs, init.max_rows), init.context_length + 1)
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
    return ModelRunner(model, kv, table, sampler, backend, device, graphs), ready


def make_attention_backend(name: str, kv: KVCache, model: torch.nn.Module, device: torch.device) -> AttentionBackend:
    if name == "auto":
        name = "flashinfer" if device.type == "cuda" else "torch"
    attn = model.model.layers[0].self_attn  # per-rank head counts and the softmax scale
    num_q_heads = attn.qkv_proj.q_size // attn.head_dim
    if name == "torch":
        return TorchAttentionBackend(kv.k_buffers, kv.v_buffers)
    if name == "flashinfer":
        if device.type != "cuda":
            raise UnsupportedFeatureError("the flashinfer backend needs CUDA; use --attention-backend torch")
        try:
            return FlashInferAttentionBackend(
                kv.k_buffers, kv.v_buffers, num_q_heads, kv.k_buffers[0].shape[1], attn.head_dim, attn.scale
            )
        except ImportError as e:
            raise UnsupportedFeatureError(f"flashinfer is not installed ({e}); pip install flashinfer-python") from e
    raise UnsupportedFeatureError(f"attention backend {name!r} is not built (available: flashinfer, torch)")


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
    sender = ResultSender(mailbox) if rank == 0 and runner.device.type == "cuda" else None
    while True:
        msg = mailbox.receive()
        match msg:
            case StepPlan():
                try:
                    pending = runner.step(msg)
                except Exception as e:
                    mailbox.send(WorkerFailed(rank, f"step {msg.step} failed: {type(e).__name__}: {e}"))
                    raise
                if sender is not None:
                    sender.submit(pending)
                elif rank == 0:
                    mailbox.send(pending.result())
            case Shutdown():
                if sender is not None:
                    sender.close()
                return
            case InitWorker():
                raise RuntimeError("InitWorker received twice")
            case _:
                raise RuntimeError(f"unexpected message {type(msg).__name__}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="radixserve GPU worker (started by the engine)")
    parser.add_argument("--socket", required=True)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(args.socket)
    mailbox: BlockingSocketMailbox[WorkerInbox] = BlockingSocketMailbox(sock, WorkerInbox)
    try:
        serve(mailbox)
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
