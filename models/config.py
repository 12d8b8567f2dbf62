"""The model's shape and hyperparameters, read once from a HF config.json and never mutated."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from radixserve.errors import UnsupportedFeatureError
from radixserve.ops.rotary import rope_type_of

# Configs built in memory (not saved by save_pretrained) carry no "architectures"; fall back on model_type.
_ARCH_OF_MODEL_TYPE = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}
_QKV_BIAS_ARCHS = frozenset({"Qwen2ForCausalLM"})


@dataclass(frozen=True, slots=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = (
        None  # canonical: has "rope_type" (never "default"), no "rope_theta"
    )
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    max_position_embeddings: int = 4096
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) is not a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if not self.rope_theta > 0 or not self.rms_norm_eps > 0:
            raise ValueError(
                f"rope_theta and rms_norm_eps must be > 0, got {self.rope_theta}, {self.rms_norm_eps}"
            )
        rope_type_of(self.rope_scaling)
        if not all(isinstance(t, int) and 0 <= t < self.vocab_size for t in self.eos_token_ids):
            raise ValueError(f"eos_token_ids must be token ids below vocab_size, got {self.eos_token_ids}")

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Read a HF config.json (transformers 4.x or 5.x spelling)."""
        architecture = (d.get("architectures") or [None])[0] or _ARCH_OF_MODEL_TYPE.get(
            d.get("model_type", "")
        )
        if architecture is None:
            raise UnsupportedFeatureError("config.json names no architecture and no known model_type")
        if d.get("hidden_act", "silu") != "silu":
            raise UnsupportedFeatureError(f"hidden_act {d['hidden_act']!r} (only silu is supported)")
        if d.get("mlp_bias"):
            raise UnsupportedFeatureError("mlp_bias")
        if d.get("attention_bias") and architecture not in _QKV_BIAS_ARCHS:
            raise UnsupportedFeatureError("attention_bias (an o_proj bias) on a Llama-family model")

        num_heads = d["num_attention_heads"]
        max_position = d.get("max_position_embeddings", 4096)
        rope_theta, rope_scaling = _rope(d, max_position)
        # NOTE: a sliding window at least as long as the context is plain causal attention. We have no
        # sliding-window kernels, so a model with a shorter window (Mistral v0.1) gets its context capped to
        # the window, where its attention is exactly full attention.
        window = d.get("sliding_window")
        if architecture == "Qwen2ForCausalLM" and not (
            d.get("use_sliding_window") or "sliding_attention" in (d.get("layer_types") or ())
        ):
            window = None
        if window:
            max_position = min(max_position, window)

        eos = d.get("eos_token_id")
        return cls(
            architecture=architecture,
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_layers=d["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=d.get("num_key_value_heads") or num_heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // num_heads,
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            qkv_bias=architecture in _QKV_BIAS_ARCHS,
            max_position_embeddings=max_position,
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=() if eos is None else (eos,) if isinstance(eos, int) else tuple(eos),
        )


def _rope(d: dict[str, Any], max_position: int) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, canonical rope_scaling) from transformers 5's `rope_parameters` (theta inside) or 4.x's
    top-level `rope_theta` plus `rope_scaling` (type spelled "type" or "rope_type")."""
    params = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
    if any(isinstance(v, dict) for v in params.values()):
        raise UnsupportedFeatureError("per-layer-type rope parameters")
    theta = params.pop("rope_theta", None) or d.get("rope_theta") or 10000.0
    partial = params.pop("partial_rotary_factor", d.get("partial_rotary_factor")) or 1.0
    if partial != 1.0:
        raise UnsupportedFeatureError(f"partial_rotary_factor {partial}")
    rope_type = params.pop("type", None)
    params.setdefault("rope_type", rope_type or "default")
    if params["rope_type"] == "default":
        return theta, None
    if params["rope_type"] == "llama3":
        params.setdefault("original_max_position_embeddings", max_position)
    return theta, params
