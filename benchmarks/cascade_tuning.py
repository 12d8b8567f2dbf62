"""The Triton cascade decode kernels on a GPU (development tool, called by check_gpu_path): their launch
settings swept at the shared-prefix benchmark's shape, each compiled variant's registers and shared memory,
and the cascade replayed from a CUDA graph (GraphCascade) against eager.
"""

from __future__ import annotations

import statistics

import torch

from radixserve.ops.kv_dtype import to_kv

# (launch settings, level-0 waves): the defaults, then one change each
DEFAULT_VARIANTS: list[tuple[dict[str, object], int]] = [
    ({}, 2), ({"block_n": (128, 128), "num_warps": (4, 4)}, 2), ({"fuse_merge": False}, 2),
    ({"num_stages": (3, 2)}, 2), ({"block_n": (64, 32)}, 2), ({"block_n": (128, 16)}, 2),
    ({"num_stages": (2, 3)}, 2), ({"num_warps": (4, 2)}, 2), ({}, 4),
]
FP8_F16_VARIANTS: list[tuple[dict[str, object], int]] = [
    ({"fp8_f16": False}, 2), ({"fp8_f16": True}, 2), ({"fp8_f16": True, "num_stages": (3, 2)}, 2),
]


def shared_prefix_pool(
    rows: int, group_rows: int, shared: int, own: int, layers: int, kv_dtype: torch.dtype,
    interleaved: bool = False,
) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """Random K/V pools ([slots, 8 kv heads, 128] a layer, Llama-3-8B's) and a request table of `rows` rows
    in groups of `group_rows` sharing a `shared`-token prefix (one copy in the pool, as the radix tree keeps
    it), each row with `own` keys of its own: contiguous, or interleaved as decoding allocates them (token t
    of row r at t * rows + r)."""
    dev, dt, hkv, d = "cuda", torch.bfloat16, 8, 128
    groups = rows // group_rows
    slots = groups * shared + rows * own + 1
    k_bufs = [to_kv(torch.randn(slots, hkv, d, device=dev, dtype=dt), kv_dtype) for _ in range(layers)]
    v_bufs = [to_kv(torch.randn(slots, hkv, d, device=dev, dtype=dt), kv_dtype) for _ in range(layers)]
    table = torch.zeros(rows, shared + own, dtype=torch.int32, device=dev)
    prefixes = 1 + torch.arange(groups * shared, device=dev, dtype=torch.int32).view(groups, 1, shared)
    table[:, :shared] = prefixes.expand(groups, group_rows, shared).reshape(rows, shared)
    own_slots = 1 + groups * shared + torch.arange(rows * own, device=dev)
    own_slots = own_slots.view(own, rows).t() if interleaved else own_slots.view(rows, own)
    table[:, shared:] = own_slots.int()
    return k_bufs, v_bufs, table


def tune_triton_cascade(rows: int = 1024, group_rows: int = 16, shared: int = 2048, own: int = 256,
                        layers: int = 16, variants: list[tuple[dict[str, object], int]] | None = None,
                        interleaved: bool = False) -> list[dict[str, object]]:
    """The Triton cascade kernels' launch settings over an FP8 pool of the shared-prefix benchmark's shape:
    key tile, warps and stages (level 0, level 1), level-0 queries a program and waves, level 1 merging
    level 0 itself or the reduce kernel; milliseconds per 32 layers for each (CUDA events over `layers`
    layers, median of 5, best of 3 rounds). The grid has the kv heads fastest (2% better, session 7).
    interleaved: the rows' own keys in slots as decoding allocates them (token t of row r at t * rows + r),
    not each row's in one run."""
    from radixserve.ops.attention.cascade import plan_cascade
    from radixserve.ops.attention.triton_cascade import (
        cascade_decode_attention,
        cascade_tensors,
        cascade_workspace,
    )

    dev, dt, hq, hkv, d = "cuda", torch.bfloat16, 32, 8, 128
    k_bufs, v_bufs, table = shared_prefix_pool(rows, group_rows, shared, own, layers, torch.float8_e4m3fn,
                                               interleaved)
    seq = (shared + own,) * rows
    plan = plan_cascade(seq, tuple(0 if r % group_rows == 0 else shared for r in range(rows)))
    assert plan is not None
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    workspace = cascade_workspace(rows, hq, d, dev)
    q = torch.randn(rows, hq, d, device=dev, dtype=dt)
    seq_t, req_rows = torch.tensor(seq, device=dev, dtype=torch.int32), torch.arange(rows, device=dev)
    # Session 8 on an H100: 64 queries a level-0 program beat 16 and 32 at every shape; level 1 merging level
    # 0 itself beat the reduce kernel (14.8 vs 17.1 ms); level 1 in 32-key tiles on one warp beat 128 keys on
    # four (13.4 vs 14.8); level 0's stages, waves and 64-key tiles changed nothing. Lost and removed: level
    # 1 loading level 0's first split before its keys (+0.5 ms: registers), and K/V loads pipelined by hand
    # (the next tile's gathers in flight during the dots: 390-456 spilled registers at 4 and 1 warps, 14.3 to
    # 17.8 ms without spills). Timings drift by ~10% over a sweep on one card, so each setting is timed in 3
    # rounds (the best round's median counts).
    base: dict[str, object] = {}
    variants = DEFAULT_VARIANTS if variants is None else variants
    runs = []
    for change, waves in variants:
        tensors = cascade_tensors(plan, seq, hq, hkv, torch.device(dev), num_sms=num_sms, prefix_waves=waves)
        kwargs = {**base, **change}

        def run(tensors=tensors, kwargs=kwargs) -> None:  # type: ignore[no-untyped-def]
            for layer in range(layers):
                cascade_decode_attention(q, k_bufs[layer], v_bufs[layer], table, req_rows, seq_t, d**-0.5,
                                         tensors, workspace=workspace, **kwargs)  # type: ignore[arg-type]
        run()  # compiles
        runs.append(run)
    best = [float("inf")] * len(runs)
    for _ in range(3):
        for i, run in enumerate(runs):
            times = []
            for _ in range(5):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                run()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            best[i] = min(best[i], statistics.median(times) * 32 / layers)
    out: list[dict[str, object]] = []
    for (change, waves), ms in zip(variants, best, strict=True):
        out.append({"change": {k: list(v) if isinstance(v, tuple) else v for k, v in change.items()},
                    "prefix_waves": waves, "ms_32_layers": ms})
        print(out[-1], flush=True)
    return out


def compiled_kernel_resources() -> list[dict[str, object]]:
    """Registers, spills and shared memory of every compiled variant of the cascade kernels (what limits
    the programs an SM holds at once)."""
    from radixserve.ops.attention import triton_kernels

    out: list[dict[str, object]] = []
    for name in ("_prefix_split_kernel", "_decode_split_kernel", "_decode_reduce_kernel"):
        fn = getattr(triton_kernels, name)
        for cache in getattr(fn, "device_caches", {}).values():
            for kernel in cache[0].values():
                meta = kernel.metadata
                out.append({"kernel": name, "num_warps": meta.num_warps, "num_stages": meta.num_stages,
                            "regs": kernel.n_regs, "spills": kernel.n_spills, "shared_bytes": meta.shared})
                print(out[-1], flush=True)
    return out


def check_cascade_graph(max_rows: int = 384, seed: int = 0) -> list[float]:
    """GraphCascade (ops/attention/graph_cascade.py) in a captured CUDA graph, the attention alone: capture
    on padding rows, then replay the plans of two different steps (fewer rows than the graph, other groups)
    and compare each with eager Triton cascade on the same inputs: relative error per replay. The padding
    rows' outputs must stay finite."""
    from radixserve.ops.attention.cascade import plan_cascade
    from radixserve.ops.attention.graph_cascade import GraphCascade
    from radixserve.ops.attention.triton_cascade import cascade_decode_attention, cascade_tensors

    gen = torch.Generator().manual_seed(seed)
    dev, dt, hq, hkv, d = torch.device("cuda"), torch.bfloat16, 32, 8, 128
    kb = to_kv(torch.randn(200_000, hkv, d, device=dev, dtype=dt), torch.float8_e4m3fn)
    vb = to_kv(torch.randn(200_000, hkv, d, device=dev, dtype=dt), torch.float8_e4m3fn)
    pad_row = max_rows  # the table's last row: all slot 0, as a CUDA graph's padding rows read
    table = torch.zeros(max_rows + 1, 4096, dtype=torch.int32, device=dev)
    graph = GraphCascade(max_rows, hq, hkv, d, dev,
                         num_sms=torch.cuda.get_device_properties(dev).multi_processor_count)
    q_static = torch.zeros(max_rows, hq, d, device=dev, dtype=dt)
    rows_static = torch.full((max_rows,), pad_row, dtype=torch.int64, device=dev)
    seq_static = torch.ones(max_rows, dtype=torch.int32, device=dev)

    def attend() -> torch.Tensor:
        return cascade_decode_attention(q_static, kb, vb, table, rows_static, seq_static, d**-0.5,
                                        graph.tensors, workspace=graph.workspace)

    graph.load_padding()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        attend(), attend()  # compiles outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    cuda_graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(cuda_graph):
        out = attend()
    errors = []
    for groups, size in ((12, 20), (5, 60)):  # groups x rows of a step
        n, next_slot, seq, shared = groups * size, 1, [], []
        table[:max_rows].zero_()
        for g in range(groups):
            prefix = int(torch.randint(100, 3001, (1,), generator=gen))
            for i in range(size):
                tail = int(torch.randint(1, 300, (1,), generator=gen))
                r = g * size + i
                table[r, :prefix] = torch.arange(next_slot, next_slot + prefix, dtype=torch.int32)
                start = next_slot + prefix + i * 300  # each row's own slots past the group's prefix
                table[r, prefix : prefix + tail] = torch.arange(start, start + tail, dtype=torch.int32)
                seq.append(prefix + tail)
                shared.append(prefix if i else 0)
            next_slot += prefix + size * 300
        plan = plan_cascade(tuple(seq), tuple(shared))
        assert plan is not None, "the check's steps should take cascade"
        q = torch.randn(n, hq, d, device=dev, dtype=dt)
        q_static.zero_()
        q_static[:n] = q
        rows_static.fill_(pad_row)
        rows_static[:n] = torch.arange(n, device=dev)
        seq_static.fill_(1)
        seq_t = torch.tensor(seq, dtype=torch.int32, device=dev)
        seq_static[:n] = seq_t
        graph.load(plan, n)
        cuda_graph.replay()
        num_sms = torch.cuda.get_device_properties(dev).multi_processor_count
        eager = cascade_decode_attention(q, kb, vb, table, torch.arange(n, device=dev), seq_t, d**-0.5,
                                         cascade_tensors(plan, tuple(seq), hq, hkv, dev, num_sms=num_sms))
        torch.cuda.synchronize()
        assert torch.isfinite(out.float()).all(), "a padding row's output is not finite"
        errors.append(float((out[:n].float() - eager.float()).norm() / eager.float().norm()))
    return errors
