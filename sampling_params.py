"""Sampling parameters of one request: a leaf module (imports nothing of radixserve but errors).

The names follow SGLang's `sampling_params` (which the native `/generate` route takes as is); the OpenAI
routes map their fields onto these. Unknown keys are rejected when decoding from a dict
(`forbid_unknown_fields`).
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import msgspec

from radixserve.errors import InvalidRequestError

MAX_TOP_LOGPROBS = 20


class SamplingParams(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    max_new_tokens: int | None = 128  # None: up to the context length
    min_new_tokens: int = 0
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 (or 0): no top-k
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    seed: int | None = None
    stop: list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    n: int = 1
    # Log-probabilities: None = not returned; k >= 0 = the sampled token's logprob plus the top k
    # alternatives.
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    # Where the prompt's logprobs start (SGLang's logprob_start_len); only with prompt_logprobs.
    logprob_start_len: int = 0
    # Constrained decoding, at most one of: a JSON schema (JSON text; a dict is accepted by from_dict), a
    # regular expression, an EBNF grammar (xgrammar's dialect, rule `root`), or any JSON object.
    json_schema: str | None = None
    regex: str | None = None
    ebnf: str | None = None
    json_object: bool = False

    def validate(self, vocab_size: int | None = None) -> SamplingParams:
        """Raise InvalidRequestError naming the first bad field; return self for chaining."""
        _check(self.max_new_tokens is None or self.max_new_tokens >= 0, "max_new_tokens", "must be >= 0")
        _check(self.min_new_tokens >= 0, "min_new_tokens", "must be >= 0")
        _check(
            self.max_new_tokens is None or self.min_new_tokens <= self.max_new_tokens,
            "min_new_tokens",
            "must not exceed max_new_tokens",
        )
        _check(math.isfinite(self.temperature) and self.temperature >= 0, "temperature", "must be >= 0")
        _check(0.0 < self.top_p <= 1.0, "top_p", "must be in (0, 1]")
        _check(self.top_k == -1 or self.top_k >= 0, "top_k", "must be -1 (disabled) or >= 0")
        _check(0.0 <= self.min_p <= 1.0, "min_p", "must be in [0, 1]")
        _check(-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty", "must be in [-2, 2]")
        _check(-2.0 <= self.presence_penalty <= 2.0, "presence_penalty", "must be in [-2, 2]")
        _check(0.0 < self.repetition_penalty <= 2.0, "repetition_penalty", "must be in (0, 2]")
        _check(self.n >= 1, "n", "must be >= 1")
        for name, k in (("logprobs", self.logprobs), ("prompt_logprobs", self.prompt_logprobs)):
            _check(k is None or 0 <= k <= MAX_TOP_LOGPROBS, name, f"must be in [0, {MAX_TOP_LOGPROBS}]")
        _check(self.logprob_start_len >= 0, "logprob_start_len", "must be >= 0")
        if self.stop is not None:
            _check(all(s for s in self.stop), "stop", "stop strings must be non-empty")
        given = [name for name in CONSTRAINT_FIELDS if getattr(self, name) not in (None, False)]
        _check(len(given) <= 1, given[-1] if given else "", f"give at most one of {', '.join(given)}")
        if given:
            # NOTE: the grammar decides where the output ends; masking EOS until min_new_tokens could leave
            # no token the grammar allows.
            _check(self.min_new_tokens == 0, "min_new_tokens", f"cannot be combined with {given[0]}")
        if vocab_size is not None:
            for token in self.stop_token_ids or ():
                _check(
                    0 <= token < vocab_size, "stop_token_ids", f"token id {token} is outside the vocabulary"
                )
            for token, bias in (self.logit_bias or {}).items():
                _check(0 <= token < vocab_size, "logit_bias", f"token id {token} is outside the vocabulary")
                _check(
                    math.isfinite(bias) or bias == -math.inf, "logit_bias", "biases must be finite or -inf"
                )
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def constraint(self) -> tuple[str, str] | None:
        """(field, spec) of the grammar the output must match, or None; json_object's spec is ""."""
        if self.json_schema is not None:
            return "json_schema", self.json_schema
        if self.regex is not None:
            return "regex", self.regex
        if self.ebnf is not None:
            return "ebnf", self.ebnf
        if self.json_object:
            return "json_object", ""
        return None

    @property
    def needs_penalties(self) -> bool:
        return self.frequency_penalty != 0.0 or self.presence_penalty != 0.0 or self.repetition_penalty != 1.0

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SamplingParams:
        """Decode and type-check a user's dict; unknown keys and wrong types name the field."""
        data = dict(data)
        if isinstance(data.get("stop"), str):
            data["stop"] = [data["stop"]]
        if isinstance(data.get("logit_bias"), dict):
            try:
                data["logit_bias"] = {int(k): v for k, v in data["logit_bias"].items()}
            except ValueError:
                raise InvalidRequestError("logit_bias", "keys must be token ids") from None
        if isinstance(data.get("json_schema"), dict):
            data["json_schema"] = json.dumps(data["json_schema"])  # key order kept: it is generation order
        try:
            return msgspec.convert(data, cls, strict=False)
        except msgspec.ValidationError as e:
            raise InvalidRequestError(_field_of(str(e)), str(e)) from None


CONSTRAINT_FIELDS = ("json_schema", "regex", "ebnf", "json_object")


def _check(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise InvalidRequestError(field, message)


def _field_of(message: str) -> str:
    """msgspec says "... - at `$.top_p`" or "Object contains unknown field `foo`"; pull out the field."""
    if (at := re.search(r"at `\$\.?([^`]*)`", message)) is not None:
        return at.group(1)
    if (unknown := re.search(r"unknown field `([^`]*)`", message)) is not None:
        return unknown.group(1)
    return ""
