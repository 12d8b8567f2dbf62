"""RotaryEmbedding against transformers' Llama rotary embedding, for every rope type we support."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from radixserve.errors import UnsupportedFeatureError
from radixserve.ops.rotary import RotaryEmbedding, rope_type_of

HEAD_DIM, MAX_POS = 64, 4096
LLAMA31 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 512,
}


@pytest.mark.parametrize(
    ("scaling", "theta"),
    [(None, 10000.0), ({"rope_type": "linear", "factor": 4.0}, 10000.0), (LLAMA31, 500000.0)],
    ids=["default", "linear", "llama3"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_transformers(scaling: dict | None, theta: float, dtype: torch.dtype) -> None:
    hf_config = LlamaConfig(
        hidden_size=HEAD_DIM * 4,
        num_attention_heads=4,
        max_position_embeddings=MAX_POS,
        rope_parameters={"rope_theta": theta, **(scaling or {"rope_type": "default"})},
    )
    hf_rope = LlamaRotaryEmbedding(hf_config)
    ours = RotaryEmbedding(HEAD_DIM, MAX_POS, theta, scaling, dtype)

    g = torch.Generator().manual_seed(0)
    T = 50
    positions = torch.cat([torch.arange(10), torch.randint(10, MAX_POS, (T - 10,), generator=g)])
    q = torch.randn(T, 4, HEAD_DIM, generator=g).to(dtype)
    k = torch.randn(T, 2, HEAD_DIM, generator=g).to(dtype)

    cos, sin = hf_rope(q, positions[None])  # [1, T, head_dim]
    # HF wants [batch, heads, T, head_dim]
    q_hf, k_hf = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    q_ours, k_ours = ours(positions, q, k)

    # Same formulas, same float32 cos/sin cast to dtype: equal up to the ulps of a vectorized sin/cos.
    tol = {"atol": 1e-6, "rtol": 1e-6}
    torch.testing.assert_close(q_ours, q_hf[0].transpose(0, 1), **tol)
    torch.testing.assert_close(k_ours, k_hf[0].transpose(0, 1), **tol)


def test_llama3_scaling_changes_low_frequencies_only() -> None:
    plain = RotaryEmbedding(HEAD_DIM, MAX_POS, 500000.0, None, torch.float32).cos_sin_cache
    scaled = RotaryEmbedding(HEAD_DIM, MAX_POS, 500000.0, LLAMA31, torch.float32).cos_sin_cache
    half = HEAD_DIM // 2
    assert torch.equal(plain[:, :1], scaled[:, :1])  # the highest frequency is kept
    assert not torch.allclose(plain[:, half - 1], scaled[:, half - 1])  # the lowest is slowed down


@pytest.mark.parametrize("rope_type", ["yarn", "dynamic", "longrope", "mrope"])
def test_unsupported_rope_type_is_named(rope_type: str) -> None:
    with pytest.raises(UnsupportedFeatureError, match=rope_type):
        RotaryEmbedding(HEAD_DIM, MAX_POS, 10000.0, {"rope_type": rope_type, "factor": 2.0}, torch.float32)


def test_old_type_spelling_and_missing_parameter() -> None:
    assert rope_type_of({"type": "linear", "factor": 2.0}) == "linear"
    assert rope_type_of(None) == rope_type_of({}) == rope_type_of({"rope_type": "default"}) == "default"
    with pytest.raises(ValueError, match="low_freq_factor"):
        rope_type_of({"rope_type": "llama3", "factor": 8.0})
