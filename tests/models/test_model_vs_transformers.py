"""Our Llama/Qwen2 against transformers running the same random weights, in float32.

The KV pool is driven the way the worker drives it: scattered request rows, scattered (non-contiguous) slot
ids written into req_to_token before each forward, several rows per step, prefill then extend then decode.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch
import transformers as hf

from radixserve.errors import UnsupportedFeatureError
from radixserve.memory.kv_pool import KVCache, ReqToTokenTable
from radixserve.models.config import ModelConfig
from radixserve.models.llama import LlamaForCausalLM
from radixserve.models.registry import get_model_class
from radixserve.ops.attention.torch_backend import TorchAttentionBackend
from radixserve.ops.forward_batch import AttentionBatch, ForwardBatch
from radixserve.ops.parallel import TPGroup

SMALL = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    attn_implementation="eager",
)
LLAMA31_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}
HF_MODELS = {
    "llama": lambda: hf.LlamaForCausalLM(hf.LlamaConfig(**SMALL)),
    "llama31-tied": lambda: hf.LlamaForCausalLM(
        hf.LlamaConfig(**SMALL, rope_parameters=LLAMA31_ROPE, tie_word_embeddings=True)
    ),
    "mistral": lambda: hf.MistralForCausalLM(hf.MistralConfig(**SMALL, head_dim=32, sliding_window=None)),
    "qwen2-tied": lambda: hf.Qwen2ForCausalLM(hf.Qwen2Config(**SMALL, tie_word_embeddings=True)),
    "qwen2": lambda: hf.Qwen2ForCausalLM(
        hf.Qwen2Config(**{**SMALL, "num_hidden_layers": 4}, tie_word_embeddings=False)
    ),
}


def make_hf_model(name: str, seed: int = 0) -> hf.PreTrainedModel:
    """A tiny HF model with weights large enough that a wrong term shows in the logits."""
    torch.manual_seed(seed)
    model = HF_MODELS[name]()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            p.copy_(
                1 + 0.1 * torch.randn_like(p) if pname.endswith("norm.weight") else 0.15 * torch.randn_like(p)
            )
    return model.eval()


class Pool:
    """The worker's side of one model's KV: K/V buffers, req_to_token, and scattered free slots."""

    def __init__(self, config: ModelConfig, tp_size: int = 1, num_slots: int = 997, seed: int = 0) -> None:
        kv_heads = max(config.num_kv_heads // tp_size, 1)
        self.cache = KVCache(config.num_layers, num_slots, kv_heads, config.head_dim, torch.float32, "cpu")
        self.table = ReqToTokenTable(max_rows=16, max_context=config.max_position_embeddings, device="cpu")
        self.backend = TorchAttentionBackend(self.cache.k_buffers, self.cache.v_buffers)
        g = torch.Generator().manual_seed(seed)
        self.free = (torch.randperm(num_slots - 1, generator=g) + 1).tolist()

    def step(self, rows: Sequence[tuple[int, int, Sequence[int]]]) -> ForwardBatch:
        """rows: (req_row, prefix_len, new token ids). Takes slots, writes req_to_token, builds the batch."""
        ids, positions, out_slots = [], [], []
        for row, prefix_len, new in rows:
            slots = torch.tensor([self.free.pop() for _ in new])
            pos = torch.arange(prefix_len, prefix_len + len(new))
            self.table.write(torch.full((len(new),), row), pos, slots)
            ids += list(new)
            positions.append(pos)
            out_slots.append(slots)
        extend_lens = [len(new) for _, _, new in rows]
        seq_lens = [p + len(new) for _, p, new in rows]
        attn = AttentionBatch(
            req_rows=torch.tensor([row for row, _, _ in rows]),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
            extend_lens=torch.tensor(extend_lens, dtype=torch.int32),
            extend_starts=torch.tensor([0, *extend_lens[:-1]]).cumsum(0).to(torch.int32),
            out_slots=torch.cat(out_slots).long(),
            req_to_token=self.table.table,
            seq_lens_cpu=tuple(seq_lens),
            extend_lens_cpu=tuple(extend_lens),
            is_decode=all(n == 1 for n in extend_lens),
        )
        return ForwardBatch(torch.tensor(ids), torch.cat(positions), attn, self.backend)


def last_token_indices(batch: ForwardBatch) -> torch.Tensor:
    return torch.tensor(batch.attn.extend_lens_cpu).cumsum(0) - 1


def build_ours(hf_model: hf.PreTrainedModel, tp: TPGroup | None = None) -> LlamaForCausalLM:
    config = ModelConfig.from_hf_dict(hf_model.config.to_dict())
    model = get_model_class(config.architecture)(config, tp or TPGroup(), torch.float32)
    model.load_weights(hf_model.state_dict().items())
    return model


@torch.no_grad()
def hf_logits(hf_model: hf.PreTrainedModel, tokens: Sequence[int]) -> torch.Tensor:  # [len(tokens), vocab]
    return hf_model(torch.tensor([list(tokens)])).logits[0].float()


def random_prompts(lengths: Sequence[int], vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("name", list(HF_MODELS))
@torch.no_grad()
def test_batched_prefill_matches_transformers(name: str) -> None:
    hf_model = make_hf_model(name)
    ours = build_ours(hf_model)
    prompts = random_prompts([11, 1, 30, 7], ours.config.vocab_size, seed=1)
    batch = Pool(ours.config).step([(3 * i + 1, 0, p) for i, p in enumerate(prompts)])

    logits = ours.compute_logits(ours(batch))  # [T, vocab]

    assert logits.dtype == torch.float32 and logits.shape == (sum(map(len, prompts)), ours.config.vocab_size)
    expected = torch.cat([hf_logits(hf_model, p) for p in prompts])
    assert expected.abs().max() > 1.0  # the weights are not so small that everything is near zero
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", list(HF_MODELS))
@torch.no_grad()
def test_prefix_then_extend_then_decode_matches_transformers(name: str) -> None:
    hf_model = make_hf_model(name, seed=2)
    ours = build_ours(hf_model)
    # Each row's tokens, fed as: a prefill chunk, an extend chunk, then one token per decode step.
    chunks = {2: (9, 5), 7: (1, 12), 4: (16, 1)}  # req_row -> (prefill_len, extend_len)
    decode_steps = 4
    seqs = dict(
        zip(chunks, random_prompts([p + e + decode_steps for p, e in chunks.values()], 256, 3), strict=True)
    )
    pool = Pool(ours.config, seed=4)

    def check(batch: ForwardBatch, lens: dict[int, int]) -> None:
        logits = ours.compute_logits(ours(batch)[last_token_indices(batch)])
        expected = torch.stack([hf_logits(hf_model, seqs[row][: lens[row]])[-1] for row in lens])
        torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)

    check(
        pool.step([(r, 0, seqs[r][:p]) for r, (p, _) in chunks.items()]),
        {r: p for r, (p, _) in chunks.items()},
    )
    lens = {r: p + e for r, (p, e) in chunks.items()}
    check(pool.step([(r, p, seqs[r][p : p + e]) for r, (p, e) in chunks.items()]), lens)  # row 4 decodes here
    for _ in range(decode_steps):
        batch = pool.step([(r, n, [seqs[r][n]]) for r, n in lens.items()])
        assert batch.attn.is_decode
        lens = {r: n + 1 for r, n in lens.items()}
        check(batch, lens)


def test_config_from_transformers_4_spelling() -> None:
    d = {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 128256,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "max_position_embeddings": 131072,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        "bos_token_id": 128000,
        "eos_token_id": [128001, 128008, 128009],
    }
    c = ModelConfig.from_hf_dict(d)
    assert (c.head_dim, c.num_kv_heads, c.rope_theta, c.qkv_bias) == (128, 8, 500000.0, False)
    assert (
        c.rope_scaling is not None
        and c.rope_scaling["rope_type"] == "llama3"
        and "type" not in c.rope_scaling
    )
    assert c.eos_token_ids == (128001, 128008, 128009) and c.bos_token_id == 128000
    assert ModelConfig.from_hf_dict({**d, "eos_token_id": 2, "rope_scaling": None}).eos_token_ids == (2,)
    with pytest.raises(UnsupportedFeatureError, match="yarn"):
        ModelConfig.from_hf_dict({**d, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})


def test_config_sliding_window_caps_context() -> None:
    mistral = hf.MistralConfig(**SMALL, sliding_window=64).to_dict()
    assert ModelConfig.from_hf_dict(mistral).max_position_embeddings == 64
    qwen = hf.Qwen2Config(**SMALL, sliding_window=64, use_sliding_window=False).to_dict()
    assert ModelConfig.from_hf_dict(qwen).max_position_embeddings == 256


def test_unknown_architecture_lists_supported() -> None:
    with pytest.raises(UnsupportedFeatureError, match="Qwen2ForCausalLM") as info:
        get_model_class("GPT2LMHeadModel")
    assert "GPT2LMHeadModel" in str(info.value)


def test_load_weights_rejects_unknown_and_missing_tensors() -> None:
    hf_model = make_hf_model("qwen2")
    ours = build_ours(hf_model)
    state = hf_model.state_dict()
    with pytest.raises(ValueError, match="unexpected"):
        ours.load_weights([*state.items(), ("model.layers.0.mlp.extra.weight", torch.zeros(1))])
    with pytest.raises(ValueError, match="lacks"):
        ours.load_weights((k, v) for k, v in state.items() if "k_proj.bias" not in k)
