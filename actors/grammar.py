"""Constrained decoding with xgrammar: grammars compiled once per distinct spec, a matcher per request, and
jump-forward.

    ingress     GrammarCache.prepare(params)    compiles in a worker thread (LRU-cached by (field, spec));
                                                a bad spec is InvalidRequestError naming the field
    scheduler   GrammarCache.new_state(params)  a GrammarState (an xgrammar matcher) per request, at submit
                GrammarState.fill_bitmask       the allowed tokens of the request's next sample, for the plan
                GrammarState.accept             each sampled token, as the step result is applied
                GrammarState.jump_forward       the text the grammar forces next, as tokens (see there)
                GrammarState.force              or those tokens one per step (--disable-jump-forward)

The cache is the one object two actors share (ingress fills it from threads, the schedulers read it on the
event loop): it is locked, and holds only immutable compiled grammars. A grammar evicted between ingress and
scheduler is compiled again, on the event loop (counted in `num_late_compiles`).
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections import OrderedDict, deque
from collections.abc import Sequence
from typing import Any, NamedTuple

import anyio
import numpy as np

from radixserve.errors import InvalidRequestError
from radixserve.ops.token_bitmask import bitmask_words
from radixserve.sampling_params import SamplingParams

GrammarKey = tuple[str, str]  # (field, spec): ("json_schema", "{...}"), ("regex", ...), ("json_object", "")

# Free JSON: any object. Compact separators (", " and ": "), no free whitespace: a model cannot pad forever.
JSON_OBJECT_SCHEMA = '{"type": "object"}'
DEFAULT_CAPACITY = 256


class JumpForward(NamedTuple):
    """Keep the first `num_kept` tokens of the tail given to `jump_forward`, then append `tokens`."""

    num_kept: int
    tokens: list[int]


class GrammarCache:
    """Compiled grammars by (field, spec), least recently used evicted past `capacity`; tokenizer helpers.

    Thread-safe. Mutates: its LRU (compile, new_state), and builds the xgrammar compiler on first use (the
    tokenizer info reads the whole vocabulary: ~0.2 s for 49k tokens).
    """

    def __init__(
        self,
        tokenizer: Any,
        vocab_size: int,
        stop_token_ids: Sequence[int],
        capacity: int = DEFAULT_CAPACITY,
        tokenizer_info: Any = None,  # an xgrammar TokenizerInfo (tests); default: from the HF tokenizer
    ) -> None:
        self.tokenizer = tokenizer
        self._tokenizer_info = tokenizer_info
        self.vocab_size = vocab_size  # the model's (bitmasks cover it; ids past the tokenizer's are masked)
        self.stop_token_ids = list(stop_token_ids)
        self.capacity = capacity
        self._lock = threading.Lock()
        self._key_locks: dict[GrammarKey, threading.Lock] = {}
        self._compiled: OrderedDict[GrammarKey, Any] = OrderedDict()
        self._compiler: Any = None
        self.prefix_space = False  # a SentencePiece-style tokenizer: jump-forward is off (see jump_forward)
        self.num_compiles = 0
        self.num_late_compiles = 0

    @property
    def bitmask_words(self) -> int:
        return bitmask_words(self.vocab_size)

    async def prepare(self, params: SamplingParams) -> None:
        """Compile `params`' grammar off the event loop unless it is cached; raises InvalidRequestError."""
        key = params.constraint
        if key is not None and self._lookup(key) is None:
            await anyio.to_thread.run_sync(self.compile, key)

    def new_state(self, params: SamplingParams) -> GrammarState:
        key = params.constraint
        assert key is not None, "new_state of an unconstrained request"
        compiled = self._lookup(key)
        if compiled is None:  # evicted since ingress compiled it: rare, and cheap next to a failed request
            self.num_late_compiles += 1
            compiled = self.compile(key)
        return GrammarState(compiled, self)

    def compile(self, key: GrammarKey) -> Any:
        """The compiled grammar of `key` (blocking). Concurrent calls for one key compile it once."""
        with self._lock:
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:
            if (hit := self._lookup(key)) is not None:
                return hit
            try:
                compiled = _compile(self._get_compiler(), key)
            except InvalidRequestError:
                with self._lock:
                    self._key_locks.pop(key, None)  # bad specs leave nothing behind
                raise
            with self._lock:
                self.num_compiles += 1
                self._compiled[key] = compiled
                while len(self._compiled) > self.capacity:
                    evicted, _ = self._compiled.popitem(last=False)
                    self._key_locks.pop(evicted, None)
            return compiled

    def _lookup(self, key: GrammarKey) -> Any:
        with self._lock:
            compiled = self._compiled.get(key)
            if compiled is not None:
                self._compiled.move_to_end(key)
            return compiled

    def _get_compiler(self) -> Any:
        import xgrammar as xgr

        with self._lock:
            if self._compiler is None:
                info = self._tokenizer_info or xgr.TokenizerInfo.from_huggingface(
                    self.tokenizer, vocab_size=self.vocab_size, stop_token_ids=self.stop_token_ids
                )
                self.prefix_space = bool(info.add_prefix_space)
                # Our LRU is the cache: xgrammar's own would grow without bound.
                self._compiler = xgr.GrammarCompiler(
                    info, max_threads=min(8, os.cpu_count() or 1), cache_enabled=False
                )
            return self._compiler

    # -- tokenizer helpers (jump-forward re-tokenization) ----------------------------------------------------

    def decode(self, ids: Sequence[int]) -> str:
        text = self.tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)
        return str(text)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))


def _compile(compiler: Any, key: GrammarKey) -> Any:
    field, spec = key
    try:
        match field:
            case "json_schema":
                json.loads(spec)  # a clearer message than xgrammar's for text that is not JSON
                return compiler.compile_json_schema(spec, any_whitespace=False)
            case "json_object":
                return compiler.compile_json_schema(JSON_OBJECT_SCHEMA, any_whitespace=False)
            case "regex":
                return compiler.compile_regex(spec)
            case "ebnf":
                return compiler.compile_grammar(spec)
    except json.JSONDecodeError as e:
        raise InvalidRequestError(field, f"not valid JSON: {e}") from None
    except Exception as e:  # xgrammar raises RuntimeError (and others) for specs it cannot parse or support
        raise InvalidRequestError(field, f"cannot be compiled: {_xgrammar_message(e)}") from None
    raise AssertionError(f"unknown constraint field {field!r}")


def _xgrammar_message(e: Exception) -> str:
    """xgrammar's messages start with "[time] /path/file.cc:line: "; keep what follows."""
    text = str(e).strip()
    return re.sub(r"^\[[^\]]*\]\s+\S+:\d+:\s*", "", text) or type(e).__name__


class GrammarState:
    """One request's xgrammar matcher. Invariant: it has accepted exactly the request's applied output
    tokens; the scheduler asks for a mask only once every earlier sample of the request is applied.

    `forced`: tokens of forced text still to be decoded one per step (--disable-jump-forward): each step's
    mask allows only the next of them, so the output is token for token what jump-forward gives, only slower.

    Mutates: the matcher and `forced` (accept, jump_forward, force).
    """

    __slots__ = ("matcher", "cache", "forced", "last_was_forced")

    def __init__(self, compiled: Any, cache: GrammarCache) -> None:
        import xgrammar as xgr

        self.matcher = xgr.GrammarMatcher(compiled)
        self.cache = cache
        self.forced: deque[int] = deque()
        self.last_was_forced = False  # the last accepted token came from `forced`, not the model's choice

    def fill_bitmask(self, bitmask: np.ndarray, row: int) -> None:
        """Write the allowed next tokens into bitmask[row] (int32 words)."""
        if self.forced:
            token = self.forced[0]
            bitmask[row] = 0
            bitmask[row, token // 32] = ((1 << (token % 32)) ^ 0x80000000) - 0x80000000  # as an int32
        else:
            self.matcher.fill_next_token_bitmask(bitmask, row)

    def accept(self, token: int) -> bool:
        """Advance by a sampled token; False when the grammar rejects it (only possible when a -inf
        logit_bias masked every token the grammar allows)."""
        self.last_was_forced = bool(self.forced)
        if self.forced and self.forced.popleft() != token:
            self.forced.clear()
        return bool(self.matcher.accept_token(token))

    def force(self, tokens: list[int]) -> None:
        """Decode `tokens`, the last ones `jump_forward` accepted, one per step instead of appending them."""
        assert not self.forced
        if tokens:
            self.matcher.rollback(len(tokens))
            self.forced.extend(tokens)

    @property
    def terminated(self) -> bool:
        """The grammar is complete and a stop token (the model's EOS) was accepted."""
        return bool(self.matcher.is_terminated())

    def forces_text(self) -> bool:
        """Whether `jump_forward` may find text to append now (it can still decline: see there)."""
        return bool(self._forced_text())

    def _forced_text(self) -> str:
        """The text the grammar forces next; "" when none, or when jump-forward is off for this tokenizer."""
        return "" if self.cache.prefix_space else str(self.matcher.find_jump_forward_string())

    def jump_forward(self, tail: list[int], budget: int) -> JumpForward | None:
        """Tokens for the text the grammar forces next, or None when it forces nothing (or it cannot be
        tokenized cleanly). On success the matcher has accepted the new output.

        `tail`: the last output tokens, which may be re-tokenized together with the forced text so that the
        tokens are those the tokenizer gives for the text (a sampled `"` followed by forced `, "age": `
        becomes `",` ` "` `age` `":` ...). `budget`: how many tokens the tail may grow to (max_new_tokens).

        NOTE: the last token of the forced text is left for the model to sample (under the mask) unless the
        grammar can end after it: it may merge with what the model writes next (`: ` + `12` is ` 1` `2`, not
        ` ` `1` `2`), and a token boundary the tokenizer would never produce derails a model.
        """
        forced = self._forced_text()
        if not forced:
            return None
        old_text = self.cache.decode(tail)
        if "\ufffd" in old_text:  # the tail splits a character: re-tokenize the forced text alone
            head, tail, old_text = len(tail), [], ""
        else:
            head = 0
        text = old_text + forced
        new = self.cache.encode(text)
        if self.cache.decode(new) != text:
            return None  # the tokenizer does not round-trip this text (normalization, special tokens)
        kept = _common_prefix(tail, new)
        replaced, added = tail[kept:], new[kept:]
        cut = len(added) > budget - head - kept
        added = added[: max(0, budget - head - kept)]
        # Re-tokenization must not lose text: the kept tokens plus the new ones cover the old tail.
        if not self.cache.decode(new[: kept + len(added)]).startswith(old_text):
            return None
        accepted = self._replace(replaced, added)
        if accepted < len(added):
            self._restore(replaced, accepted)
            return None
        if (
            not cut
            and added
            and not self.matcher.is_completed()
            and self.cache.decode(new[: kept + len(added) - 1]).startswith(old_text)
        ):
            self.matcher.rollback(1)
            added = added[:-1]
        if not added and not replaced:
            return None
        return JumpForward(head + kept, added)

    def _replace(self, replaced: list[int], added: list[int]) -> int:
        """Roll `replaced` back and accept `added`; how many of `added` the grammar accepted."""
        if replaced:
            self.matcher.rollback(len(replaced))
        for i, token in enumerate(added):
            if not self.matcher.accept_token(token):
                return i
        return len(added)

    def _restore(self, replaced: list[int], num_accepted: int) -> None:
        if num_accepted:
            self.matcher.rollback(num_accepted)
        for token in replaced:
            ok = self.matcher.accept_token(token)
            assert ok, "a token the matcher accepted before was rejected on replay"


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
