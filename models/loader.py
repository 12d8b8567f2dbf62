"""Build a model from a path: resolve the source, read its config, construct on the device, load weights."""

from __future__ import annotations

import torch

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
) -> tuple[torch.nn.Module, ModelConfig]:
    """The model in eval mode on `device`, weights loaded (each rank only its own shard)."""
    source = resolve_model_source(model_path)
    config = ModelConfig.from_hf_dict(load_hf_config_dict(source))
    cls = get_model_class(config.architecture)
    with torch.device(device):
        model = cls(config, tp or TPGroup(), dtype)
    model.load_weights(iterate_weights(source, dtype))
    return model.eval(), config
