"""Qwen2 / Qwen2.5: the Llama network with a bias on the q, k and v projections.

Everything that differs is in ModelConfig (qkv_bias, tie_word_embeddings for the small models), so the class
only pins down the one assumption it makes.
"""

from __future__ import annotations

import torch

from radixserve.models.config import ModelConfig
from radixserve.models.llama import LlamaForCausalLM
from radixserve.ops.parallel import TPGroup


class Qwen2ForCausalLM(LlamaForCausalLM):
    def __init__(self, config: ModelConfig, tp: TPGroup, dtype: torch.dtype) -> None:
        if not config.qkv_bias:
            raise ValueError(
                "Qwen2ForCausalLM expects qkv_bias=True (every Qwen2 checkpoint has q/k/v biases)"
            )
        super().__init__(config, tp, dtype)
