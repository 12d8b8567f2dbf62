"""Pure text-stream helpers for the detokenizer actor: incremental detokenization and stop strings.

No asyncio here: the actor owns one `IncrementalDetokenizer` and one `StopStringMatcher` per request and feeds
them the tokens of each step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# Tokens of the prompt decoded before the first output token, so that the first token decodes in context
# (SentencePiece drops the leading space of a text's first word; vLLM and SGLang use 5 too).
PROMPT_CONTEXT_TOKENS = 5
REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Turns output token ids into text deltas, one push at a time.

    vLLM's prefix_offset / read_offset technique: decode a short window of ids and emit only what it adds to
    the decode of the window's already-emitted part. Both decodes see the same context, so tokenizers whose
    decode of a token depends on its neighbours (SentencePiece's leading space, byte-level BPE's multi-byte
    characters) give the right text; a window that ends in U+FFFD is an incomplete character and is held back.

        0 ........... prefix_offset ............... read_offset ............... len(ids)
        | emitted, done |  emitted, the window's context  |  held back: not emitted yet  |

    Invariant (byte-level BPE, e.g. the default model): the joined deltas plus `flush()` equal
    `tokenizer.decode(output_ids, skip_special_tokens=..., clean_up_tokenization_spaces=False)`. Every decode
    here passes clean_up_tokenization_spaces=False: that clean-up (" ." -> ".") depends on the text after a
    token, so an incremental stream cannot reproduce it.
    """

    def __init__(
        self,
        tokenizer: Any,
        prompt_ids: Sequence[int],
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
    ) -> None:
        self._tokenizer = tokenizer
        self._fast = rust_tokenizer(tokenizer)
        self._skip_special_tokens = skip_special_tokens
        self._spaces_between_special_tokens = spaces_between_special_tokens
        context = list(prompt_ids[-PROMPT_CONTEXT_TOKENS:])
        # A prompt ending inside a character would glue its bytes onto the output's first token; without the
        # context, the output decodes on its own, as the invariant above wants.
        if self._decode(context).endswith(REPLACEMENT_CHAR):
            context = []
        self._ids = context
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._prefix_text = self._decode(context)  # decode(ids[prefix_offset:read_offset]), cached
        self._chunks: list[str] = []
        self._text: str | None = ""

    @property
    def text(self) -> str:
        """All output text emitted so far."""
        if self._text is None:
            self._text = "".join(self._chunks)
            self._chunks = [self._text]
        return self._text

    def push(self, token_ids: Sequence[int]) -> str:
        """Append output tokens; return the text they complete ("" while a character is incomplete)."""
        if not token_ids:
            return ""
        self._ids.extend(token_ids)
        delta = self._advance()
        if delta is None and len(token_ids) > 1:
            # The window ends inside a character; tokens before that may still complete text of their own.
            # Replay them one at a time so that only the incomplete tail waits.
            del self._ids[-len(token_ids) :]
            parts = []
            for token in token_ids:
                self._ids.append(token)
                parts.append(self._advance() or "")
            return self._emit("".join(parts))
        return self._emit(delta or "")

    def push_all(self, token_ids: Sequence[int]) -> str:
        """push(token_ids) + flush() for a stream with nothing pushed yet (a request whose text is not
        streamed), in one decode: push alone would replay the ids one by one when the text ends inside a
        character (random-token benchmarks often do: ~0.5 ms a request of 256 tokens, at the moment a
        thousand requests finish together). The context's text is a whole-character head of the window's
        text, so the rest is the output's."""
        if self._chunks or len(self._ids) != self._read_offset:
            raise RuntimeError("push_all is a stream's only push")
        text = self._decode([*self._ids, *token_ids])
        if not text.startswith(self._prefix_text):  # a tokenizer whose decode is not a concatenation
            return self.push(token_ids) + self.flush()
        self._ids.extend(token_ids)
        delta = text[len(self._prefix_text) :]
        self._prefix_offset = self._read_offset = len(self._ids)
        self._prefix_text = ""
        return self._emit(delta)

    def flush(self) -> str:
        """At the end of the request: whatever is held back (an incomplete character decodes as U+FFFD)."""
        text = self._decode(self._ids[self._prefix_offset :])
        delta = text[len(self._prefix_text) :]
        self._prefix_offset = self._read_offset = len(self._ids)
        self._prefix_text = ""
        return self._emit(delta)

    def _advance(self) -> str | None:
        """The text the ids past read_offset add, moving both offsets; None to hold back."""
        text = self._decode(self._ids[self._prefix_offset :])
        if len(text) <= len(self._prefix_text) or text.endswith(REPLACEMENT_CHAR):
            return None
        delta = text[len(self._prefix_text) :]
        self._prefix_text = self._decode(self._ids[self._read_offset :])
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return delta

    def _emit(self, delta: str) -> str:
        if delta:
            self._chunks.append(delta)
            self._text = None
        return delta

    def _decode(self, ids: Sequence[int]) -> str:
        if not ids:
            return ""
        if self._fast is not None:  # what a fast tokenizer's decode does, minus ~10 us of Python per call
            fast_text: str = self._fast.decode(ids, skip_special_tokens=self._skip_special_tokens)
            return fast_text
        text: str = self._tokenizer.decode(
            ids,
            skip_special_tokens=self._skip_special_tokens,
            spaces_between_special_tokens=self._spaces_between_special_tokens,
            clean_up_tokenization_spaces=False,
        )
        return text


def rust_tokenizer(tokenizer: Any) -> Any:
    """The `tokenizers.Tokenizer` behind a transformers fast tokenizer, or None. Its decode is what the
    wrapper's decode runs (spaces_between_special_tokens only matters to slow tokenizers; every decode here
    turns clean-up off)."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if not getattr(tokenizer, "is_fast", False) or backend is None:
        return None
    try:
        from tokenizers import Tokenizer
    except ImportError:
        return None
    return backend if isinstance(backend, Tokenizer) else None


class StopStringMatcher:
    """Finds stop strings in a stream of text deltas without letting any part of one out.

    `feed` holds back the longest tail that could still grow into a stop string and emits the rest. The first
    stop to *complete* in the stream wins (among stops completing at the same character, the longest, i.e. the
    one starting first), so the result does not depend on how the text was split into deltas.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        assert all(stops), "stop strings must be non-empty"
        self._stops = tuple(dict.fromkeys(stops))
        self._held = ""
        self.matched: str | None = None

    def feed(self, new_text: str) -> tuple[str, str | None]:
        """(text safe to emit now, the stop that matched or None); after a match the caller stops feeding."""
        assert self.matched is None, "fed after a stop string matched"
        if not self._stops:
            return new_text, None
        text = self._held + new_text
        match = self._earliest_match(text)
        if match is not None:
            start, stop = match
            self._held = ""
            self.matched = stop
            return text[:start], stop
        keep = self._partial_tail(text)
        self._held = text[len(text) - keep :]
        return text[: len(text) - keep], None

    def flush(self) -> str:
        """The held-back tail, when the request ends for another reason."""
        held, self._held = self._held, ""
        return held

    def _earliest_match(self, text: str) -> tuple[int, str] | None:
        """(start, stop) of the stop whose end comes first in `text`; ties go to the longest."""
        best: tuple[int, int, str] | None = None  # (end, -len, stop)
        for stop in self._stops:
            start = text.find(stop)
            if start >= 0 and (best is None or (start + len(stop), -len(stop)) < best[:2]):
                best = (start + len(stop), -len(stop), stop)
        return None if best is None else (best[0] + best[1], best[2])

    def _partial_tail(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of some stop."""
        longest = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:n]):
                    longest = n
                    break
        return longest
