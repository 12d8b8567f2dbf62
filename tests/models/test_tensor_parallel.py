"""tp=2 (two gloo processes on the CPU) computes the same logits as tp=1.

Two tiny Qwen2 models run in the same process group: one whose KV heads split across the ranks, and one with a
single KV head (replicated on both ranks) and an odd vocabulary (the last vocab shard is padded).
"""

from __future__ import annotations

import importlib
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from radixserve.memory.kv_pool import KVCache, ReqToTokenTable
from radixserve.models.config import ModelConfig
from radixserve.models.registry import get_model_class
from radixserve.ops.attention.torch_backend import TorchAttentionBackend
from radixserve.ops.embedding import VocabParallelEmbedding
from radixserve.ops.forward_batch import AttentionBatch, ForwardBatch
from radixserve.ops.linear import QKVParallelLinear
from radixserve.ops.parallel import TPGroup

TP = 2
CONFIGS = [
    ModelConfig(
        architecture="Qwen2ForCausalLM", vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
        num_heads=4, num_kv_heads=2, head_dim=16, qkv_bias=True, max_position_embeddings=64,
    ),
    ModelConfig(
        architecture="Qwen2ForCausalLM", vocab_size=255, hidden_size=64, intermediate_size=96, num_layers=2,
        num_heads=4, num_kv_heads=1, head_dim=16, qkv_bias=True, tie_word_embeddings=True,
        max_position_embeddings=64,
    ),
]  # fmt: skip


def random_checkpoint(c: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    """Full (unsharded) HF-named tensors."""
    g = torch.Generator().manual_seed(seed)
    H, inter = c.hidden_size, c.intermediate_size
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (c.vocab_size, H),
        "model.norm.weight": (H,),
    }
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, H)
    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (q, H), p + "self_attn.q_proj.bias": (q,),
            p + "self_attn.k_proj.weight": (kv, H), p + "self_attn.k_proj.bias": (kv,),
            p + "self_attn.v_proj.weight": (kv, H), p + "self_attn.v_proj.bias": (kv,),
            p + "self_attn.o_proj.weight": (H, q),
            p + "mlp.gate_proj.weight": (inter, H), p + "mlp.up_proj.weight": (inter, H),
            p + "mlp.down_proj.weight": (H, inter),
            p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
        }  # fmt: skip
    return {
        name: (1 + 0.1 * torch.randn(s, generator=g))
        if "norm" in name
        else 0.15 * torch.randn(s, generator=g)
        for name, s in shapes.items()
    }


def run_script(config: ModelConfig, checkpoint: dict[str, torch.Tensor], tp: TPGroup) -> list[torch.Tensor]:
    """Prefill three rows, extend them, decode three steps; the logits of every new token of every step."""
    model = get_model_class(config.architecture)(config, tp, torch.float32)
    model.load_weights(checkpoint.items())
    kv_heads = max(config.num_kv_heads // tp.size, 1)
    cache = KVCache(config.num_layers, 211, kv_heads, config.head_dim, torch.float32, "cpu")
    table = ReqToTokenTable(8, config.max_position_embeddings, "cpu")
    backend = TorchAttentionBackend(cache.k_buffers, cache.v_buffers)
    g = torch.Generator().manual_seed(7)  # same slots and tokens on every rank
    free = (torch.randperm(210, generator=g) + 1).tolist()
    lens = {5: 0, 1: 0, 6: 0}  # req_row -> tokens in the pool
    logits = []
    with torch.no_grad():
        for step_lens in ([9, 3, 14], [4, 1, 2], [1, 1, 1], [1, 1, 1], [1, 1, 1]):
            rows = list(lens)
            slots = torch.tensor([free.pop() for _ in range(sum(step_lens))])
            positions = torch.cat(
                [torch.arange(lens[r], lens[r] + n) for r, n in zip(rows, step_lens, strict=True)]
            )
            row_of_token = torch.tensor(rows).repeat_interleave(torch.tensor(step_lens))
            table.write(row_of_token, positions, slots)
            lens = {r: lens[r] + n for r, n in zip(rows, step_lens, strict=True)}
            attn = AttentionBatch(
                req_rows=torch.tensor(rows),
                seq_lens=torch.tensor(list(lens.values()), dtype=torch.int32),
                extend_lens=torch.tensor(step_lens, dtype=torch.int32),
                extend_starts=torch.tensor([0, *step_lens[:-1]]).cumsum(0).to(torch.int32),
                out_slots=slots.long(),
                req_to_token=table.table,
                seq_lens_cpu=tuple(lens.values()),
                extend_lens_cpu=tuple(step_lens),
                is_decode=all(n == 1 for n in step_lens),
            )
            input_ids = torch.randint(0, config.vocab_size, (sum(step_lens),), generator=g)
            logits.append(model.compute_logits(model(ForwardBatch(input_ids, positions, attn, backend))))
    return logits


def _rank_main(rank: int, out_dir: str, checkpoints: list[dict[str, torch.Tensor]]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{out_dir}/rendezvous",
        rank=rank,
        world_size=TP,
        timeout=timedelta(seconds=60),
    )
    try:
        tp = TPGroup(rank, TP, dist.group.WORLD)
        results = [run_script(c, ckpt, tp) for c, ckpt in zip(CONFIGS, checkpoints, strict=True)]
        torch.save(results, Path(out_dir) / f"logits_rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_tp2_logits_equal_tp1(tmp_path: Path) -> None:
    checkpoints = [random_checkpoint(c, seed=i) for i, c in enumerate(CONFIGS)]
    expected = [run_script(c, ckpt, TPGroup()) for c, ckpt in zip(CONFIGS, checkpoints, strict=True)]

    # Spawned children unpickle the function by module name: use the one importable from the repo root
    # (pytest's importlib mode registers this file under another name).
    rank_main = importlib.import_module("tests.models.test_tensor_parallel")._rank_main
    mp.spawn(rank_main, args=(str(tmp_path), checkpoints), nprocs=TP, join=True)

    for rank in range(TP):
        got = torch.load(tmp_path / f"logits_rank{rank}.pt")
        for got_model, expected_model in zip(got, expected, strict=True):
            for got_step, expected_step in zip(got_model, expected_model, strict=True):
                assert got_step.shape == expected_step.shape
                # Only the summation order differs (partial sums, then the all-reduce).
                torch.testing.assert_close(got_step, expected_step, atol=1e-5, rtol=1e-5)


def test_qkv_and_vocab_shards_cover_the_full_tensors() -> None:
    """Loader arithmetic alone (no processes): at tp=4 with 2 KV heads, each KV head sits on 2 ranks."""
    heads, kv_heads, d, hidden, tp_size = 8, 2, 4, 16, 4
    full = {s: torch.randn(n * d, hidden) for s, n in (("q", heads), ("k", kv_heads), ("v", kv_heads))}
    vocab = torch.randn(13, hidden)
    q_parts, vocab_parts = [], []
    for rank in range(tp_size):
        tp = TPGroup(rank, tp_size)
        layer = QKVParallelLinear(hidden, d, heads, kv_heads, False, tp, torch.float32)
        layer.weight_loader(
            layer.weight, torch.cat([full["q"], full["k"], full["v"]])
        )  # an already-fused tensor
        q, k, v = layer.split(layer.weight.T)
        q_parts.append(q.T)
        kv_head = rank // (tp_size // kv_heads)
        assert torch.equal(k.T, full["k"][kv_head * d : (kv_head + 1) * d])
        assert torch.equal(v.T, full["v"][kv_head * d : (kv_head + 1) * d])
        embedding = VocabParallelEmbedding(13, hidden, tp, torch.float32)
        embedding.weight_loader(embedding.weight, vocab)
        vocab_parts.append(embedding.weight.data)
    assert torch.equal(torch.cat(q_parts), full["q"])
    assert torch.equal(torch.cat(vocab_parts)[:13], vocab)  # 4 shards of 4 rows; the last 3 rows are padding
    assert not torch.cat(vocab_parts)[13:].any()
