"""The tokenizer of a `ModelSource`: always a transformers fast (Rust `tokenizers`) tokenizer.

GGUF files carry their vocabulary, merges and chat template in their metadata; transformers rebuilds a fast
tokenizer from them (about 4 s for SmolLM2's 49k tokens, once at start-up).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from radixserve.errors import UnsupportedFeatureError
from radixserve.models.source import ModelSource

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast


def load_tokenizer(source: ModelSource) -> PreTrainedTokenizerFast:
    """Load the fast tokenizer for `source`; a model with only a slow (Python) tokenizer is refused."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    kwargs: dict[str, Any] = {"gguf_file": source.filename} if source.kind == "gguf" else {}
    tokenizer = AutoTokenizer.from_pretrained(str(source.directory), use_fast=True, **kwargs)
    # NOTE: the detokenizer's incremental decoding and batch encoding rely on the Rust backend.
    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        raise UnsupportedFeatureError(
            f"{source.path} has no fast tokenizer (tokenizer.json); convert it first"
        )
    return tokenizer


def chat_template(tokenizer: PreTrainedTokenizerFast) -> str | None:
    """The model's Jinja chat template, or None when it ships none (chat requests are then refused)."""
    template = tokenizer.chat_template
    if isinstance(template, dict):  # several named templates: the one HF itself uses by default
        template = template.get("default")
    return template or None
