"""GPU worker process: `python -m radixserve.actors.gpu_worker --socket PATH`.

Connects to the engine's Unix socket, receives InitWorker, loads the model and allocates the KV pool, answers
WorkerReady, then runs every StepPlan in order and answers rank 0's StepResults. Plans are executed strictly
in arrival order: the scheduler relies on it (a later step may read KV that an earlier one writes).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
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
from radixserve.actors.model_runner import ModelRunner
from radixserve.memory.kv_pool import KVCache, ReqToTokenTable
from radixserve.models.loader import load_model
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
    table = ReqToTokenTable(init.max_rows, init.context_length + 1, device)
    sampler = Sampler(config.vocab_size, config.eos_token_ids, device)
    ready = WorkerReady(
        rank=init.rank,
        num_slots=num_slots,
        max_rows=init.max_rows,
        max_context=init.context_length,
        vocab_size=config.vocab_size,
        device=str(device),
        kv_bytes=num_slots * bytes_per_slot,
    )
    return ModelRunner(model, kv, table, sampler, device), ready


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
    while True:
        msg = mailbox.receive()
        match msg:
            case StepPlan():
                try:
                    result = runner.step(msg)
                except Exception as e:
                    mailbox.send(WorkerFailed(rank, f"step {msg.step} failed: {type(e).__name__}: {e}"))
                    raise
                if rank == 0:
                    mailbox.send(result)
            case Shutdown():
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
