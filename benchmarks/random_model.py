"""A model folder with a real architecture and random weights, for speed tests on a machine with no network.

    python -m radixserve.benchmarks.random_model --config llama-3.1-8b --out /tmp/llama-8b
    python -m radixserve.benchmarks.random_model --config tiny --out /tmp/tiny --dtype float32

Writes config.json (the public config of that model, as data below), random weights as sharded safetensors
with their index, and a tokenizer made on the spot (random_tokenizer.py). Weights are generated one shard at a
time, so memory stays near one shard. Matrices are N(0, std^2) with a small std (0.02, the models'
initializer_range) and norms are ones, so activations stay finite through every layer; biases are zero.
Speed does not depend on the values; use `ignore_eos` and fixed output lengths.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from radixserve.benchmarks.random_tokenizer import BOS, EOS, IM_END, save_tokenizer

# The public config.json of each model (meta-llama/Llama-3.1-8B, Qwen/Qwen2-7B-Instruct,
# Qwen/Qwen2-72B-Instruct); bos/eos ids are replaced by those of the generated tokenizer.
CONFIGS: dict[str, dict[str, Any]] = {
    "llama-3.1-8b": {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "hidden_act": "silu",
        "hidden_size": 4096,
        "initializer_range": 0.02,
        "intermediate_size": 14336,
        "max_position_embeddings": 131072,
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": 32,
        "num_hidden_layers": 32,
        "num_key_value_heads": 8,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": 128256,
    },
    "qwen2-7b": {
        "architectures": ["Qwen2ForCausalLM"],
        "attention_dropout": 0.0,
        "hidden_act": "silu",
        "hidden_size": 3584,
        "initializer_range": 0.02,
        "intermediate_size": 18944,
        "max_position_embeddings": 32768,
        "max_window_layers": 28,
        "model_type": "qwen2",
        "num_attention_heads": 28,
        "num_hidden_layers": 28,
        "num_key_value_heads": 4,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 131072,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": 152064,
    },
    "qwen2-72b": {
        "architectures": ["Qwen2ForCausalLM"],
        "attention_dropout": 0.0,
        "hidden_act": "silu",
        "hidden_size": 8192,
        "initializer_range": 0.02,
        "intermediate_size": 29568,
        "max_position_embeddings": 32768,
        "max_window_layers": 80,
        "model_type": "qwen2",
        "num_attention_heads": 64,
        "num_hidden_layers": 80,
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 131072,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": 152064,
    },
    # Llama-shaped and small enough for CPU smoke tests (GQA, untied head).
    "tiny": {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "hidden_act": "silu",
        "hidden_size": 64,
        "initializer_range": 0.02,
        "intermediate_size": 128,
        "max_position_embeddings": 4096,
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-05,
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "use_cache": True,
        "vocab_size": 1024,
    },
}
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
INDEX_FILE = "model.safetensors.index.json"


def tensor_shapes(cfg: dict[str, Any]) -> Iterator[tuple[str, tuple[int, ...]]]:
    """Every weight of the HF checkpoint, in checkpoint order: (name, shape)."""
    h, inter, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = cfg.get("head_dim") or h // heads
    qkv_bias = cfg["architectures"][0] == "Qwen2ForCausalLM" or cfg.get("attention_bias", False)
    yield "model.embed_tokens.weight", (v, h)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", (h,)
        for name, rows in (("q_proj", heads * d), ("k_proj", kv_heads * d), ("v_proj", kv_heads * d)):
            yield p + f"self_attn.{name}.weight", (rows, h)
            if qkv_bias:
                yield p + f"self_attn.{name}.bias", (rows,)
        yield p + "self_attn.o_proj.weight", (h, heads * d)
        yield p + "post_attention_layernorm.weight", (h,)
        yield p + "mlp.gate_proj.weight", (inter, h)
        yield p + "mlp.up_proj.weight", (inter, h)
        yield p + "mlp.down_proj.weight", (h, inter)
    yield "model.norm.weight", (h,)
    if not cfg.get("tie_word_embeddings", False):
        yield "lm_head.weight", (v, h)


def plan_shards(
    shapes: list[tuple[str, tuple[int, ...]]], itemsize: int, shard_bytes: int
) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Group tensors, in order, into shards of at most `shard_bytes` (a bigger tensor gets its own shard)."""
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in shapes:
        nbytes = itemsize * _numel(shape)
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    return shards


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def random_tensor(
    name: str, shape: tuple[int, ...], dtype: torch.dtype, std: float, gen: torch.Generator, device: str
) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=dtype)
    if name.endswith(".bias"):
        return torch.zeros(shape, dtype=dtype)
    t = torch.empty(shape, dtype=dtype, device=device).normal_(0.0, std, generator=gen)
    return t.cpu()


def write_model(
    config_name: str,
    out: Path,
    dtype: str = "bfloat16",
    std: float = 0.02,
    shard_gib: float = 2.0,
    seed: int = 0,
    num_layers: int | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """Write the model folder; return the config.json it wrote."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    cfg = json.loads(json.dumps(CONFIGS[config_name]))  # a deep copy
    cfg["torch_dtype"] = dtype
    if num_layers is not None:
        cfg["num_hidden_layers"] = num_layers
        if "max_window_layers" in cfg:
            cfg["max_window_layers"] = num_layers
    special = save_tokenizer(out, cfg["vocab_size"], min(cfg["max_position_embeddings"], 1 << 20), seed)
    cfg["bos_token_id"] = special[BOS]
    cfg["eos_token_id"] = [special[EOS], special[IM_END]]
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    generation = {"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"]}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")

    torch_dtype = _DTYPES[dtype]
    itemsize = torch.empty((), dtype=torch_dtype).element_size()
    shards = plan_shards(list(tensor_shapes(cfg)), itemsize, int(shard_gib * (1 << 30)))
    gen = torch.Generator(device=device).manual_seed(seed)
    weight_map: dict[str, str] = {}
    total = 0
    for i, shard in enumerate(shards):
        filename = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {name: random_tensor(name, shape, torch_dtype, std, gen, device) for name, shape in shard}
        save_file(tensors, str(out / filename), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update(dict.fromkeys(tensors, filename))
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return cfg


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a random-weight model folder (no download).")
    parser.add_argument("--config", required=True, choices=sorted(CONFIGS))
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(_DTYPES))
    parser.add_argument("--std", type=float, default=0.02, help="std of the random matrices")
    parser.add_argument("--shard-gib", type=float, default=2.0, help="safetensors shard size")
    parser.add_argument("--num-layers", type=int, default=None, help="override num_hidden_layers")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="where to draw the numbers (cuda is much faster)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    cfg = write_model(args.config, args.out, args.dtype, args.std, args.shard_gib, args.seed, args.num_layers,
                      args.device)
    size = sum(f.stat().st_size for f in args.out.glob("*.safetensors"))
    print(f"wrote {args.out}: {cfg['architectures'][0]}, {cfg['num_hidden_layers']} layers, "
          f"{size / 1e9:.2f} GB of {args.dtype} weights in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
