"""FlashInfer batch decode over the token-level KV pool, timed inside a CUDA graph as a decode step runs it.

Llama-3.1-8B's attention (32 q heads, 8 kv heads, head_dim 128, bf16), page size 1 (NHD), each row's tokens
in random slots: use_tensor_cores on and off, and the tensor-core kernel without split-KV, at batch 1..64 and
1024 / 4096 context tokens. Bytes = K + V + q + out; the graph cycles through up to 32 KV pools (a model's
layers) so that reads miss L2 (bench_gemv.py's timer and rotation).

    python -m radixserve.benchmarks.bench_decode_attention [--peak-gbps 3350] [--quick]
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from functools import partial
from typing import Any

from radixserve.benchmarks.bench_gemv import OPS_PER_GRAPH, Timing, graph_us, make_timing, rotation
from radixserve.benchmarks.common import DEFAULT_RESULT_DIR, print_grid, run_info, write_result

Q_HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128  # Llama-3.1-8B attention
BATCHES = (1, 8, 32, 64)
CONTEXTS = (1024, 4096)
MAX_KV_LAYERS = 32  # the model's layer count: no more distinct KV pools than a real step reads
# The plans timed: FlashInfer's default split-KV decision on tensor cores and CUDA cores, and tensor cores
# without split-KV (one kernel, no merge). Fixed split sizes were tried too: in a CUDA graph on an H100 at
# batch 1 and 1024 tokens 128/256/512 took 11.5/12.6/16.0 us against the default plan's 10.9, and at batch
# 32 FlashInfer 0.5.3 refuses them in CUDA-graph mode.
PLANS: dict[str, tuple[bool, dict[str, Any]]] = {
    "tensor_cores": (True, {}),
    "cuda_cores": (False, {}),
    "tc_no_split": (True, {"disable_split_kv": True}),
}


@dataclass(frozen=True, slots=True)
class AttentionRow:
    batch: int
    context: int
    nbytes: int
    timings: dict[str, Timing]  # by PLANS name
    max_abs_diff: float  # largest difference of any plan's output from the first's


def bench_attention(batch: int, context: int, args: argparse.Namespace) -> AttentionRow:
    import flashinfer
    import torch

    from radixserve.ops.attention.flashinfer_backend import WORKSPACE_BYTES, kv_indptr_host

    dtype, device = torch.bfloat16, torch.device("cuda")
    slots = batch * context
    layer_bytes = 2 * slots * KV_HEADS * HEAD_DIM * 2
    shape = (slots, 1, KV_HEADS, HEAD_DIM)  # the pool's [slots, kv_heads, head_dim] as NHD pages of one token
    pools = [
        (torch.randn(shape, dtype=dtype, device=device), torch.randn(shape, dtype=dtype, device=device))
        for _ in range(min(rotation(layer_bytes), MAX_KV_LAYERS))
    ]
    cycle = [pools[i % len(pools)] for i in range(OPS_PER_GRAPH)]
    q = torch.randn(batch, Q_HEADS, HEAD_DIM, dtype=dtype, device=device)
    indices = torch.randperm(slots, device=device).to(torch.int32)  # a pool after some churn
    workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
    nbytes = layer_bytes + 2 * q.nbytes
    timings: dict[str, Timing] = {}
    outputs: list[torch.Tensor] = []
    for name, (tensor_cores, options) in PLANS.items():
        # What FlashInferAttentionBackend.make_graph_decode_wrapper builds: static buffers for a graph.
        wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            workspace, "NHD", use_cuda_graph=True, use_tensor_cores=tensor_cores,
            paged_kv_indptr_buffer=torch.empty(batch + 1, dtype=torch.int32, device=device),
            paged_kv_indices_buffer=torch.empty(slots, dtype=torch.int32, device=device),
            paged_kv_last_page_len_buffer=torch.empty(batch, dtype=torch.int32, device=device),
        )  # fmt: skip
        wrapper.plan(
            kv_indptr_host((context,) * batch), indices, torch.ones(batch, dtype=torch.int32),
            Q_HEADS, KV_HEADS, HEAD_DIM, 1, q_data_type=dtype, kv_data_type=dtype, sm_scale=HEAD_DIM**-0.5,
            **options,
        )  # fmt: skip
        outputs.append(wrapper.run(q, pools[0]).float())
        us = graph_us([partial(wrapper.run, q, kv) for kv in cycle], args.replays)
        timings[name] = make_timing(us, nbytes, args.peak_gbps)
    diff = max((out - outputs[0]).abs().max().item() for out in outputs)
    times = ", ".join(f"{k} {t.us:.1f} us" for k, t in timings.items())
    print(f"attention batch {batch} context {context}: {times}, max |diff| {diff:.2e}", flush=True)
    del pools, cycle, workspace
    torch.cuda.empty_cache()
    return AttentionRow(batch, context, nbytes, timings, diff)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--peak-gbps", type=float, default=3350.0, help="HBM bandwidth for %% of peak (H100)")
    parser.add_argument("--result-dir", "--out", dest="result_dir", default=DEFAULT_RESULT_DIR,
                        help="JSON result folder ($OUT if set)")
    parser.add_argument("--quick", action="store_true", help="batch 1 and 32 at 1024 tokens")
    parser.add_argument("--replays", type=int, default=10, help="graph replays per timing")
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available():
        raise SystemExit("bench_decode_attention needs a CUDA device")
    torch.manual_seed(0)
    info = run_info("bench_decode_attention", args)
    contexts = CONTEXTS[:1] if args.quick else CONTEXTS
    batches = (1, 32) if args.quick else BATCHES
    rows = [bench_attention(b, c, args) for c in contexts for b in batches]
    path = write_result(args.result_dir, info, {"peak_gbps": args.peak_gbps, "rows": rows})
    print(f"\nresult: {path}  ({info.device}; % of {args.peak_gbps:.0f} GB/s)")
    table = []
    for r in rows:
        fastest = min(r.timings, key=lambda name: r.timings[name].us)
        table.append([r.batch, r.context, *(t.us for t in r.timings.values()), fastest])
    print_grid(["batch", "context", *(f"{k}_us" for k in PLANS), "fastest"], table)


if __name__ == "__main__":
    main()
