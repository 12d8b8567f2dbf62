"""Weights of a `ModelSource` as (HF checkpoint name, tensor) pairs, one tensor in memory at a time.

Safetensors files are read lazily with `safe_open`; GGUF files are memory-mapped by `GGUFReader` and each
tensor is dequantized to float32 on its own, then cast. GGUF names are renamed to HF's (tables below) and the
llama q/k rows are put back in HF's order, so models only ever see HF checkpoints.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from radixserve.errors import ModelNotFoundError, UnsupportedFeatureError
from radixserve.models.source import SAFETENSORS_INDEX, ModelSource, gguf_architecture

# GGUF tensor names outside the blocks -> HF names.
GGUF_GLOBAL_RENAMES: dict[str, str] = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}

# GGUF names inside block N ("blk.N.<part>.<weight|bias>") -> HF names under "model.layers.N.".
GGUF_BLOCK_RENAMES: dict[str, str] = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}

# Architectures whose q/k rows llama.cpp's converter permuted (LlamaModel.modify_tensors). Qwen2 is not
# permuted: llama.cpp runs it with NEOX-style rope, which is HF's rotate_half layout already.
GGUF_PERMUTED_QK = frozenset({"llama"})


def iterate_weights(source: ModelSource, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, CPU tensor) for every weight; floating tensors are cast to `dtype`, others kept."""
    if source.kind == "hf":
        yield from _iterate_safetensors(source.path, dtype)
    else:
        yield from _iterate_gguf(source.path, dtype)


def safetensors_files(folder: Path) -> list[Path]:
    """The checkpoint's files: those the shard index names, else every *.safetensors in the folder."""
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        with open(index, encoding="utf-8") as f:
            weight_map: dict[str, str] = json.load(f)["weight_map"]
        files = [folder / name for name in sorted(set(weight_map.values()))]
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelNotFoundError(f"folder {str(folder)!r} has no *.safetensors files")
    if missing := [f.name for f in files if not f.is_file()]:
        names = ", ".join(missing)
        raise ModelNotFoundError(f"folder {str(folder)!r} lacks the shards its index names: {names}")
    return files


def _iterate_safetensors(folder: Path, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    for file in safetensors_files(folder):
        with safe_open(file, framework="pt", device="cpu") as f:
            for name in f.keys():
                tensor = f.get_tensor(name)
                yield name, tensor.to(dtype) if tensor.is_floating_point() else tensor


def gguf_to_hf_name(name: str) -> str:
    """"blk.3.attn_q.weight" -> "model.layers.3.self_attn.q_proj.weight"; unknown names raise."""
    stem, _, suffix = name.rpartition(".")
    if stem in GGUF_GLOBAL_RENAMES:
        return f"{GGUF_GLOBAL_RENAMES[stem]}.{suffix}"
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in GGUF_BLOCK_RENAMES:
        return f"model.layers.{parts[1]}.{GGUF_BLOCK_RENAMES[parts[2]]}.{suffix}"
    # e.g. llama 3's rope_freqs: dropping it silently would change the model's outputs.
    raise UnsupportedFeatureError(f"GGUF tensor {name!r} has no HF counterpart radixserve knows")


def unpermute_qk(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation, for a weight [heads*head_dim, in] or a bias [heads*head_dim].

    llama.cpp rotates interleaved pairs (x0, x1), (x2, x3), ... of each head; HF rotates halves
    (x0, x_{d/2}), ... . Its converter therefore reorders each head's rows from [2, d/2] to [d/2, 2]; we
    reorder them back.
    """
    head_dim = weight.shape[0] // num_heads
    # [heads, head_dim/2, 2, *rest] -> [heads, 2, head_dim/2, *rest]
    grouped = weight.reshape(num_heads, head_dim // 2, 2, *weight.shape[1:])
    return grouped.transpose(1, 2).reshape(weight.shape)


def _iterate_gguf(path: Path, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(path)
    arch = gguf_architecture(reader)
    num_heads = int(reader.fields[f"{arch}.attention.head_count"].contents())
    kv_field = reader.fields.get(f"{arch}.attention.head_count_kv")
    num_kv_heads = int(kv_field.contents()) if kv_field is not None else num_heads
    qk_heads = {"attn_q": num_heads, "attn_k": num_kv_heads} if arch in GGUF_PERMUTED_QK else {}

    for t in reader.tensors:
        hf_name = gguf_to_hf_name(t.name)
        array = dequantize(t.data, t.tensor_type)
        # GGUF lists dims innermost first (ne[0] = columns); the arrays are already row-major [out, in].
        expected = tuple(int(n) for n in reversed(t.shape.tolist()))
        assert array.shape == expected, (t.name, array.shape, expected)
        if not array.flags.writeable:  # F32 tensors are views of the read-only memory map
            array = np.array(array)
        tensor = torch.from_numpy(array)
        part = t.name.split(".")[2] if t.name.startswith("blk.") else ""
        if part in qk_heads:
            tensor = unpermute_qk(tensor, qk_heads[part])
        yield hf_name, tensor.to(dtype)
