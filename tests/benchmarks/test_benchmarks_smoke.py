"""CPU smoke tests of the benchmark suite: dataset shapes, metrics, the random model folder, and each
benchmark run end to end on the `tiny` random model."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch

from radixserve.benchmarks import (
    bench_latency,
    bench_offline,
    bench_one_batch,
    gpu_trace,
    profile_decode,
    step_timer,
)
from radixserve.benchmarks.datasets import (
    add_dataset_args,
    build_dataset,
    random_requests,
    shared_prefix_requests,
    sharegpt_synthetic_requests,
)
from radixserve.benchmarks.random_model import CONFIGS, plan_shards, tensor_shapes, write_model
from radixserve.benchmarks.serving_client import request_openai, request_sglang
from radixserve.benchmarks.serving_metrics import RequestOutcome, calculate_metrics
from radixserve.benchmarks.step_timer import HOST_BEGIN

VOCAB = 1000


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The `tiny` random model in float32, split into several shards to exercise the index."""
    path = tmp_path_factory.mktemp("tiny-random")
    write_model("tiny", path, dtype="float32", shard_gib=200e3 / (1 << 30))
    return path


@pytest.fixture
def one_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    # NOTE: the worker subprocess inherits this; two intra-op threads on a 2-core CI box thrash (see
    # tests/server/conftest.py).
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


# ------------------------------------------------------------------------------------------------ datasets


def test_random_dataset_lengths_are_uniform_over_the_range() -> None:
    reqs = random_requests(4000, 200, 100, 0.5, VOCAB, np.random.default_rng(0))
    inputs = np.array([r.prompt_len for r in reqs])
    outputs = np.array([r.output_len for r in reqs])
    assert inputs.min() == 100 and inputs.max() == 200  # [int(200 * 0.5), 200], both ends drawn
    assert outputs.min() == 50 and outputs.max() == 100
    assert abs(inputs.mean() - 150) < 3 and abs(outputs.mean() - 75) < 1.5
    # Uniform: each quarter of the range holds about a quarter of the draws.
    counts = np.histogram(inputs, bins=4, range=(100, 201))[0]
    assert (abs(counts / len(reqs) - 0.25) < 0.03).all(), counts
    assert all(0 <= t < VOCAB for r in reqs[:50] for t in r.input_ids)


def test_random_dataset_range_ratio_edges() -> None:
    fixed = random_requests(20, 64, 8, 1.0, VOCAB, np.random.default_rng(0))
    assert {(r.prompt_len, r.output_len) for r in fixed} == {(64, 8)}
    wide = random_requests(2000, 64, 8, 0.0, VOCAB, np.random.default_rng(0))
    assert min(r.prompt_len for r in wide) == 1 and min(r.output_len for r in wide) == 1


def test_sharegpt_synthetic_is_long_tailed_and_filtered() -> None:
    reqs = sharegpt_synthetic_requests(3000, VOCAB, np.random.default_rng(0), context_len=2048)
    inputs = np.array([r.prompt_len for r in reqs])
    outputs = np.array([r.output_len for r in reqs])
    assert inputs.min() >= 4 and outputs.min() >= 4 and (inputs + outputs).max() <= 2048
    assert 70 < np.median(inputs) < 130 and 100 < np.median(outputs) < 160
    assert inputs.mean() > 1.5 * np.median(inputs)  # a long right tail
    fixed = sharegpt_synthetic_requests(50, VOCAB, np.random.default_rng(0), fixed_output_len=64)
    assert {r.output_len for r in fixed} == {64}


def test_shared_prefix_groups() -> None:
    reqs = shared_prefix_requests(8, 5, 100, 20, 30, VOCAB, np.random.default_rng(0))
    assert len(reqs) == 40
    assert {(r.prompt_len, r.output_len) for r in reqs} == {(120, 30)}
    groups: dict[tuple[int, ...], int] = {}
    for r in reqs:
        groups[tuple(r.input_ids[:100])] = groups.get(tuple(r.input_ids[:100]), 0) + 1
    assert sorted(groups.values()) == [5] * 8
    assert len({tuple(r.input_ids[100:]) for r in reqs}) == 40  # every question differs
    first_group = [tuple(r.input_ids[:100]) for r in reqs[:5]]
    assert len(set(first_group)) > 1, "the prompts are shuffled, not grouped"


def test_build_dataset_takes_sglang_flags() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    add_dataset_args(parser)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(["--dataset-name", "generated-shared-prefix", "--gsp-num-groups", "2",
                              "--gsp-prompts-per-group", "3", "--gsp-system-prompt-len", "10",
                              "--gsp-question-len", "4", "--gsp-output-len", "7"])
    reqs = build_dataset(args, VOCAB)
    assert len(reqs) == 6 and {(r.prompt_len, r.output_len) for r in reqs} == {(14, 7)}
    args = parser.parse_args(["--dataset-name", "random-ids", "--num-prompts", "3", "--random-input-len", "9",
                              "--random-output-len", "2", "--random-range-ratio", "1"])
    assert [(r.prompt_len, r.output_len) for r in build_dataset(args, VOCAB)] == [(9, 2)] * 3
    assert build_dataset(args, VOCAB)[0].input_ids == build_dataset(args, VOCAB)[0].input_ids  # seeded


# ------------------------------------------------------------------------------------------------ metrics


def test_serving_metrics_follow_sglang() -> None:
    outcomes = [
        RequestOutcome(10, True, 5, ttft=0.1, latency=0.5, itl=[0.1] * 4),
        RequestOutcome(20, True, 1, ttft=0.2, latency=0.2, itl=[]),
        RequestOutcome(30, False, 0, error="boom"),
    ]
    m = calculate_metrics(outcomes, duration_s=2.0)
    assert (m.completed, m.failed, m.total_input, m.total_output) == (2, 1, 30, 6)
    assert m.request_throughput == 1.0 and m.input_throughput == 15.0 and m.output_throughput == 3.0
    assert m.mean_ttft_ms == pytest.approx(150.0)
    assert m.mean_tpot_ms == pytest.approx(100.0)  # (0.5 - 0.1) / 4; the 1-token request has no TPOT
    assert m.median_itl_ms == pytest.approx(100.0) and m.max_itl_ms == pytest.approx(100.0)
    assert m.mean_e2e_latency_ms == pytest.approx(350.0)
    assert m.concurrency == pytest.approx(0.35)


def _sse(*payloads: object) -> bytes:
    return b"".join(b"data: " + json.dumps(p).encode() + b"\n\n" for p in payloads) + b"data: [DONE]\n\n"


async def test_serving_clients_parse_streams() -> None:
    from radixserve.benchmarks.datasets import BenchRequest

    def native(n: int, text: str) -> dict[str, object]:
        return {"text": text, "output_ids": list(range(n)), "meta_info": {"completion_tokens": n}}

    def completion(text: str | None, usage: int | None = None) -> dict[str, object]:
        return {"choices": [] if text is None else [{"text": text}],
                "usage": None if usage is None else {"completion_tokens": usage}}

    bodies = {
        "/generate": _sse(native(1, "a"), native(1, "a"), native(3, "abc"), native(4, "abcd")),
        "/v1/completions": _sse(completion("a"), completion("b"), completion(""), completion("c"),
                                completion(None, usage=4)),
    }
    seen: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        return httpx.Response(200, content=bodies[request.url.path])

    opts = {"disable_stream": False, "disable_ignore_eos": False, "extra_request_body": {}, "model": "m"}
    req = BenchRequest([1, 2, 3], 4)
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        native_out = await request_sglang(client, "http://x", req, opts)
        openai_out = await request_openai(client, "http://x", req, opts)
    assert native_out.success and native_out.output_len == 4 and native_out.generated_text == "abcd"
    assert len(native_out.itl) == 3  # 2 tokens in one chunk count as 2 gaps, as in SGLang
    assert native_out.itl[0] == native_out.itl[1] and native_out.ttft > 0
    assert seen[0]["input_ids"] == [1, 2, 3] and seen[0]["sampling_params"]["ignore_eos"] is True
    assert openai_out.success and openai_out.output_len == 4 and openai_out.generated_text == "abc"
    assert len(openai_out.itl) == 2  # one gap per chunk with text
    assert seen[1]["prompt"] == [1, 2, 3] and seen[1]["stream_options"] == {"include_usage": True}


def test_trace_analysis_counts_idle_between_steps() -> None:
    # Three steps of 10 us: a kernel [k, k+8) then its DtoH copy [k+8, k+9); the next step starts at k+10.
    events = []
    for k in (0, 10, 20):
        events.append({"ph": "X", "cat": "kernel", "name": "gemm", "ts": k, "dur": 8})
        events.append({"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy DtoH (Device -> Pinned)", "ts": k + 8,
                       "dur": 1})
    events.append({"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 100})  # not a GPU op
    stats = gpu_trace.analyze({"traceEvents": events}, skip_steps=0)
    assert stats is not None and stats.gpu_ops == 6
    assert stats.window_ms == pytest.approx(0.029) and stats.busy_ms == pytest.approx(0.027)
    assert stats.steps == 2 and stats.median_step_ms == pytest.approx(0.010)
    assert stats.between_step_idle_fraction == pytest.approx(0.1)
    assert gpu_trace.analyze({"traceEvents": events[-1:]}) is None


def test_largest_gaps_name_the_operation_after_each() -> None:
    # [0, 10) gemm, [4, 6) overlapping copy, gap 10-15, [15, 20) attention, gap 20-40, [40, 41) norm
    events = [{"ph": "X", "cat": "kernel", "name": n, "ts": t, "dur": d}
              for n, t, d in (("gemm", 0, 10), ("attention", 15, 5), ("norm", 40, 1))]
    events.append({"ph": "X", "cat": "gpu_memcpy", "name": "copy", "ts": 4, "dur": 2})
    gaps = gpu_trace.largest_gaps({"traceEvents": events})
    assert gaps == [(0.02, 0.02, "norm"), (0.01, 0.005, "attention")]
    assert gpu_trace.largest_gaps({"traceEvents": events}, top=1) == [(0.02, 0.02, "norm")]


def test_host_op_totals_rank_torch_ops_by_host_time() -> None:
    events = [{"ph": "X", "cat": "cpu_op", "name": "aten::linear", "ts": 0.0, "dur": 150.0},
              {"ph": "X", "cat": "cpu_op", "name": "aten::linear", "ts": 200.0, "dur": 50.0},
              {"ph": "X", "cat": "cpu_op", "name": "aten::empty", "ts": 10.0, "dur": 3.0},
              {"ph": "X", "cat": "kernel", "name": "nvjet_gemm", "ts": 5.0, "dur": 500.0},  # device: not host
              {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 20.0, "dur": 6.0}]
    assert gpu_trace.host_op_totals({"traceEvents": events}) == [
        ("aten::linear", 2, pytest.approx(0.2), pytest.approx(100.0)),
        ("aten::empty", 1, pytest.approx(0.003), pytest.approx(3.0))]


def _steps(spec: list[tuple[int, int]]) -> np.ndarray:
    """step_timer records from (rows, tokens) per step: 1 ms steps, the GPU idle 0.1 ms before each launch."""
    rows = []
    for i, (r, t) in enumerate(spec):
        begin = float(i)
        rows.append([i, r, t, begin, begin + 0.1, begin + 1.0, begin, begin + 0.1, begin + 0.9])
    return np.array(rows)


def test_profile_decode_picks_the_steady_full_batch() -> None:
    steps = _steps([(2, 64), (4, 64), (4, 4), (4, 4), (4, 4), (4, 4), (4, 4), (4, 4), (2, 2)])
    gaps = profile_decode.decode_gaps(steps, "host", 4, skip=1)
    assert gaps.full_batch and gaps.mean_rows == 4 and gaps.steps == 4  # steps 3..7, the 2-row tail left out
    assert gaps.median_step_ms == pytest.approx(1.0) and gaps.idle_fraction == pytest.approx(0.1)
    assert gaps.decode_tokens_per_s == pytest.approx(4000.0)
    # A scheduler that never runs all 4 requests at once: every steady decode step is measured.
    split = _steps([(4, 64)] + [(3, 3), (2, 2)] * 4)
    gaps = profile_decode.decode_gaps(split, "host", 4, skip=0)
    assert not gaps.full_batch and gaps.steps == 7 and gaps.mean_rows == pytest.approx(17 / 7)


def test_offline_step_breakdown_splits_device_time_by_kind() -> None:
    # (step, rows, tokens, launch ms, end ms), shuffled; a step without a launch mark is left out. Periods:
    # 5, 1.5, 2.5, 3, 3.5 and 1.5 (the last: end - launch), span 17 ms; idle after each: 1, .5, 0, 2, .5, 0.
    spec = [(4, 3, 50, 12.0, 15.0), (0, 2, 100, 0.0, 4.0), (2, 200, 200, 6.5, 9.0), (1, 2, 2, 5.0, 6.0),
            (5, 600, 600, 15.5, 17.0), (3, 20, 20, 9.0, 10.0), (6, 4, 4, float("nan"), 18.0)]
    steps = np.array([[i, r, t, la - 0.5, la, e, 0.0, 0.0, 0.0] for i, r, t, la, e in spec])
    steps[:, 8] = [2.5, 3.0, 1.0, 0.5, 1.0, 0.5, 0.0]  # host_end - host_begin (ms): the worker's host time
    b = bench_offline.step_breakdown(steps, graph_max_rows=160, clock="host")
    assert (b.steps, b.clock, b.graph_max_rows) == (6, "host", 160)
    assert b.span_s == pytest.approx(0.017) and b.idle_s == pytest.approx(0.004)
    assert b.idle_fraction == pytest.approx(4 / 17)
    graph, eager, mixed = b.kinds
    assert (graph.kind, graph.steps, eager.kind, eager.steps, mixed.kind, mixed.steps) == (
        "decode_graph", 2, "decode_eager", 2, "mixed", 2)
    assert graph.period_s == pytest.approx(0.0045) and graph.share == pytest.approx(4.5 / 17)
    assert graph.idle_s == pytest.approx(0.0025) and graph.mean_rows == graph.mean_tokens == 11
    assert graph.tokens_per_s == pytest.approx(22 / 0.0045)
    assert eager.period_s == pytest.approx(0.004) and eager.idle_s == 0 and eager.mean_rows == 400
    assert eager.tokens_per_s == pytest.approx(200_000)
    assert mixed.period_s == pytest.approx(0.0085) and mixed.idle_s == pytest.approx(0.0015)
    assert (mixed.mean_rows, mixed.mean_tokens) == (2.5, 75)
    assert mixed.tokens_per_s == pytest.approx(150 / 0.0085)
    assert sum(k.share for k in b.kinds) == pytest.approx(1.0)
    assert (graph.host_s, eager.host_s, mixed.host_s) == pytest.approx((0.001, 0.002, 0.0055))
    # the longest periods first, each with its host time
    assert [(s.step, s.rows, s.tokens) for s in b.slowest] == [(0, 2, 100), (4, 3, 50), (3, 20, 20)]
    assert b.slowest[0].period_ms == pytest.approx(5.0) and b.slowest[0].host_ms == pytest.approx(3.0)
    hist = {r.rows: (r.steps, round(r.period_s * 1e3, 6)) for r in b.decode_rows}
    assert hist == {"1-16": (1, 1.5), "17-64": (1, 3.0), "65-160": (0, 0.0), "161-256": (1, 2.5),
                    "257-512": (0, 0.0), ">512": (1, 1.5)}
    # No CUDA graphs (the CPU, --disable-cuda-graph): every decode step is eager.
    graph, eager, _ = bench_offline.step_breakdown(steps, graph_max_rows=0).kinds
    assert graph.steps == 0 and graph.tokens_per_s == 0 and eager.steps == 4
    assert eager.period_s == pytest.approx(0.0085)
    # A profiler window closed as step 4 began: the 2 ms gap before it (the trace export) leaves the span
    b = bench_offline.step_breakdown(steps, graph_max_rows=160, clock="host", profiler_stop=4)
    assert b.profiler_export_s == pytest.approx(0.002)
    assert b.span_s == pytest.approx(0.015) and b.idle_s == pytest.approx(0.002)
    assert b.kinds[0].period_s == pytest.approx(0.0025) and b.kinds[0].idle_s == pytest.approx(0.0005)


def test_steps_between_keeps_the_measured_window() -> None:
    # Host marks in ms since the worker's host base (1 s of perf_counter_ns): steps begun at 1.000, 1.005, ...
    steps = _steps([(1, 1)] * 6)
    steps[:, HOST_BEGIN] = [0.0, 5.0, 10.0, 15.0, 20.0, 25.0]
    steps = steps[::-1]  # in any order
    dump = {"steps": steps, "host_base_ns": 1_000_000_000}
    window = step_timer.steps_between(dump, 1_004_000_000, 1_020_000_000)
    assert window[:, 0].tolist() == [1, 2, 3, 4]  # begun in [1.004 s, 1.020 s], in step order
    assert step_timer.steps_between({"steps": steps}, 0, 1)[:, 0].tolist() == [0, 1, 2, 3, 4, 5]


# --------------------------------------------------------------------------------------------- random model


def test_checkpoint_layout_matches_the_real_models() -> None:
    shapes = dict(tensor_shapes(CONFIGS["llama-3.1-8b"]))
    assert sum(np.prod(s) for s in shapes.values()) == 8_030_261_248  # Llama-3.1-8B's parameter count
    assert shapes["model.layers.0.self_attn.k_proj.weight"] == (1024, 4096)
    qwen = dict(tensor_shapes(CONFIGS["qwen2-7b"]))
    assert qwen["model.layers.27.self_attn.q_proj.bias"] == (3584,)
    assert sum(np.prod(s) for s in qwen.values()) == 7_615_616_512  # Qwen2-7B's parameter count
    shards = plan_shards(list(shapes.items()), 2, 2 << 30)
    assert all(sum(2 * np.prod(s) for _, s in shard) <= 2 << 30 for shard in shards if len(shard) > 1)
    assert [n for shard in shards for n, _ in shard] == list(shapes)


def test_random_model_loads_with_transformers_and_our_loader(tiny_model: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from radixserve.models.loader import load_model
    from radixserve.models.source import resolve_model_source
    from radixserve.models.tokenizer import load_tokenizer

    index = json.loads((tiny_model / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1, "the fixture should be sharded"
    config = json.loads((tiny_model / "config.json").read_text())

    hf = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = hf(torch.randint(0, config["vocab_size"], (1, 16))).logits
    assert torch.isfinite(logits).all() and logits.shape[-1] == config["vocab_size"]

    ours, model_config = load_model(str(tiny_model), torch.float32, torch.device("cpu"))
    assert model_config.vocab_size == config["vocab_size"] and model_config.num_layers == 2
    hf_embed = hf.get_input_embeddings().weight
    assert torch.equal(ours.model.embed_tokens.weight[: hf_embed.shape[0]], hf_embed)

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    assert len(tokenizer) == config["vocab_size"]
    assert tokenizer.eos_token_id in config["eos_token_id"]
    assert tokenizer.bos_token_id == config["bos_token_id"]
    ids = tokenizer.encode("Hello world, 42 times.")
    assert ids and max(ids) < config["vocab_size"] and tokenizer.decode(ids) == "Hello world, 42 times."
    assert all(tokenizer.decode([i]) for i in range(300, config["vocab_size"], 97)), "ids decode to text"
    assert "<|im_start|>assistant" in tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert load_tokenizer(resolve_model_source(str(tiny_model))).eos_token_id == tokenizer.eos_token_id


# ------------------------------------------------------------------------------------------------ end to end


@pytest.mark.timeout(120)
def test_bench_offline_end_to_end(tiny_model: Path, tmp_path: Path, one_thread: None) -> None:
    start = time.perf_counter()
    result = bench_offline.main([
        "--model-path", str(tiny_model), "--num-prompts", "6", "--random-input-len", "48",
        "--random-output-len", "12", "--random-range-ratio", "0.5", "--warmup-prompts", "2",
        "--max-total-tokens", "2048", "--max-concurrency", "4", "--result-dir", str(tmp_path),
    ])
    elapsed = time.perf_counter() - start
    assert result.successful_requests == 6
    assert result.total_output_tokens == result.dataset["total_output_tokens"]  # ignore_eos: exact lengths
    assert result.output_throughput > 0 and result.duration_s > 0
    (path,) = tmp_path.glob("bench_offline-*.json")
    body = json.loads(path.read_text())
    assert body["run"]["device"] == "cpu" and body["run"]["git_commit"]
    assert body["run"]["params"]["max_total_tokens"] == 2048 and "bench_offline" in body["run"]["command"]
    assert elapsed < 60, f"the smoke run took {elapsed:.1f} s"


@pytest.mark.timeout(120)
def test_bench_offline_step_timing_covers_the_measured_run(
    tiny_model: Path, tmp_path: Path, one_thread: None
) -> None:
    result = bench_offline.main([
        "--model-path", str(tiny_model), "--num-prompts", "4", "--random-input-len", "40",
        "--random-output-len", "8", "--random-range-ratio", "0.5", "--warmup-prompts", "2",
        "--max-total-tokens", "2048", "--step-timing", "--result-dir", str(tmp_path),
    ])
    b = result.step_breakdown
    assert b is not None and b.clock == "host" and b.graph_max_rows == 0  # the CPU: no CUDA graphs
    (path,) = tmp_path.glob("bench_offline-*.json")
    body = json.loads(path.read_text())
    steps = np.array(body["result"]["steps"])
    assert body["result"]["step_breakdown"]["steps"] == b.steps == len(steps)
    # Every prompt token once (no cache hits: random prompts, flushed after warm-up) and one token per decode
    # step after the first output token: the window holds the measured steps, none of the warm-up's.
    expected = result.total_input_tokens + result.total_output_tokens - result.successful_requests
    assert result.cached_tokens == 0 and steps[:, 2].sum() == expected
    assert sum(k.steps for k in b.kinds) == b.steps and b.kinds[2].steps >= 1
    assert sum(k.share for k in b.kinds) == pytest.approx(1.0) and 0 < b.span_s <= result.duration_s


@pytest.mark.timeout(120)
def test_bench_offline_profiles_host_ops_of_decode_steps(
    tiny_model: Path, tmp_path: Path, one_thread: None, capsys: pytest.CaptureFixture[str]
) -> None:
    bench_offline.main([
        "--model-path", str(tiny_model), "--num-prompts", "2", "--random-input-len", "16",
        "--random-output-len", "16", "--random-range-ratio", "1", "--warmup-prompts", "0",
        "--max-total-tokens", "1024", "--step-timing", "--profile-decode-steps", "2", "--profile-host",
        "--result-dir", str(tmp_path),
    ])
    out = capsys.readouterr().out
    assert "Kernels of 2 decode steps" in out and "Host-side torch ops of the same 2 steps" in out
    ops = gpu_trace.host_op_totals(gpu_trace.load_trace(tmp_path / "trace_decode_steps.json"))
    assert ops and all(count >= 1 and total > 0 for _, count, total, _ in ops)
    assert any(name.startswith("aten::") for name, *_ in ops)
    with pytest.raises(SystemExit):  # a host profile needs a profiler window
        bench_offline.parse_args(["--model-path", str(tiny_model), "--step-timing", "--profile-host"])


@pytest.mark.timeout(120)
def test_bench_latency_end_to_end(tiny_model: Path, tmp_path: Path, one_thread: None) -> None:
    result = bench_latency.main([
        "--model-path", str(tiny_model), "--input-len", "40", "--output-len", "9", "--repeats", "2",
        "--max-total-tokens", "1024", "--result-dir", str(tmp_path),
    ])
    assert len(result.runs) == 2 and result.decode_tok_s > 0 and result.median_itl_ms > 0
    assert all(r.ttft_s > 0 and r.p99_itl_ms >= r.median_itl_ms for r in result.runs)
    (path,) = tmp_path.glob("bench_latency-*.json")
    body = json.loads(path.read_text())
    assert body["result"]["input_len"] == 40 and body["run"]["params"]["max_total_tokens"] == 1024


@pytest.mark.timeout(60)
def test_bench_one_batch_end_to_end(tiny_model: Path, tmp_path: Path, one_thread: None) -> None:
    results = bench_one_batch.main([
        "--model-path", str(tiny_model), "--batch-size", "1", "3", "--input-len", "32", "--output-len", "5",
        "--result-dir", str(tmp_path),
    ])
    assert [r.batch_size for r in results] == [1, 3]
    assert all(len(r.decode_latencies_s) == 4 and r.median_decode_latency_s > 0 for r in results)
    (path,) = tmp_path.glob("bench_one_batch-*.json")
    assert len(json.loads(path.read_text())["result"]["batches"]) == 2


def test_bench_one_batch_plans_generate_what_transformers_generates(tmp_path: Path) -> None:
    """The hand-written StepPlans (whole batch, whole prompts per step, chunked prompts) drive the runner to
    transformers' greedy tokens: the benchmark measures real decoding, not garbage."""
    from transformers import AutoModelForCausalLM

    from radixserve.actors.gpu_worker import build_runner

    write_model("tiny", tmp_path, dtype="float32", std=0.3)  # a larger std: no near-ties between logits
    args = bench_one_batch.parse_args(["--model-path", str(tmp_path), "--batch-size", "3", "--input-len",
                                       "24", "--output-len", "6", "--device", "cpu"])
    runner, _ = build_runner(bench_one_batch.make_init(args))
    prompts = np.random.default_rng(0).integers(0, 1024, size=(3, 24))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = hf.generate(torch.from_numpy(prompts), max_new_tokens=6, do_sample=False, min_new_tokens=6,
                               attention_mask=torch.ones(3, 24, dtype=torch.long))[:, 24:].numpy()
    step, released = 0, list[int]()
    for max_prefill in (None, 50, 10):  # one step; two prompts then one; chunks of 10, 10, 4 per prompt
        plans = bench_one_batch.PlanWriter(3, 24, 6, step)
        _, decodes, tokens = bench_one_batch.generate(runner, plans, prompts, 6, released, max_prefill)
        assert len(decodes) == 5
        np.testing.assert_array_equal(tokens, expected)
        step, released = plans.next_step, [0, 1, 2]


@pytest.mark.timeout(120)
def test_profile_decode_times_worker_steps(tiny_model: Path, tmp_path: Path, one_thread: None) -> None:
    result = profile_decode.main([
        "--model-path", str(tiny_model), "--batch-size", "3", "--input-len", "16", "--output-len", "20",
        "--skip-steps", "2", "--torch-profile-steps", "4", "--max-total-tokens", "2048",
        "--result-dir", str(tmp_path),
    ])
    gaps = result.gaps
    assert gaps.clock == "host" and gaps.batch_size == 3 and gaps.steps >= 8
    assert 0 <= gaps.idle_fraction < 1 and gaps.median_step_ms > 0
    assert result.trace_path is not None and Path(result.trace_path).is_file()  # a CPU-only Kineto trace


def test_bench_scheduler_measures_steady_decode_steps() -> None:
    from radixserve.benchmarks import bench_scheduler

    cost = bench_scheduler.measure(rows=24, steps=10, system_len=64, question_len=8)
    assert cost.rows == 24 and cost.steps == 10
    assert 0 < cost.schedule_ms and 0 < cost.apply_ms
    assert cost.total_ms == pytest.approx(cost.schedule_ms + cost.apply_ms)
    assert cost.us_per_row == pytest.approx(1e3 * cost.total_ms / 24)


def test_gc_pauses_recorded_and_counted_in_the_window() -> None:
    import gc

    from radixserve.benchmarks.gc_pauses import GcPauses, summarize

    pauses = GcPauses().install()
    try:
        gc.collect()  # a full collection: one gen-2 record
    finally:
        pauses.uninstall()
    assert [g for g, _, _ in pauses.records] == [2]
    records = [(2, 1_000_000, 7.0), (0, 2_000_000, 0.5), (2, 3_000_000, 2.0), (2, 9_000_000, 40.0)]
    got = summarize(records, start_ns=1_000_000, end_ns=5_000_000)  # the last one is outside
    assert got["gen2"] == {"count": 2, "total_ms": 9.0, "max_ms": 7.0}
    assert got["gen0"]["count"] == 1 and got["gen1"]["count"] == 0
    assert got["long_pauses"] == [(2, 0.0, 7.0)]
