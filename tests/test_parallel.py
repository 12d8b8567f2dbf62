"""Tensor and data parallelism end to end on the CPU (gloo between worker processes).

TP=2/3/4 must give the tokens TP=1 gives (greedy); DP routes a request to the replica that cached its prefix;
two "nodes" on loopback form one TP group; a killed rank fails its whole group within 2 s, and with DP the
other replica keeps serving.
"""

from __future__ import annotations

import random
import re
import socket
import sys
import time
from pathlib import Path

import anyio
import pytest
import pytest_asyncio
import torch

from radixserve import EngineDeadError
from radixserve.config import EngineConfig
from radixserve.engine import Engine
from radixserve.errors import UnsupportedFeatureError
from radixserve.memory.kv_pool import KVCache
from radixserve.outputs import Usage

pytestmark = pytest.mark.asyncio(loop_scope="module")

CPU = dict(device="cpu", max_total_tokens=2048, chunked_prefill_size=64, max_running_requests=32)
TEXTS = [
    "Hello",
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Once upon a time, in a land far away, there lived a " + "very " * 60 + "old dragon.",  # 2 chunks
    "Count from one to ten: one, two,",
]
MAX_NEW = 16


@pytest.fixture(scope="module")
def prompts(smollm_tokenizer) -> list[list[int]]:
    return [smollm_tokenizer.encode(t) for t in TEXTS]


@pytest.fixture(scope="module")
def tiny_qwen2_heads8_dir(tmp_path_factory: pytest.TempPathFactory, smollm_tokenizer) -> Path:
    """A random Qwen2 with 8 query and 4 KV heads (both divide by 4), larger weights than the default init so
    that greedy choices are not near-ties."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(1)
    config = Qwen2Config(
        vocab_size=len(smollm_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048, rope_theta=10000.0,
        tie_word_embeddings=False, eos_token_id=2, bos_token_id=1, initializer_range=0.2,
    )  # fmt: skip
    model = Qwen2ForCausalLM(config).to(torch.float32)
    path = tmp_path_factory.mktemp("tiny-qwen2-heads8")
    model.save_pretrained(path, safe_serialization=True)
    smollm_tokenizer.save_pretrained(path)
    return path


async def greedy(engine: Engine, prompts: list[list[int]], max_new: int = MAX_NEW) -> list[list[int]]:
    """Every prompt at once (staggered by a few ms, so that steps mix prefill and decode)."""
    out: list[list[int]] = [[] for _ in prompts]

    async def one(i: int) -> None:
        await anyio.sleep(0.005 * i)
        result = await engine.generate(
            input_ids=prompts[i], sampling_params={"temperature": 0, "max_new_tokens": max_new}
        )
        out[i] = result.token_ids

    async with anyio.create_task_group() as tg:
        for i in range(len(prompts)):
            tg.start_soon(one, i)
    return out


async def tp1_tokens(model: str | None, prompts: list[list[int]], **kwargs: object) -> list[list[int]]:
    async with Engine(model, **{**CPU, **kwargs}) as engine:
        return await greedy(engine, prompts)


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def reference(tiny_qwen2_dir: Path, prompts: list[list[int]]) -> list[list[int]]:
    """TP=1 greedy tokens of the tiny Qwen2 (4 query heads, 2 KV heads)."""
    return await tp1_tokens(str(tiny_qwen2_dir), prompts)


async def test_parallel_flags_are_validated(tiny_qwen2_dir: Path) -> None:
    for bad in (dict(tp_size=0), dict(tp_size=2, nnodes=2), dict(tp_size=3, nnodes=2, dist_init_addr="h:1"),
                dict(tp_size=2, nnodes=2, dist_init_addr="no-port"), dict(nnodes=2, node_rank=2)):
        with pytest.raises(ValueError):
            EngineConfig(**bad)  # type: ignore[arg-type]
    with pytest.raises(UnsupportedFeatureError):
        EngineConfig(tp_size=2, dp_size=2, nnodes=2, dist_init_addr="h:1")
    with pytest.raises(ValueError, match="num_attention_heads"):  # 4 heads do not split 3 ways
        async with Engine(str(tiny_qwen2_dir), tp_size=3, **CPU):
            pass
    # The fused all-reduce is CUDA IPC: on the CPU the workers refuse it by name, and start-up ends cleanly.
    with pytest.raises(UnsupportedFeatureError, match="--enable-flashinfer-allreduce-fusion needs CUDA"):
        async with Engine(str(tiny_qwen2_dir), tp_size=2, enable_flashinfer_allreduce_fusion=True, **CPU):
            pass


async def test_tp2_matches_tp1(
    tiny_qwen2_dir: Path, prompts: list[list[int]], reference: list[list[int]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.setenv("RADIXSERVE_CHECK_TP_TOKENS", "1")  # the ranks compare their tokens after every step
    async with Engine(str(tiny_qwen2_dir), tp_size=2, **CPU) as engine:
        assert await greedy(engine, prompts) == reference
        # Random sampling (unseeded): both ranks must still draw the same tokens, or the check fails a step.
        params = {"temperature": 1.0, "top_p": 0.9, "max_new_tokens": 8}
        for p in prompts:
            assert len((await engine.generate(input_ids=p, sampling_params=params)).token_ids) == 8
        # Constrained requests under overlap: their masks follow the plans (StepMask) to both ranks.
        regex = r"(cat|dog)s? (and|or) [a-z]{2,6}"
        outs = await greedy_constrained(engine, prompts, {"regex": regex, "max_new_tokens": 24})
        assert all(re.fullmatch(regex, out) for out in outs), outs
        assert engine.schedulers[0].core.num_masks_after_plan > 0, "no constrained step was overlapped"
        await engine.check_integrity()


async def greedy_constrained(
    engine: Engine, prompts: list[list[int]], params: dict[str, object]
) -> list[str]:
    outs = [""] * len(prompts)

    async def one(i: int) -> None:
        outs[i] = (
            await engine.generate(input_ids=prompts[i], sampling_params={"temperature": 0, **params})
        ).text

    async with anyio.create_task_group() as tg:  # together: the constrained rows share overlapped steps
        for i in range(len(prompts)):
            tg.start_soon(one, i)
    return outs


async def test_tp3_default_model_matches_tp1(smollm_tokenizer) -> None:
    """SmolLM2-135M: 9 query heads and 3 KV heads, one per rank."""
    chats = [
        list(smollm_tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True, return_dict=False
        ))
        for q in ("What is the capital of France?", "Name three colors.")
    ]
    expected = await tp1_tokens(None, chats, max_total_tokens=1024)
    async with Engine(None, tp_size=3, **{**CPU, "max_total_tokens": 1024}) as engine:
        assert engine.ready is not None  # each rank stores 1 of the 3 KV heads
        assert engine.ready.kv_bytes == 1025 * KVCache.bytes_per_slot(30, 1, 64, torch.float32)
        assert await greedy(engine, chats) == expected
        await engine.check_integrity()


@pytest.mark.parametrize("model", ["heads8_kv4", "heads4_kv2_replicated"])
async def test_tp4_matches_tp1(
    model: str, tiny_qwen2_heads8_dir: Path, tiny_qwen2_dir: Path, prompts: list[list[int]],
    reference: list[list[int]],
) -> None:  # fmt: skip
    if model == "heads8_kv4":
        path, expected = str(tiny_qwen2_heads8_dir), await tp1_tokens(str(tiny_qwen2_heads8_dir), prompts[:3])
    else:  # 2 KV heads on 4 ranks: each KV head lives on 2 ranks
        path, expected = str(tiny_qwen2_dir), reference[:3]
    async with Engine(path, tp_size=4, **CPU) as engine:
        assert await greedy(engine, prompts[:3]) == expected
        await engine.check_integrity()


async def test_dp2_routes_shared_prefix_to_the_replica_that_cached_it(
    tiny_qwen2_dir: Path, prompts: list[list[int]], reference: list[list[int]]
) -> None:
    rng = random.Random(0)
    prefix = [rng.randrange(1000, 40000) for _ in range(200)]
    async with Engine(str(tiny_qwen2_dir), dp_size=2, **CPU) as engine:
        assert await greedy(engine, prompts) == reference
        first = await engine.open(input_ids=prefix + [5, 6], sampling_params={"max_new_tokens": 4})
        async for _ in engine.outputs(first):
            pass
        # 32 requests in flight at once; the one sharing the long prefix comes in the middle of the burst.
        burst = [[rng.randrange(1000, 40000) for _ in range(rng.randint(8, 40))] for _ in range(31)]
        burst.insert(16, prefix + [7, 8, 9])
        params = {"temperature": 0, "max_new_tokens": 8}
        handles = [await engine.open(input_ids=p, sampling_params=params) for p in burst]
        usages: list[Usage | None] = [None] * len(handles)

        async def collect(i: int) -> None:
            async for out in engine.outputs(handles[i]):
                usages[i] = out.usage or usages[i]

        async with anyio.create_task_group() as tg:
            for i in range(len(handles)):
                tg.start_soon(collect, i)
        assert handles[16].replica == first.replica
        assert usages[16] is not None and usages[16].cached_tokens >= len(prefix)
        assert {h.replica for h in handles} == {0, 1}  # the rest was spread by load
        stats = engine.pool_stats()
        assert len(stats["replicas"]) == 2
        assert stats["total"] == stats["free"] + stats["cached"] + stats["held"]
        assert stats["replicas"][first.replica]["cache_hit_rate"] > 0
        assert sum(r["routed_requests"] for r in stats["replicas"]) == len(prompts) + 1 + len(burst)
        await engine.check_integrity()


async def test_tp2_dp2_end_to_end(
    tiny_qwen2_dir: Path, prompts: list[list[int]], reference: list[list[int]]
) -> None:
    async with Engine(str(tiny_qwen2_dir), tp_size=2, dp_size=2, **CPU) as engine:
        assert len(engine._procs) == 4
        assert await greedy(engine, prompts) == reference
        assert all(r["routed_requests"] > 0 for r in engine.pool_stats()["replicas"])
        await engine.check_integrity()


def free_port_pair() -> int:
    """A port p with p and p + 1 free (the rendezvous and the plan listener)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no free pair of ports")


async def test_two_nodes_tp2(
    tiny_qwen2_dir: Path, prompts: list[list[int]], reference: list[list[int]]
) -> None:
    """Rank 1 runs in a worker-only "node 1" process and gets its plans over TCP."""
    addr = f"127.0.0.1:{free_port_pair()}"
    node = await anyio.open_process(
        [sys.executable, "-m", "radixserve.actors.worker_node", "--tp", "2", "--nnodes", "2",
         "--node-rank", "1", "--dist-init-addr", addr], stdout=None, stderr=None,
    )  # fmt: skip
    try:
        node0 = dict(tp_size=2, nnodes=2, node_rank=0, dist_init_addr=addr)
        async with Engine(str(tiny_qwen2_dir), **node0, **CPU) as eng:
            assert len(eng._procs) == 1  # rank 0 only; rank 1 is node 1's
            assert await greedy(eng, prompts) == reference
            await eng.check_integrity()
        with anyio.fail_after(10):
            assert await node.wait() == 0  # its worker exited on Shutdown, and it after its worker
    finally:
        if node.returncode is None:
            node.terminate()  # it kills its workers
            with anyio.move_on_after(5):
                await node.wait()
        if node.returncode is None:
            node.kill()
            await node.wait()


async def pending_requests(engine: Engine, n: int) -> list:
    params = {"max_new_tokens": 1900, "ignore_eos": True}
    return [await engine.open(input_ids=[100 + i, 200, 300], sampling_params=params) for i in range(n)]


async def test_killed_rank_fails_pending_requests_fast(tiny_qwen2_dir: Path) -> None:
    async with Engine(str(tiny_qwen2_dir), tp_size=2, **CPU) as engine:
        handles = await pending_requests(engine, 3)
        failed_at: list[float] = []

        async def consume(handle) -> None:
            with pytest.raises(EngineDeadError):
                async for _ in engine.outputs(handle):
                    pass
            failed_at.append(time.monotonic())

        async with anyio.create_task_group() as tg:
            for h in handles:
                tg.start_soon(consume, h)
            await anyio.sleep(1.0)
            killed_at = time.monotonic()
            engine._procs[1].kill()  # rank 1; rank 0 is left blocked in a collective
        assert len(failed_at) == 3 and max(failed_at) - killed_at < 2.0
        with anyio.fail_after(2):  # the engine killed rank 0 rather than leave it hanging
            await engine._procs[0].wait()
        with pytest.raises(EngineDeadError):
            await engine.generate("hello")


async def test_dead_replica_fails_its_requests_and_the_other_serves_on(tiny_qwen2_dir: Path) -> None:
    async with Engine(str(tiny_qwen2_dir), tp_size=2, dp_size=2, **CPU) as engine:
        handles = await pending_requests(engine, 4)
        assert {h.replica for h in handles} == {0, 1}
        outcome: dict[str, float | str] = {}

        async def consume(handle) -> None:
            try:
                async for _ in engine.outputs(handle):
                    if outcome.get("killed") and handle.replica == 0:
                        break  # replica 0's requests are still streaming: enough
                outcome[handle.rid] = "done"
            except EngineDeadError:
                outcome[handle.rid] = time.monotonic()

        async with anyio.create_task_group() as tg:
            for h in handles:
                tg.start_soon(consume, h)
            await anyio.sleep(1.0)
            outcome["killed"] = killed_at = time.monotonic()
            engine._procs[3].kill()  # replica 1, rank 1
        for h in handles:
            if h.replica == 1:
                assert isinstance(outcome[h.rid], float) and outcome[h.rid] - killed_at < 2.0  # type: ignore[operator]
            else:
                assert outcome[h.rid] == "done"
        with anyio.fail_after(2):
            await engine._procs[2].wait()  # replica 1's rank 0, killed with its group
        for _ in range(4):  # new requests go to the live replica only
            out = await engine.generate(input_ids=[5, 6, 7], sampling_params={"max_new_tokens": 4})
            assert len(out.token_ids) == 4
        stats = engine.pool_stats()["replicas"]
        assert stats[1]["dead"] and not stats[0]["dead"]
        await engine.check_integrity()
