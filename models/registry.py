"""Architecture name (config.json "architectures") -> model class."""

from __future__ import annotations

from radixserve.errors import UnsupportedFeatureError
from radixserve.models.llama import LlamaForCausalLM
from radixserve.models.qwen2 import Qwen2ForCausalLM

MODEL_CLASSES: dict[str, type[LlamaForCausalLM]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,  # the Llama network; its sliding window is handled in ModelConfig
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
}


def get_model_class(architecture: str) -> type[LlamaForCausalLM]:
    try:
        return MODEL_CLASSES[architecture]
    except KeyError:
        supported = ", ".join(sorted(MODEL_CLASSES))
        raise UnsupportedFeatureError(f"architecture {architecture!r} (supported: {supported})") from None
