"""The engine's TokenLogprobs in the three shapes clients expect: OpenAI completions, OpenAI chat, SGLang.

A prompt's logprobs start with None (its first token has no predecessor); the token id of that entry comes
from the prompt itself.
"""

from __future__ import annotations

from collections.abc import Sequence

from radixserve.outputs import TokenLogprob
from radixserve.server.protocol import ChatLogprobs, ChatTokenLogprob, CompletionLogprobs, TopLogprob
from radixserve.server.state import TokenTexts

# SGLang's (logprob, token id, text or None).
NativeLogprob = tuple[float | None, int, str | None]


def completion_logprobs(
    tokens: TokenTexts,
    entries: Sequence[TokenLogprob | None],
    token_ids: Sequence[int],
    offset: int,
) -> CompletionLogprobs:
    """OpenAI's legacy shape. `token_ids[i]` is the token of `entries[i]` (needed where the entry is None);
    `offset` is where the first token starts in the choice's text. The sampled token is always in its
    `top_logprobs`, so a dict has up to logprobs + 1 entries, as OpenAI documents."""
    out = CompletionLogprobs([], [], [], [])
    for entry, token_id in zip(entries, token_ids, strict=True):
        text = tokens[token_id]
        out.tokens.append(text)
        out.text_offset.append(offset)
        offset += len(text)
        if entry is None:
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
            continue
        out.token_logprobs.append(entry.logprob)
        top = {tokens[t]: lp for t, lp in entry.top or ()}
        top.setdefault(text, entry.logprob)
        out.top_logprobs.append(top)
    return out


def chat_logprobs(tokens: TokenTexts, entries: Sequence[TokenLogprob]) -> ChatLogprobs:
    content = []
    for entry in entries:
        text = tokens[entry.token_id]
        top = [TopLogprob(tokens[t], lp, list(tokens[t].encode())) for t, lp in entry.top or ()]
        content.append(ChatTokenLogprob(text, entry.logprob, list(text.encode()), top))
    return ChatLogprobs(content)


def native_logprobs(
    tokens: TokenTexts,
    entries: Sequence[TokenLogprob | None],
    token_ids: Sequence[int],
    with_text: bool,
) -> tuple[list[NativeLogprob], list[list[NativeLogprob] | None]]:
    """SGLang's `*_token_logprobs` and `*_top_logprobs` lists."""
    values: list[NativeLogprob] = []
    tops: list[list[NativeLogprob] | None] = []
    for entry, token_id in zip(entries, token_ids, strict=True):
        if entry is None:
            values.append((None, token_id, tokens[token_id] if with_text else None))
            tops.append(None)
            continue
        values.append((entry.logprob, token_id, tokens[token_id] if with_text else None))
        tops.append([(lp, t, tokens[t] if with_text else None) for t, lp in entry.top or ()])
    return values, tops
