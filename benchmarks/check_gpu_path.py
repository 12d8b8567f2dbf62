"""GPU-path checks and a first speed read, in one device call (development tool; JSON to --out).

1. FlashInfer backend vs the torch reference backend on random bf16 inputs (decode and extend rows, and
   cascade decode of rows sharing a prefix), and the time of plain vs cascade decode attention per layer
   (the Triton cascade's tuning and CUDA-graph check: benchmarks/cascade_tuning.py).
2. The default model on CUDA (bf16): CUDA-graph decode gives the same greedy tokens as eager decode.
3. Llama-3.1-8B architecture, random weights: batch-1 decode at input 1024 through the Engine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

import anyio
import torch

from radixserve.benchmarks.cascade_tuning import (
    FP8_F16_VARIANTS,
    check_cascade_graph,
    compiled_kernel_resources,
    shared_prefix_pool,
    tune_triton_cascade,
)
from radixserve.engine import Engine
from radixserve.ops.attention.flashinfer_backend import FlashInferAttentionBackend
from radixserve.ops.attention.torch_backend import TorchAttentionBackend
from radixserve.ops.forward_batch import AttentionBackend, AttentionBatch
from radixserve.ops.kv_dtype import to_kv


def check_backend(
    extend_lens: list[int], seq_lens: list[int], shared: int = 0, kv_dtype: torch.dtype = torch.bfloat16,
    decode_tensor_cores: bool = True, triton_decode_max_rows: int = 0,
) -> float:
    """Relative error of FlashInfer against the torch backend in float32 over the same pool contents; with
    `shared`, every row's first `shared` slots are the same (one cached prefix) and the leading decode rows
    must run as cascade attention (in a mixed step, apart from the prompt rows). An FP8 `kv_dtype`: the
    new K/V must be stored as to_kv rounds them."""
    torch.manual_seed(0)
    dev, dt, hq, hkv, d = "cuda", torch.bfloat16, 32, 8, 128
    slots = sum(seq_lens) - shared * (len(seq_lens) - 1) + 1
    k_bufs = [to_kv(torch.randn(slots, hkv, d, device=dev, dtype=dt), kv_dtype)]
    v_bufs = [to_kv(torch.randn(slots, hkv, d, device=dev, dtype=dt), kv_dtype)]
    table = torch.zeros(len(seq_lens), 4096, dtype=torch.int32, device=dev)
    perm = torch.randperm(slots - 1, device=dev) + 1
    table[:, :shared] = perm[:shared].to(torch.int32)
    off = shared
    for r, s in enumerate(seq_lens):
        table[r, shared:s] = perm[off : off + s - shared].to(torch.int32)
        off += s - shared
    rows = enumerate(zip(seq_lens, extend_lens, strict=True))
    out_slots = torch.cat([table[r, s - e : s] for r, (s, e) in rows]).long()
    starts = [sum(extend_lens[:i]) for i in range(len(extend_lens))]
    batch = AttentionBatch(
        torch.arange(len(seq_lens), device=dev), torch.tensor(seq_lens, device=dev, dtype=torch.int32),
        torch.tensor(extend_lens, device=dev, dtype=torch.int32),
        torch.tensor(starts, device=dev, dtype=torch.int32),
        out_slots, table, tuple(seq_lens), tuple(extend_lens), all(e == 1 for e in extend_lens),
    )
    decode_rows = batch.num_leading_decode_rows
    if shared:
        batch = dataclasses.replace(batch, shared_lens_cpu=(0,) + (shared,) * (decode_rows - 1))
    t = sum(extend_lens)
    q = torch.randn(t, hq, d, device=dev, dtype=dt)
    k = torch.randn(t, hkv, d, device=dev, dtype=dt)
    v = torch.randn(t, hkv, d, device=dev, dtype=dt)
    fi = FlashInferAttentionBackend(k_bufs, v_bufs, hq, hkv, d, d**-0.5, dtype=dt,
                                    decode_tensor_cores=decode_tensor_cores,
                                    triton_decode_max_rows=triton_decode_max_rows)
    fi.prepare(batch)
    assert fi.num_cascade_steps == (1 if shared else 0), "cascade attention did not run"
    split = decode_rows if 0 < decode_rows < len(seq_lens) else 0
    assert fi.split_decode_rows == split, "a mixed step's decode rows must run apart"
    out = fi.forward(q, k, v, 0, d**-0.5, batch).float()
    # within one FP8 step of torch's rounding (exact for bf16)
    fp8 = kv_dtype.itemsize == 1
    rtol, atol = (2 * torch.finfo(kv_dtype).eps, torch.finfo(kv_dtype).smallest_normal) if fp8 else (0, 0)
    for buf, new in ((k_bufs[0], k), (v_bufs[0], v)):
        torch.testing.assert_close(buf[out_slots].float(), to_kv(new, kv_dtype).float(), rtol=rtol, atol=atol)
    ref_bufs = ([k_bufs[0].float()], [v_bufs[0].float()])  # what the pool holds, new tokens included
    ref = TorchAttentionBackend(*ref_bufs).forward(q.float(), k.float(), v.float(), 0, d**-0.5, batch,
                                                   kv_stored=True)
    return float((out - ref).norm() / ref.norm())


def check_cascade_groups(num_groups: int = 10, seed: int = 0, kv_dtype: torch.dtype = torch.bfloat16,
                         cascade_kernels: str | None = None) -> float:
    """Cascade decode with groups of 1-30 rows sharing 100-3000 tokens and rows of their own (several groups,
    single rows, the plan's group splitting) against the torch backend over the same pool: relative error."""
    gen = torch.Generator().manual_seed(seed)
    dev, dt, hq, hkv, d = "cuda", torch.bfloat16, 32, 8, 128
    sizes = torch.randint(1, 31, (num_groups,), generator=gen).tolist()
    prefixes = torch.randint(100, 3001, (num_groups,), generator=gen).tolist()
    tails = [torch.randint(1, 400, (n,), generator=gen).tolist() for n in sizes]
    slots = 1 + sum(prefixes) + sum(map(sum, tails))
    k_bufs = [to_kv(torch.randn(slots, hkv, d, device=dev, dtype=dt), kv_dtype)]
    v_bufs = [to_kv(torch.randn(slots, hkv, d, device=dev, dtype=dt), kv_dtype)]
    rows = sum(sizes)
    table = torch.zeros(rows, 4096, dtype=torch.int32)
    next_slot, r = 1, 0
    seq_lens: list[int] = []
    shared: list[int] = []
    for prefix, own in zip(prefixes, tails, strict=True):
        head = torch.arange(next_slot, next_slot + prefix, dtype=torch.int32)
        next_slot += prefix
        for i, tail in enumerate(own):
            table[r, :prefix] = head
            table[r, prefix : prefix + tail] = torch.arange(next_slot, next_slot + tail, dtype=torch.int32)
            next_slot += tail
            seq_lens.append(prefix + tail)
            shared.append(prefix if i else 0)
            r += 1
    table = table.to(dev)
    out_slots = torch.stack([table[b, s - 1] for b, s in enumerate(seq_lens)]).long()
    batch = AttentionBatch(
        torch.arange(rows, device=dev), torch.tensor(seq_lens, device=dev, dtype=torch.int32),
        torch.ones(rows, device=dev, dtype=torch.int32), torch.arange(rows, device=dev, dtype=torch.int32),
        out_slots, table, tuple(seq_lens), (1,) * rows, True, tuple(shared))
    q = torch.randn(rows, hq, d, device=dev, dtype=dt)
    k = torch.randn(rows, hkv, d, device=dev, dtype=dt)
    v = torch.randn(rows, hkv, d, device=dev, dtype=dt)
    fi = FlashInferAttentionBackend(k_bufs, v_bufs, hq, hkv, d, d**-0.5, dtype=dt,
                                    cascade_kernels=cascade_kernels)
    fi.prepare(batch)
    assert fi.num_cascade_steps == 1, "cascade attention did not run"
    out = fi.forward(q, k, v, 0, d**-0.5, batch).float()
    torch.cuda.synchronize()
    ref_bufs = ([k_bufs[0].float()], [v_bufs[0].float()])  # what the pool holds, new tokens included
    ref = TorchAttentionBackend(*ref_bufs).forward(q.float(), k.float(), v.float(), 0, d**-0.5, batch,
                                                   kv_stored=True)
    return float((out - ref).norm() / ref.norm())


def time_layers(fi: AttentionBackend, batch: AttentionBatch, q: torch.Tensor, kv_heads: int,
                layers: int) -> float:
    """Milliseconds for one step's attention over `layers` layers (planned once, as the worker does): CUDA
    events, median of 5 after a warm-up. Reads the pool only (q's first heads stand in for the new K/V)."""
    fi.prepare(batch)
    scale = q.shape[-1] ** -0.5
    times = []
    for _ in range(6):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for layer in range(layers):
            fi.forward(q, q[:, :kv_heads], q[:, :kv_heads], layer, scale, batch, kv_stored=True)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times[1:])


def time_decode(rows: int, context: int, kv_dtype: torch.dtype, layers: int = 32) -> dict[str, float]:
    """One decode step's attention (`layers` layers) over `rows` rows of `context` tokens each in a pool of
    `kv_dtype`, on FlashInfer's tensor-core and CUDA-core decode kernels: milliseconds (CUDA events, median
    of 5) and the KV bytes over the H100's copy rate."""
    dev, dt, hq, hkv, d = "cuda", torch.bfloat16, 32, 8, 128
    slots = rows * context + 1
    k_bufs = [to_kv(torch.randn(slots, hkv, d, device=dev, dtype=dt), kv_dtype) for _ in range(layers)]
    v_bufs = [to_kv(torch.randn(slots, hkv, d, device=dev, dtype=dt), kv_dtype) for _ in range(layers)]
    table = (1 + torch.randperm(rows * context, device=dev)).view(rows, context).to(torch.int32)
    seq = [context] * rows
    batch = AttentionBatch(
        torch.arange(rows, device=dev), torch.tensor(seq, device=dev, dtype=torch.int32),
        torch.ones(rows, device=dev, dtype=torch.int32), torch.arange(rows, device=dev, dtype=torch.int32),
        table[:, -1].long(), table, tuple(seq), (1,) * rows, True)
    q = torch.randn(rows, hq, d, device=dev, dtype=dt)
    res = {"kv_floor_ms": rows * context * layers * 2 * hkv * d * k_bufs[0].element_size() / 3.0e9}
    for name, tensor_cores in (("tensor_cores_ms", True), ("cuda_cores_ms", False)):
        fi = FlashInferAttentionBackend(k_bufs, v_bufs, hq, hkv, d, d**-0.5, dtype=dt,
                                        decode_tensor_cores=tensor_cores)
        res[name] = time_layers(fi, batch, q, hkv, layers)
        print(name, kv_dtype, res[name], flush=True)
        del fi
    from radixserve.ops.attention.triton_backend import TritonAttentionBackend

    res["triton_ms"] = time_layers(TritonAttentionBackend(k_bufs, v_bufs), batch, q, hkv, layers)
    return res


def time_cascade(rows: int, shared: int, own: int, layers: int = 32, kv_dtype: torch.dtype = torch.bfloat16,
                 group_rows: int | None = None) -> dict[str, float]:
    """One decode step's attention (`layers` layers) over rows sharing a `shared`-token prefix (groups of
    `group_rows` rows, each with a prefix of its own; default one group), plain batch decode vs cascade on
    FlashInfer's and on the Triton kernels: milliseconds (CUDA events, median of 5) and the KV bytes each
    reads over the H100's copy rate. The pool holds one copy of each prefix, as the radix tree makes it."""
    dev, dt, hq, hkv, d = "cuda", torch.bfloat16, 32, 8, 128
    group_rows = group_rows or rows
    k_bufs, v_bufs, table = shared_prefix_pool(rows, group_rows, shared, own, layers, kv_dtype)
    seq = [shared + own] * rows
    q = torch.randn(rows, hq, d, device=dev, dtype=dt)
    shared_lens = tuple(0 if r % group_rows == 0 else shared for r in range(rows))
    res: dict[str, float] = {}
    for name, lens, kernels in (("plain", (), None), ("cascade_flashinfer", shared_lens, "flashinfer"),
                                ("cascade_triton", shared_lens, "triton")):
        batch = AttentionBatch(
            torch.arange(rows, device=dev), torch.tensor(seq, device=dev, dtype=torch.int32),
            torch.ones(rows, device=dev, dtype=torch.int32),
            torch.arange(rows, device=dev, dtype=torch.int32), table[:, -1].long(), table, tuple(seq),
            (1,) * rows, True, lens)
        fi = FlashInferAttentionBackend(k_bufs, v_bufs, hq, hkv, d, d**-0.5, dtype=dt,
                                        cascade_kernels=kernels)
        res[f"{name}_ms"] = time_layers(fi, batch, q, hkv, layers)
        print(name, kv_dtype, res[f"{name}_ms"], flush=True)
        del fi
    per_token = layers * 2 * hkv * d * k_bufs[0].element_size()
    res["plain_floor_ms"] = rows * (shared + own) * per_token / 3.0e9
    res["cascade_floor_ms"] = (rows // group_rows * shared + rows * own) * per_token / 3.0e9
    return res


def time_mixed(decode_rows: int, context: int, prompt: int, layers: int = 32) -> dict[str, float]:
    """A mixed step's attention (`layers` layers): `decode_rows` rows decoding at `context` tokens, then one
    `prompt`-token chunk; batch prefill over all rows vs decode rows apart (split): milliseconds (CUDA events,
    median of 5), and the decode rows' KV bytes over the H100's copy rate."""
    dev, dt, hq, hkv, d = "cuda", torch.bfloat16, 32, 8, 128
    slots = decode_rows * context + prompt + 1
    k_bufs = [torch.randn(slots, hkv, d, device=dev, dtype=dt) for _ in range(layers)]
    v_bufs = [torch.randn(slots, hkv, d, device=dev, dtype=dt) for _ in range(layers)]
    rows = decode_rows + 1
    table = torch.zeros(rows, max(context, prompt), dtype=torch.int32, device=dev)
    table[:decode_rows, :context] = (1 + torch.arange(decode_rows * context, device=dev)).view(
        decode_rows, context).to(torch.int32)
    first = 1 + decode_rows * context
    table[decode_rows, :prompt] = torch.arange(first, first + prompt, device=dev, dtype=torch.int32)
    seq, ext = [context] * decode_rows + [prompt], [1] * decode_rows + [prompt]
    out_slots = torch.cat([table[:decode_rows, context - 1], table[decode_rows, :prompt]]).long()
    batch = AttentionBatch(
        torch.arange(rows, device=dev), torch.tensor(seq, device=dev, dtype=torch.int32),
        torch.tensor(ext, device=dev, dtype=torch.int32),
        torch.tensor([sum(ext[:i]) for i in range(rows)], device=dev, dtype=torch.int32), out_slots, table,
        tuple(seq), tuple(ext), False)
    q = torch.randn(sum(ext), hq, d, device=dev, dtype=dt)
    res: dict[str, float] = {}
    for name, split in (("whole_prefill", False), ("split", True)):
        fi = FlashInferAttentionBackend(k_bufs, v_bufs, hq, hkv, d, d**-0.5)
        fi.split_mixed_steps = split
        res[f"{name}_ms"] = time_layers(fi, batch, q, hkv, layers)
        del fi
    res["decode_rows_kv_floor_ms"] = decode_rows * context * layers * 2 * hkv * d * 2 / 3.0e9
    return res


async def greedy_tokens(engine: Engine, prompts: list[list[int]]) -> list[list[int]]:
    outs: list[list[int]] = [[] for _ in prompts]

    async def one(i: int) -> None:
        params = {"temperature": 0, "max_new_tokens": 32}
        o = await engine.generate(input_ids=prompts[i], sampling_params=params)
        outs[i] = o.token_ids

    async with anyio.create_task_group() as tg:  # concurrently: decode batches of several rows
        for i in range(len(prompts)):
            tg.start_soon(one, i)
    return outs


async def pdl_same_tokens(model: str) -> bool:
    """Greedy tokens of 12 concurrent prompts (decode batches of 1-12 rows, CUDA graphs) with the Triton
    kernels launched with PDL and without: the kernels compute the same bits either way, so any difference
    is a missing wait (a kernel reading its input before the previous kernel wrote it)."""
    import os

    from radixserve.ops.triton_launch import DISABLE_ENV

    torch.manual_seed(1)
    prompts = [torch.randint(100, 40000, (int(n),)).tolist() for n in torch.randint(8, 600, (12,))]
    outs = []
    for disable in ("1", "0"):
        os.environ[DISABLE_ENV] = disable  # the worker subprocess inherits it
        async with Engine(model, load_format="dummy", context_length=8192, random_seed=0) as eng:
            outs.append(await greedy_tokens(eng, prompts))
    os.environ.pop(DISABLE_ENV)
    return outs[0] == outs[1]


async def decode_speed(engine: Engine, input_len: int, output_len: int) -> dict[str, float]:
    ids = torch.randint(100, 40000, (input_len,)).tolist()
    stamps: list[float] = []
    t0 = time.perf_counter()
    params = {"max_new_tokens": output_len, "ignore_eos": True, "temperature": 0}
    async for delta in engine.stream(input_ids=ids, sampling_params=params):
        stamps.extend([time.perf_counter()] * max(1, len(delta.token_ids)))
    itl = [b - a for a, b in zip(stamps, stamps[1:], strict=False) if b > a]
    return {"ttft_s": stamps[0] - t0, "median_itl_ms": 1e3 * statistics.median(itl),
            "decode_tok_s": (len(stamps) - 1) / (stamps[-1] - stamps[0])}


async def main(args: argparse.Namespace) -> None:
    res: dict[str, object] = {"card": torch.cuda.get_device_name()}
    if args.decode_kernels:
        res["fp8_cuda_core_decode_rel_err"] = check_backend(
            [1, 1, 1, 1], [1, 17, 300, 2048], kv_dtype=torch.float8_e4m3fn, decode_tensor_cores=False)
        print(res, flush=True)
        res["decode_128x2700_attention_32_layers_fp8_e4m3"] = time_decode(128, 2700, torch.float8_e4m3fn)
        finish(res, args.out)
        return
    if args.triton_decode_check:  # small decode steps on the Triton split-KV kernel, against torch
        for kv_dtype in (torch.bfloat16, torch.float8_e4m3fn):
            tag = str(kv_dtype).removeprefix("torch.")
            res[f"triton_small_decode_rel_err_{tag}"] = [
                check_backend([1] * len(lens), lens, kv_dtype=kv_dtype, triton_decode_max_rows=8)
                for lens in ([1], [1024], [5, 300, 1024, 2049], [7] * 8)]
            # (FlashInfer's prefill kernel runs the prompt row: a JIT on a fresh card)
            if not args.skip_mixed:
                res[f"triton_small_decode_mixed_rel_err_{tag}"] = check_backend(
                    [1, 1, 100], [900, 40, 300], kv_dtype=kv_dtype, triton_decode_max_rows=8)
        print(res, flush=True)
        finish(res, args.out)
        errors = [e for k, v in res.items() if k.startswith("triton_small") for e in (v if isinstance(v, list)
                                                                                      else [v])]
        assert max(errors) < 1e-2, "Triton small-batch decode differs from the torch backend"
        return
    if args.cascade_graph_check:
        errors = check_cascade_graph()
        res["cascade_graph_rel_err_vs_eager"] = errors
        print(res, flush=True)
        finish(res, args.out)
        assert max(errors) < 1e-2, "cascade graph replays differ from eager"
        return
    if args.fp8_f16_check:  # an FP8 pool's Triton dots in fp16: errors against torch, then time
        from radixserve.ops.attention import triton_ops

        default = triton_ops.FP8_F16_DOTS
        for f16 in (False, True):
            triton_ops.FP8_F16_DOTS = f16  # the default every Triton kernel of this process takes
            tag = "f16" if f16 else "bf16"
            res[f"fp8_e4m3_triton_cascade_groups_rel_err_{tag}_dots"] = [
                check_cascade_groups(seed=seed, kv_dtype=torch.float8_e4m3fn, cascade_kernels="triton")
                for seed in range(3)]
            res[f"fp8_e4m3_mixed_cascade_rel_err_{tag}_dots"] = check_backend(
                [1] * 16 + [128, 60], [2048 + 3 * i for i in range(1, 17)] + [2176, 2100], shared=2048,
                kv_dtype=torch.float8_e4m3fn)
            print(res, flush=True)
        triton_ops.FP8_F16_DOTS = default
        for name, kwargs in (("contiguous_own256", {}), ("interleaved_own256", {"interleaved": True}),
                             ("interleaved_own384", {"interleaved": True, "own": 384}),
                             ("prefix_only", {"own": 1})):
            res[f"fp8_f16_tuning_{name}"] = tune_triton_cascade(variants=FP8_F16_VARIANTS, **kwargs)
        try:
            res["triton_cascade_compiled"] = compiled_kernel_resources()
        except Exception as e:  # noqa: BLE001
            print(f"no compiled-kernel resources: {e!r}", flush=True)
        finish(res, args.out)
        return
    if args.tune_cascade:  # the benchmark shape, then mostly level 0 (own keys 1), mostly level 1 (prefix 64)
        res["triton_cascade_tuning_fp8"] = tune_triton_cascade()
        res["triton_cascade_tuning_fp8_prefix_only"] = tune_triton_cascade(own=1)
        res["triton_cascade_tuning_fp8_suffix_only"] = tune_triton_cascade(shared=64)
        try:  # Triton internals, not an API: a change there costs this record, not the run
            res["triton_cascade_compiled"] = compiled_kernel_resources()
        except Exception as e:  # noqa: BLE001
            print(f"no compiled-kernel resources: {e!r}", flush=True)
        finish(res, args.out)
        return
    if args.cascade_kernels:
        for name, kv_dtype in (("bf16", torch.bfloat16), ("fp8_e4m3", torch.float8_e4m3fn)):
            for kernels in ("triton", "flashinfer"):
                res[f"{name}_{kernels}_cascade_groups_rel_err"] = [
                    check_cascade_groups(seed=seed, kv_dtype=kv_dtype, cascade_kernels=kernels)
                    for seed in range(3)]
        res["fp8_e4m3_mixed_cascade_rel_err"] = check_backend(
            [1] * 16 + [128, 60], [2048 + 3 * i for i in range(1, 17)] + [2176, 2100], shared=2048,
            kv_dtype=torch.float8_e4m3fn)
        print(res, flush=True)
        for name, kv_dtype in (("fp8_e4m3", torch.float8_e4m3fn), ("bf16", torch.bfloat16)):
            res[f"cascade_64x16_{name}_32_layers"] = time_cascade(1024, 2048, 256, kv_dtype=kv_dtype,
                                                                  group_rows=16)
        print(res, flush=True)
        res["triton_cascade_tuning_fp8"] = tune_triton_cascade()
        finish(res, args.out)
        return
    res["backend_decode_rel_err"] = check_backend([1, 1, 1, 1], [1, 17, 300, 2048])
    res["backend_extend_rel_err"] = check_backend([5, 300, 1, 64], [5, 1000, 77, 64])
    res["backend_cascade_rel_err"] = check_backend(
        [1] * 16, [2048 + 3 * i for i in range(1, 17)], shared=2048)
    res["backend_cascade_groups_rel_err"] = [check_cascade_groups(seed=s) for s in range(3)]
    res["backend_mixed_rel_err"] = check_backend([1, 1, 1, 1, 300, 5], [17, 300, 2048, 1000, 1300, 5])
    res["backend_mixed_cascade_rel_err"] = check_backend(
        [1] * 16 + [128, 60], [2048 + 3 * i for i in range(1, 17)] + [2176, 2100], shared=2048)
    for name, kv_dtype in (("fp8_e4m3", torch.float8_e4m3fn), ("fp8_e5m2", torch.float8_e5m2)):
        res[f"{name}_decode_rel_err"] = check_backend([1, 1, 1, 1], [1, 17, 300, 2048], kv_dtype=kv_dtype)
        res[f"{name}_extend_rel_err"] = check_backend([5, 300, 1, 64], [5, 1000, 77, 64], kv_dtype=kv_dtype)
        res[f"{name}_mixed_cascade_rel_err"] = check_backend(
            [1] * 16 + [128, 60], [2048 + 3 * i for i in range(1, 17)] + [2176, 2100], shared=2048,
            kv_dtype=kv_dtype)
    print(res, flush=True)
    for name, kv_dtype in (("bf16", torch.bfloat16), ("fp8_e4m3", torch.float8_e4m3fn)):
        res[f"decode_128x2700_attention_32_layers_{name}"] = time_decode(128, 2700, kv_dtype)
        res[f"{name}_cuda_core_decode_rel_err"] = check_backend(
            [1, 1, 1, 1], [1, 17, 300, 2048], kv_dtype=kv_dtype, decode_tensor_cores=False)
    print(res, flush=True)
    res["cascade_attention_32_layers"] = time_cascade(rows=1024, shared=2048, own=256)
    res["mixed_step_attention_32_layers"] = time_mixed(decode_rows=150, context=2700, prompt=4000)
    if args.pdl_check:
        res["pdl_same_tokens"] = await pdl_same_tokens(args.model)
    if args.only_attention or args.pdl_check:
        finish(res, args.out)
        assert res.get("pdl_same_tokens", True), "greedy tokens differ with programmatic dependent launch"
        return
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
    finish(res, args.out)


def finish(res: dict[str, object], out: str | None) -> None:
    print(json.dumps(res, indent=1), flush=True)
    if out:
        with open(out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=".bench-models/llama-3.1-8b")
    parser.add_argument("--out", default=None)
    parser.add_argument("--profile-dir", default=None)
    parser.add_argument("--only-attention", action="store_true", help="the backend checks and timings only")
    parser.add_argument("--pdl-check", action="store_true", help="backend checks, then PDL on/off tokens")
    parser.add_argument("--fp8-f16-check", action="store_true",
                        help="the Triton kernels' fp16 dots over an FP8 pool: errors against torch, then "
                             "cascade timings with and without them (contiguous and interleaved own keys)")
    parser.add_argument("--cascade-kernels", action="store_true",
                        help="only cascade decode: FlashInfer's vs the Triton kernels (FP8 and bf16 pools), "
                             "checked against the torch backend and timed at 64 groups x 16 rows, then the "
                             "Triton kernels' launch settings")
    parser.add_argument("--triton-decode-check", action="store_true",
                        help="decode of <= 8 rows on the Triton split-KV kernel vs the torch backend")
    parser.add_argument("--skip-mixed", action="store_true",
                        help="--triton-decode-check without a mixed step")
    parser.add_argument("--cascade-graph-check", action="store_true",
                        help="Triton cascade decode captured in a CUDA graph (GraphCascade) against eager")
    parser.add_argument("--tune-cascade", action="store_true",
                        help="only the Triton cascade kernels' launch settings (FP8, 64 groups x 16 rows)")
    parser.add_argument("--decode-kernels", action="store_true",
                        help="only a 128-row FP8 decode step's attention on each decode kernel "
                             "(FlashInfer tensor cores, CUDA cores, Triton)")
    anyio.run(main, parser.parse_args())
