"""Llama (2, 3, 3.1), Mistral and SmolLM2: pre-norm decoder, GQA attention with rotary embeddings, SwiGLU MLP.

Qwen2 is the same network with a bias on q/k/v (a config flag), so models/qwen2.py only renames this class.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from radixserve.models.config import ModelConfig
from radixserve.ops.activation import silu_and_mul
from radixserve.ops.embedding import ParallelLMHead, VocabParallelEmbedding
from radixserve.ops.forward_batch import ForwardBatch
from radixserve.ops.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from radixserve.ops.norm import RMSNorm
from radixserve.ops.parallel import TPGroup
from radixserve.ops.rotary import RotaryEmbedding


class LlamaAttention(nn.Module):
    def __init__(
        self, config: ModelConfig, layer_id: int, rotary: RotaryEmbedding, tp: TPGroup, dtype: torch.dtype
    ) -> None:
        super().__init__()
        d = config.head_dim
        self.layer_id = layer_id
        self.head_dim = d
        self.scale = d**-0.5
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size, d, config.num_heads, config.num_kv_heads, config.qkv_bias, tp, dtype
        )
        # unsummed: the next norm completes it (RMSNorm reduce_tp)
        self.o_proj = RowParallelLinear(config.num_heads * d, config.hidden_size, False, tp, dtype,
                                        reduce_results=False)
        self.rotary_emb = rotary  # one instance shared by every layer

    def forward(self, positions: torch.Tensor, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        T, d = x.shape[0], self.head_dim
        q, k, v = self.qkv_proj.split(self.qkv_proj(x))
        q, k, v = (
            q.view(T, -1, d),
            k.view(T, -1, d),
            v.view(T, -1, d),
        )  # [T, heads_local, d], [T, kv_local, d]
        kv_store = batch.backend.kv_store(self.layer_id, batch.attn)  # the rotary kernel stores K/V if it may
        q, k = self.rotary_emb(positions, q, k, v, kv_store)
        stored = kv_store is not None
        o = batch.backend.forward(q, k, v, self.layer_id, self.scale, batch.attn, kv_stored=stored)
        return self.o_proj(o.reshape(T, -1))  # [T, hidden], this rank's partial sum


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig, tp: TPGroup, dtype: torch.dtype) -> None:
        super().__init__()
        inter = config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [inter, inter], False, tp, dtype)
        self.down_proj = RowParallelLinear(inter, config.hidden_size, False, tp, dtype, reduce_results=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, hidden] -> [T, hidden], a partial sum
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))  # via [T, 2 * inter / tp], [T, inter / tp]


class LlamaDecoderLayer(nn.Module):
    def __init__(
        self, config: ModelConfig, layer_id: int, rotary: RotaryEmbedding, tp: TPGroup, dtype: torch.dtype
    ) -> None:
        super().__init__()
        # Each norm sums the row-parallel output before it over the TP ranks (with the add and the norm, in
        # one kernel where the group can), except layer 0's input norm, which gets the whole embedding.
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, reduce_tp=tp)
        self.self_attn = LlamaAttention(config, layer_id, rotary, tp, dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, reduce_tp=tp)
        self.mlp = LlamaMLP(config, tp, dtype)

    def forward(
        self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None, batch: ForwardBatch
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # The residual stream is carried separately so that each norm can fuse in the previous block's add
        # (and its all-reduce: x is a partial sum under TP).
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(positions, x, batch)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, tp: TPGroup, dtype: torch.dtype) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp, dtype)
        rotary = RotaryEmbedding(
            config.head_dim, config.max_position_embeddings, config.rope_theta, config.rope_scaling, dtype
        )
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, i, rotary, tp, dtype) for i in range(config.num_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, reduce_tp=tp)

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        x, residual = self.embed_tokens(batch.input_ids), None  # [T, hidden]
        for layer in self.layers:
            x, residual = layer(batch.positions, x, residual, batch)
        x, _ = self.norm(x, residual)
        return x  # [T, hidden]


class LlamaForCausalLM(nn.Module):
    # HF checkpoint name fragment -> (our fused parameter's fragment, shard id for its weight_loader)
    STACKED_PARAMS: tuple[tuple[str, str, str | int], ...] = (
        (".q_proj.", ".qkv_proj.", "q"),
        (".k_proj.", ".qkv_proj.", "k"),
        (".v_proj.", ".qkv_proj.", "v"),
        (".gate_proj.", ".gate_up_proj.", 0),
        (".up_proj.", ".gate_up_proj.", 1),
    )
    # Checkpoint tensors we recompute instead of loading.
    SKIPPED_WEIGHTS: tuple[str, ...] = ("rotary_emb.inv_freq",)

    def __init__(self, config: ModelConfig, tp: TPGroup, dtype: torch.dtype) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, tp, dtype)
        tied = self.model.embed_tokens.weight if config.tie_word_embeddings else None
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, tp, dtype, shared_weight=tied)

    def forward(self, batch: ForwardBatch) -> torch.Tensor:  # -> [T, hidden]
        return self.model(batch)

    def compute_logits(self, hidden: torch.Tensor, upcast: bool = True) -> torch.Tensor:  # [N, vocab]
        """float32 logits; upcast=False: in the model's dtype, for a sampler that widens them only where it
        must (greedy argmax is the same on the 16-bit values; the float32 copy of 1,000 rows' logits cost
        ~0.35 ms a decode step on an H100)."""
        logits = self.lm_head(hidden)
        return logits.float() if upcast else logits

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load a whole HF checkpoint (every tensor, in one call), each rank keeping its shard.

        Raises ValueError on a tensor we do not know, and on any parameter (or shard of one) left unloaded.
        """
        params = dict(self.named_parameters())  # a tied lm_head appears only as model.embed_tokens.weight
        loaded: set[tuple[str, str | int | None]] = set()
        for ckpt_name, tensor in weights:
            if any(skip in ckpt_name for skip in self.SKIPPED_WEIGHTS):
                continue
            if ckpt_name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue  # some tied checkpoints store a copy of the embedding
            name, shard_id = self._param_name(ckpt_name)
            if name not in params:
                raise ValueError(f"unexpected checkpoint weight {ckpt_name!r}")
            module = self.get_submodule(name.rpartition(".")[0])
            loader = getattr(module, "weight_loader", None)
            if loader is not None:
                loader(params[name], tensor, shard_id)
            else:
                _load_replicated(params[name], tensor, name)
            loaded.add((name, shard_id))

        expected: set[tuple[str, str | int | None]] = set()
        for name in params:
            shard_ids = [sid for _, ours, sid in self.STACKED_PARAMS if ours in name]
            expected |= {(name, sid) for sid in shard_ids} if shard_ids else {(name, None)}
        if missing := expected - loaded:
            raise ValueError(f"checkpoint lacks {len(missing)} weights, e.g. {sorted(map(str, missing))[:4]}")

    def _param_name(self, ckpt_name: str) -> tuple[str, str | int | None]:
        for theirs, ours, shard_id in self.STACKED_PARAMS:
            if theirs in ckpt_name:
                return ckpt_name.replace(theirs, ours), shard_id
        return ckpt_name, None


def _load_replicated(param: nn.Parameter, tensor: torch.Tensor, name: str) -> None:
    if param.shape != tensor.shape:
        raise ValueError(
            f"{name}: checkpoint shape {tuple(tensor.shape)} != parameter shape {tuple(param.shape)}"
        )
    with torch.no_grad():
        param.data.copy_(tensor)
