"""GPU-path checks and a first speed read, in one device call (development tool; JSON to --out).

1. FlashInfer backend vs the torch reference backend on random bf16 inputs (decode and extend rows).
2. The default model on CUDA (bf16): CUDA-graph decode gives the same greedy tokens as eager decode.
3. Llama-3.1-8B architecture, random weights: batch-1 decode at input 1024 through the Engine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import anyio
import torch

from radixserve.engine import Engine
from radixserve.ops.attention.flashinfer_backend import FlashInferAttentionBackend
from radixserve.ops.attention.torch_backend import TorchAttentionBackend
from radixserve.ops.forward_batch import AttentionBatch


def check_backend(extend_lens: list[int], seq_lens: list[int]) -> float:
    torch.manual_seed(0)
    dev, dt, hq, hkv, d, slots = "cuda", torch.bfloat16, 32, 8, 128, 8192
    k_bufs = [torch.randn(slots, hkv, d, device=dev, dtype=dt)]
    v_bufs = [torch.randn(slots, hkv, d, device=dev, dtype=dt)]
    table = torch.zeros(len(seq_lens), 4096, dtype=torch.int32, device=dev)
    perm = torch.randperm(slots - 1, device=dev)[: sum(seq_lens)] + 1
    off = 0
    for r, s in enumerate(seq_lens):
        table[r, :s] = perm[off : off + s].to(torch.int32)
        off += s
    out_slots = torch.cat([table[r, s - e : s] for r, (s, e) in enumerate(zip(seq_lens, extend_lens))]).long()
    starts = [sum(extend_lens[:i]) for i in range(len(extend_lens))]
    batch = AttentionBatch(
        torch.arange(len(seq_lens), device=dev), torch.tensor(seq_lens, device=dev, dtype=torch.int32),
        torch.tensor(extend_lens, device=dev, dtype=torch.int32), torch.tensor(starts, device=dev, dtype=torch.int32),
        out_slots, table, tuple(seq_lens), tuple(extend_lens), all(e == 1 for e in extend_lens),
    )
    t = sum(extend_lens)
    q = torch.randn(t, hq, d, device=dev, dtype=dt)
    k = torch.randn(t, hkv, d, device=dev, dtype=dt)
    v = torch.randn(t, hkv, d, device=dev, dtype=dt)
    fi = FlashInferAttentionBackend(k_bufs, v_bufs, hq, hkv, d, d**-0.5)
    fi.prepare(batch)
    out = fi.forward(q, k, v, 0, d**-0.5, batch).float()
    ref_bufs = ([k_bufs[0].float()], [v_bufs[0].float()])
    ref = TorchAttentionBackend(*ref_bufs).forward(q.float(), k.float(), v.float(), 0, d**-0.5, batch)
    return float((out - ref).norm() / ref.norm())


async def greedy_tokens(engine: Engine, prompts: list[list[int]]) -> list[list[int]]:
    outs: list[list[int]] = [[] for _ in prompts]

    async def one(i: int) -> None:
        o = await engine.generate(input_ids=prompts[i], sampling_params={"temperature": 0, "max_new_tokens": 32})
        outs[i] = o.token_ids

    async with anyio.create_task_group() as tg:  # concurrently: decode batches of several rows
        for i in range(len(prompts)):
            tg.start_soon(one, i)
    return outs


async def decode_speed(engine: Engine, input_len: int, output_len: int) -> dict[str, float]:
    ids = torch.randint(100, 40000, (input_len,)).tolist()
    stamps: list[float] = []
    t0 = time.perf_counter()
    async for delta in engine.stream(input_ids=ids, sampling_params={"max_new_tokens": output_len, "ignore_eos": True,
                                                                     "temperature": 0}):
        stamps.extend([time.perf_counter()] * max(1, len(delta.token_ids)))
    itl = [b - a for a, b in zip(stamps, stamps[1:]) if b > a]
    return {"ttft_s": stamps[0] - t0, "median_itl_ms": 1e3 * statistics.median(itl),
            "decode_tok_s": (len(stamps) - 1) / (stamps[-1] - stamps[0])}


async def main(args: argparse.Namespace) -> None:
    res: dict[str, object] = {"card": torch.cuda.get_device_name()}
    res["backend_decode_rel_err"] = check_backend([1, 1, 1, 1], [1, 17, 300, 2048])
    res["backend_extend_rel_err"] = check_backend([5, 300, 1, 64], [5, 1000, 77, 64])
    print(res, flush=True)
    kw = dict(load_format="dummy", context_length=8192)
    async with Engine(args.model, **kw) as eng:
        res["llama8b_bs1_in1024"] = await decode_speed(eng, 1024, 256)
    if args.profile_dir:
        import cProfile
        import os
        import pstats
        os.environ["RADIXSERVE_WORKER_PROFILE"] = f"{args.profile_dir}/worker.prof"
        async with Engine(args.model, **kw) as eng:
            await decode_speed(eng, 128, 16)
            prof = cProfile.Profile()
            prof.enable()
            res["llama8b_bs1_in1024_profiled"] = await decode_speed(eng, 1024, 256)
            prof.disable()
            prof.dump_stats(f"{args.profile_dir}/main.prof")
        for name in ("main", "worker"):
            print(f"==== {name}")
            pstats.Stats(f"{args.profile_dir}/{name}.prof").sort_stats("tottime").print_stats(22)
    print(json.dumps(res, indent=1), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=".bench-models/llama-3.1-8b")
    parser.add_argument("--out", default=None)
    parser.add_argument("--profile-dir", default=None)
    anyio.run(main, parser.parse_args())
