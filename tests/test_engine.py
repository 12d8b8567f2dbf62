"""The engine end to end on the CPU: real worker subprocess, real models, transformers as the reference."""

from __future__ import annotations

import gc
import time

import anyio
import pytest
import pytest_asyncio
import torch

from radixserve import EngineDeadError, InvalidRequestError
from radixserve.engine import Engine
from radixserve.errors import ContextLengthError

pytestmark = pytest.mark.asyncio(loop_scope="module")

# A pool small enough that 8 concurrent requests must retract; admission deliberately over-commits.
SMALL_POOL = dict(
    max_total_tokens=320, chunked_prefill_size=64, new_token_ratio=0.05, min_new_token_ratio=0.0
)

PROMPTS = [
    "Hello",
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers and explain why each one is prime.",
    "Translate to French: the cat sits on the mat.",
    "Once upon a time, in a land far away, there lived a " + "very " * 150 + "old dragon.",
    "Explain photosynthesis in one sentence.",
    "Count from one to ten: one, two,",
]


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def engine():
    async with Engine(None, **SMALL_POOL) as eng:
        yield eng


def hf_greedy(model, prompt_ids: list[int], max_new: int, eos: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt_ids]), max_new_tokens=max_new, do_sample=False, eos_token_id=eos,
            pad_token_id=eos, attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
        )
    return out[0, len(prompt_ids):].tolist()


async def staggered_greedy(
    engine: Engine, prompts: list[list[int]], max_new: int, gap: float = 0.03
) -> list[list[int]]:
    results: list[list[int]] = [[] for _ in prompts]

    async def one(i: int) -> None:
        await anyio.sleep(gap * i)
        out = await engine.generate(
            input_ids=prompts[i], sampling_params={"temperature": 0, "max_new_tokens": max_new}
        )
        results[i] = out.token_ids

    async with anyio.create_task_group() as tg:
        for i in range(len(prompts)):
            tg.start_soon(one, i)
    return results


async def test_default_model_answers_paris(engine: Engine) -> None:
    out = await engine.generate(messages=[{"role": "user", "content": "What is the capital of France?"}],
                                sampling_params={"temperature": 0, "max_new_tokens": 32})
    assert "Paris" in out.text
    assert out.finish_reason == "stop"
    await engine.check_integrity()


async def test_greedy_matches_transformers_smollm(engine: Engine, smollm_hf_model, smollm_tokenizer) -> None:
    prompts = [smollm_tokenizer.encode(p) for p in PROMPTS]
    assert max(len(p) for p in prompts) > 2 * SMALL_POOL["chunked_prefill_size"]  # >= 3 chunks
    retractions = engine.scheduler.core.num_retractions
    prefill_before = engine.scheduler.core.num_prefill_tokens
    got = await staggered_greedy(engine, prompts, 48)
    for prompt, ours in zip(prompts, got, strict=True):
        assert ours == hf_greedy(smollm_hf_model, prompt, 48, 2)
    assert engine.scheduler.core.num_retractions > retractions, "the small pool should force a retraction"
    assert engine.scheduler.core.num_prefill_tokens > prefill_before
    await engine.check_integrity()


async def test_startup_objects_are_out_of_the_garbage_collectors_scans(engine: Engine) -> None:
    """The engine freezes what start-up built (modules, tokenizer): full collections then skip it, where they
    took ~0.1 s for this process's ~200k objects (0.3 s pauses in the step loop on the GPU machine)."""
    assert gc.get_freeze_count() > 50_000


async def test_an_embedding_app_may_keep_its_heap_unfrozen() -> None:
    gc.unfreeze()  # what the module's engine froze
    try:
        async with Engine(None, **SMALL_POOL, disable_gc_freeze=True) as eng:
            assert gc.get_freeze_count() == 0
            params = {"max_new_tokens": 2, "ignore_eos": True}
            out = await eng.generate(input_ids=[1, 2, 3], sampling_params=params)
            assert len(out.token_ids) == 2
            await eng.check_integrity()
    finally:
        gc.freeze()


async def test_fp8_kv_cache_holds_four_times_the_tokens(smollm_hf_model, smollm_tokenizer) -> None:
    """--kv-cache-dtype fp8_e4m3: one byte a K/V element instead of float32's four in the same memory. The
    FP8 rounding moves logits a little, so greedy text may part from transformers' at near ties: every token
    we pick must be among transformers' two likeliest after the same prefix."""
    gib = 0.05
    per_slot_fp32 = 2 * 30 * 3 * 64 * 4  # K and V, 30 layers x 3 KV heads x 64, float32
    async with Engine(None, kv_cache_dtype="fp8_e4m3", cpu_kv_gib=gib, chunked_prefill_size=64) as eng:
        assert eng.ready is not None
        assert eng.ready.num_slots == int(gib * (1 << 30) // (per_slot_fp32 // 4))
        assert eng.ready.kv_bytes == eng.ready.num_slots * per_slot_fp32 // 4
        out = await eng.generate(messages=[{"role": "user", "content": "What is the capital of France?"}],
                                 sampling_params={"temperature": 0, "max_new_tokens": 32})
        assert "Paris" in out.text
        prompts = [smollm_tokenizer.encode(p) for p in PROMPTS[1:6]]
        got = await staggered_greedy(eng, prompts, 24)
        for prompt, ours in zip(prompts, got, strict=True):
            with torch.no_grad():
                logits = smollm_hf_model(torch.tensor([prompt + ours])).logits[0, len(prompt) - 1 : -1]
            top2 = logits.topk(2, dim=-1).indices
            assert all(tok in top2[i] for i, tok in enumerate(ours)), (ours, top2.tolist())
        await eng.check_integrity()


async def test_prefix_hit_prefills_only_new_tokens(engine: Engine) -> None:
    core = engine.scheduler.core
    prefix = list(range(1000, 1300))  # 300 tokens; the small pool's context is 320
    await engine.generate(input_ids=prefix + [5], sampling_params={"max_new_tokens": 1})
    before = core.num_prefill_tokens
    out = await engine.generate(input_ids=prefix + [6, 7, 8], sampling_params={"max_new_tokens": 1})
    assert core.num_prefill_tokens - before == 3
    assert out.usage.cached_tokens == 300
    await engine.check_integrity()


async def test_bad_input_is_rejected_and_engine_keeps_serving(engine: Engine) -> None:
    cases = [
        (dict(prompt=""), "prompt"),
        (dict(input_ids=[]), "input_ids"),
        (dict(input_ids=[1] * 5000), "prompt"),
        (dict(prompt="hi", sampling_params={"max_new_tokens": -1}), "max_new_tokens"),
        (dict(prompt="hi", sampling_params={"top_p": 0.0}), "top_p"),
        (dict(prompt="hi", sampling_params={"top_p": 1.5}), "top_p"),
        (dict(prompt="hi", sampling_params={"bogus_key": 1}), "bogus_key"),
        (dict(prompt="hi", sampling_params={"temperature": "hot"}), "temperature"),
        (dict(input_ids=[10**9]), "input_ids"),
        (dict(input_ids=[1] * 2000 + [-1]), "input_ids"),  # checked off the event loop
        (dict(prompt="hi", sampling_params={"max_new_tokens": 10_000}), "max_new_tokens"),
    ]
    for kwargs, field in cases:
        with pytest.raises(InvalidRequestError) as info:
            await engine.generate(**kwargs)
        assert info.value.field == field, (kwargs, info.value)
    with pytest.raises(ContextLengthError):
        await engine.generate(input_ids=[1] * 5000)
    out = await engine.generate("The sky is", {"max_new_tokens": 4, "temperature": 0})
    assert len(out.token_ids) == 4 and out.finish_reason == "length"
    await engine.check_integrity()


async def test_cancel_aborts_and_frees(engine: Engine) -> None:
    with anyio.move_on_after(0.5):
        await engine.generate("Tell me a long story", {"max_new_tokens": 300, "ignore_eos": True})
    await engine.check_integrity()


async def test_stream_joins_to_generate(engine: Engine) -> None:
    params = {"temperature": 0, "max_new_tokens": 24}
    full = await engine.generate("Tell me about Paris.", params)
    parts = [d async for d in engine.stream("Tell me about Paris.", params)]
    assert "".join(d.text for d in parts) == full.text
    assert parts[-1].finish_reason is not None and all(d.finish_reason is None for d in parts[:-1])
    await engine.check_integrity()


async def test_tiny_qwen2_matches_transformers(tiny_qwen2_dir, smollm_tokenizer) -> None:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_qwen2_dir, dtype=torch.float32).eval()
    prompts = [smollm_tokenizer.encode(p) for p in PROMPTS]
    async with Engine(str(tiny_qwen2_dir), **{**SMALL_POOL, "max_total_tokens": 256}) as eng:
        got = await staggered_greedy(eng, prompts, 24, gap=0.005)
        assert eng.scheduler.core.num_retractions > 0
        await eng.check_integrity()
    for prompt, ours in zip(prompts, got, strict=True):
        assert ours == hf_greedy(hf, prompt, 24, 2)


async def test_killed_worker_fails_pending_requests_fast() -> None:
    async with Engine(None, max_total_tokens=2000) as eng:
        errors: list[BaseException] = []
        done_at: list[float] = []

        async def pending() -> None:
            try:
                await eng.generate("Count forever:", {"max_new_tokens": 1500, "ignore_eos": True})
            except EngineDeadError as e:
                errors.append(e)
                done_at.append(time.monotonic())

        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(pending)
            await anyio.sleep(1.0)
            killed_at = time.monotonic()
            eng._procs[0].kill()
        assert len(errors) == 3
        assert max(done_at) - killed_at < 2.0
        with pytest.raises(EngineDeadError):
            await eng.generate("hello")
