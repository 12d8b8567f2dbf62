"""Build a model from a path: resolve the source, read its config, construct on the device, load weights."""

from __future__ import annotations

import torch

from radixserve.errors import UnsupportedFeatureError
from radixserve.models.config import ModelConfig
from radixserve.models.registry import get_model_class
from radixserve.models.source import load_hf_config_dict, resolve_model_source
from radixserve.models.weights import iterate_weights
from radixserve.ops.parallel import TPGroup


def load_model_config(model_path: str | None) -> ModelConfig:
    return ModelConfig.from_hf_dict(load_hf_config_dict(resolve_model_source(model_path)))


def load_model(
    model_path: str | None,
    dtype: torch.dtype,
    device: torch.device,
    tp: TPGroup | None = None,
    load_format: str = "auto",
) -> tuple[torch.nn.Module, ModelConfig]:
    """The model in eval mode on `device`, weights loaded (each rank only its own shard).

    load_format "dummy" (as in SGLang) skips the checkpoint and fills the weights with small random values:
    a model folder then needs only config.json and a tokenizer. For benchmarks.
    """
    if load_format not in ("auto", "dummy"):
        raise UnsupportedFeatureError(f"load format {load_format!r} (available: auto, dummy)")
    source = resolve_model_source(model_path, need_weights=load_format != "dummy")
    config = ModelConfig.from_hf_dict(load_hf_config_dict(source))
    cls = get_model_class(config.architecture)
    with torch.device(device):
        model = cls(config, tp or TPGroup(), dtype)
    if load_format == "dummy":
        init_dummy_weights(model)
    else:
        model.load_weights(iterate_weights(source, dtype))
    return model.eval(), config


@torch.no_grad()
def init_dummy_weights(model: torch.nn.Module, std: float = 0.02) -> None:
    """Random weights with the scale of a trained model: norms 1, everything else N(0, std)."""
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(0)
    for name, param in model.named_parameters():
        if "norm" in name:
            param.fill_(1.0)
        else:
            param.normal_(0.0, std, generator=generator)
