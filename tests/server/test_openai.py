"""The OpenAI routes through the official `openai` client, against a real server process."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest

from tests.server.conftest import Server

COUNT = "Count from one to twenty: one, two, three,"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY = {"temperature": 0}


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60) as c:
        yield c


def test_models(client: openai.OpenAI, model: str) -> None:
    assert [m.id for m in client.models.list().data] == [model]
    assert client.models.retrieve(model).id == model
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_completion_length(client: openai.OpenAI, model: str) -> None:
    out = client.completions.create(
        model=model, prompt=COUNT, max_tokens=5, extra_body={"ignore_eos": True}, **GREEDY
    )
    assert out.object == "text_completion" and len(out.choices) == 1
    assert out.choices[0].finish_reason == "length"
    assert out.usage is not None and out.usage.completion_tokens == 5
    assert out.usage.total_tokens == out.usage.prompt_tokens + 5
    assert out.usage.prompt_tokens_details is not None
    assert out.usage.prompt_tokens_details.cached_tokens >= 0


def test_completion_default_max_tokens_is_16(client: openai.OpenAI, model: str) -> None:
    out = client.completions.create(model=model, prompt=COUNT, extra_body={"ignore_eos": True}, **GREEDY)
    assert out.usage is not None and out.usage.completion_tokens == 16


def test_completion_stream_equals_whole(client: openai.OpenAI, model: str) -> None:
    whole = client.completions.create(model=model, prompt=COUNT, max_tokens=12, **GREEDY)
    chunks = list(client.completions.create(model=model, prompt=COUNT, max_tokens=12, stream=True, **GREEDY))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert all(c.usage is None for c in chunks)  # no usage chunk unless asked


def test_chat(client: openai.OpenAI, model: str) -> None:
    out = client.chat.completions.create(model=model, messages=CHAT, max_tokens=24, **GREEDY)
    assert out.object == "chat.completion"
    assert out.choices[0].message.role == "assistant"
    assert "Paris" in (out.choices[0].message.content or "")
    assert out.choices[0].finish_reason in ("stop", "length")
    assert out.usage is not None and out.usage.prompt_tokens > len(CHAT[0]["content"].split())  # the template


def test_chat_stream_equals_whole(client: openai.OpenAI, model: str) -> None:
    whole = client.chat.completions.create(model=model, messages=CHAT, max_tokens=24, **GREEDY)
    chunks = list(
        client.chat.completions.create(
            model=model,
            messages=CHAT,
            max_tokens=24,
            stream=True,
            stream_options={"include_usage": True},
            **GREEDY,
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in chunks[1:] if c.choices)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    # include_usage: every chunk has usage null, and a last chunk with no choices carries it.
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens  # type: ignore[union-attr]
    assert all(c.usage is None for c in chunks[:-1])


def test_n_times_prompts_indexes(client: openai.OpenAI, model: str) -> None:
    prompts = ["The capital of France is", COUNT]
    out = client.completions.create(model=model, prompt=prompts, n=2, max_tokens=6, **GREEDY)
    assert sorted(c.index for c in out.choices) == [0, 1, 2, 3]
    by_index = {c.index: c.text for c in out.choices}
    prompt_tokens = completion_tokens = 0
    for i, prompt in enumerate(prompts):  # index = prompt_i * n + j
        single = client.completions.create(model=model, prompt=prompt, max_tokens=6, **GREEDY)
        assert by_index[2 * i] == by_index[2 * i + 1] == single.choices[0].text
        assert single.usage is not None
        prompt_tokens += single.usage.prompt_tokens
        completion_tokens += 2 * single.usage.completion_tokens
    # Usage: each prompt counts once, each choice's completion once.
    assert out.usage is not None
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (prompt_tokens, completion_tokens)

    chunks = list(
        client.completions.create(model=model, prompt=prompts, n=2, max_tokens=6, stream=True, **GREEDY)
    )
    finished = [c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason]
    assert sorted(finished) == [0, 1, 2, 3]  # one finish_reason per choice
    texts = {
        i: "".join(c.choices[0].text for c in chunks if c.choices and c.choices[0].index == i)
        for i in range(4)
    }
    assert texts == by_index


def test_seeded_samples_reproduce(client: openai.OpenAI, model: str) -> None:
    def sample() -> list[str]:
        out = client.completions.create(
            model=model, prompt="Once upon a time", n=2, max_tokens=8, temperature=1.0, seed=1234
        )
        return [c.text for c in sorted(out.choices, key=lambda c: c.index)]

    assert sample() == sample()


def test_completion_logprobs(client: openai.OpenAI, model: str) -> None:
    out = client.completions.create(model=model, prompt=COUNT, max_tokens=6, logprobs=5, **GREEDY)
    lp = out.choices[0].logprobs
    assert lp is not None and lp.tokens and lp.top_logprobs and lp.token_logprobs and lp.text_offset
    assert len(lp.tokens) == out.usage.completion_tokens  # type: ignore[union-attr]
    assert "".join(lp.tokens) == out.choices[0].text
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert len(top) == 5
        assert top[token] == pytest.approx(logprob) and logprob == pytest.approx(max(top.values()))  # greedy
    assert lp.text_offset[0] == len(COUNT)


def test_chat_logprobs(client: openai.OpenAI, model: str) -> None:
    out = client.chat.completions.create(
        model=model, messages=CHAT, max_tokens=6, logprobs=True, top_logprobs=3, **GREEDY
    )
    content = out.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content and "".join(t.token for t in content) == out.choices[0].message.content
    assert all(
        len(t.top_logprobs) == 3 and t.top_logprobs[0].logprob == pytest.approx(t.logprob) for t in content
    )


def test_stop_string(client: openai.OpenAI, model: str) -> None:
    text = client.completions.create(model=model, prompt=COUNT, max_tokens=16, **GREEDY).choices[0].text
    words = text.split()
    stop = words[len(words) // 2]
    out = client.completions.create(
        model=model, prompt=COUNT, max_tokens=16, stop=[stop, "never-seen"], **GREEDY
    )
    choice = out.choices[0]
    assert choice.finish_reason == "stop"
    assert choice.text == text[: text.index(stop)]
    assert choice.model_extra is not None and choice.model_extra["matched_stop"] == stop


def test_token_id_prompts_and_echo(client: openai.OpenAI, model: str, smollm_tokenizer) -> None:
    ids = smollm_tokenizer.encode(COUNT)
    text = client.completions.create(model=model, prompt=COUNT, max_tokens=6, **GREEDY).choices[0].text
    assert client.completions.create(model=model, prompt=ids, max_tokens=6, **GREEDY).choices[0].text == text
    out = client.completions.create(model=model, prompt=[ids, ids[:3]], max_tokens=6, **GREEDY)
    assert [c.index for c in out.choices] == [0, 1] and out.choices[0].text == text

    echoed = client.completions.create(model=model, prompt=COUNT, max_tokens=6, echo=True, **GREEDY)
    assert echoed.choices[0].text == COUNT + text
    echoed_ids = client.completions.create(
        model=model, prompt=ids, max_tokens=6, echo=True, logprobs=1, **GREEDY
    )
    lp = echoed_ids.choices[0].logprobs
    assert echoed_ids.choices[0].text == COUNT + text
    assert lp is not None and lp.token_logprobs is not None and lp.tokens is not None
    assert lp.token_logprobs[0] is None and len(lp.tokens) == len(ids) + 6
    chunks = list(
        client.completions.create(model=model, prompt=COUNT, max_tokens=6, echo=True, stream=True, **GREEDY)
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == COUNT + text
