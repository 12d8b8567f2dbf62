"""Constrained decoding end to end on the CPU (default model): JSON schemas, regexes, an EBNF grammar, free
JSON, bad specs (engine and HTTP), and jump-forward: the same texts at temperature 0, fewer forward passes."""

from __future__ import annotations

import ast
import dataclasses
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import jsonschema
import pytest
import pytest_asyncio

from radixserve import InvalidRequestError
from radixserve.engine import Engine
from radixserve.outputs import GenerateOutput
from radixserve.server.app import build_app

pytestmark = pytest.mark.asyncio(loop_scope="module")

MAX_NEW = 96


def _obj(required: list[str] | None = None, **props: Any) -> dict[str, Any]:
    return {"type": "object", "properties": props, "required": list(props) if required is None else required}


def _int(lo: int, hi: int) -> dict[str, Any]:
    return {"type": "integer", "minimum": lo, "maximum": hi}


NAME = {"type": "string", "minLength": 1, "maxLength": 16}
SHORT = {"type": "string", "maxLength": 12}
# (what to ask for, schema): small enough that generation ends well within MAX_NEW tokens.
SCHEMAS: list[tuple[str, dict[str, Any]]] = [
    ("a person", _obj(name=NAME, age=_int(0, 120))),
    ("a city", _obj(city=NAME, country=NAME, population_millions=_int(0, 50))),
    ("a book", _obj(title=NAME, author=NAME, year=_int(1000, 2100))),
    ("a traffic light", _obj(color={"enum": ["red", "yellow", "green"]})),
    ("a planet", _obj(name=NAME, has_rings={"type": "boolean"}, moons=_int(0, 99))),
    ("a product", _obj(name=NAME, price={"type": "number", "minimum": 0, "maximum": 1000})),
    ("a shopping list", _obj(items={"type": "array", "items": SHORT, "minItems": 1, "maxItems": 3})),
    ("three lucky numbers",
     _obj(numbers={"type": "array", "items": _int(0, 99), "minItems": 3, "maxItems": 3})),
    ("a user with an address",
     _obj(user=NAME, address=_obj(street=SHORT, zip={"type": "string", "pattern": "^[0-9]{5}$"}))),
    ("a weather report", _obj(city=NAME, condition={"enum": ["sunny", "cloudy", "rainy", "snowy"]},
                              temperature_celsius=_int(-50, 50))),
    ("a task", _obj(required=["title", "done"], title=NAME, done={"type": "boolean"}, notes=SHORT)),
    ("a color in RGB", _obj(red=_int(0, 255), green=_int(0, 255), blue=_int(0, 255))),
    ("an animal", _obj(species=NAME, legs={"enum": [0, 2, 4, 6, 8]}, wild={"type": "boolean"})),
    ("a movie rating", _obj(movie=NAME, stars=_int(1, 5))),
    ("a team", _obj(team=NAME, members={"type": "array", "minItems": 1, "maxItems": 2,
                                        "items": _obj(name=NAME, role={"enum": ["lead", "dev"]})})),
    ("a date", _obj(year=_int(1900, 2100), month=_int(1, 12), day=_int(1, 31))),
    ("a server status", _obj(hostname=NAME, status={"enum": ["up", "down"]}, uptime_hours=_int(0, 999))),
    ("a greeting", _obj(language={"enum": ["English", "French", "Spanish"]}, text=SHORT)),
    ("a labelled point", _obj(point=_obj(x=_int(-9, 9), y=_int(-9, 9)), label=SHORT)),
    ("a recipe", _obj(dish=NAME, minutes=_int(1, 600), vegetarian={"type": "boolean"},
                      tags={"type": "array", "items": {"enum": ["quick", "easy", "spicy"]}, "maxItems": 2})),
]
REGEXES = [
    ("The phone number is ", r"\(\d{3}\) \d{3}-\d{4}"),
    ("Today's date in ISO format: ", r"20\d{2}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])"),
    ("An email address: ", r"[a-z]{2,8}@[a-z]{2,8}\.(com|org|net)"),
    ("Is the sky blue? Answer: ", r"(yes|no)"),
    ("A hex color: ", r"#[0-9a-f]{6}"),
]
ARITHMETIC = r"""
root ::= expr
expr ::= term (("+" | "-") term)*
term ::= factor (("*" | "/") factor)*
factor ::= number | "(" expr ")"
number ::= [1-9] [0-9]?
"""


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def engine() -> AsyncIterator[Engine]:
    async with Engine(None, max_total_tokens=16384) as eng:
        yield eng


def set_jump_forward(engine: Engine, on: bool) -> None:
    """Tests only: flip jump-forward on a running engine (one engine per module keeps CI fast)."""
    for scheduler in engine.schedulers:
        scheduler.core.cfg = dataclasses.replace(scheduler.core.cfg, disable_jump_forward=not on)


async def generate_all(engine: Engine, requests: list[dict[str, Any]]) -> list[GenerateOutput]:
    """All requests at once (they batch), outputs in order."""
    outs: list[Any] = [None] * len(requests)

    async def one(i: int) -> None:
        outs[i] = await engine.generate(**requests[i])

    async with anyio.create_task_group() as tg:
        for i in range(len(requests)):
            tg.start_soon(one, i)
    return outs


def schema_requests() -> list[dict[str, Any]]:
    return [
        {
            "messages": [{"role": "user", "content": f"Give me {what} as a JSON object."}],
            "sampling_params": {"temperature": 0, "max_new_tokens": MAX_NEW,
                                "json_schema": json.dumps(schema)},
        }
        for what, schema in SCHEMAS
    ]


async def test_json_schemas_validate_and_jump_forward_keeps_texts(engine: Engine) -> None:
    core = engine.scheduler.core
    texts = {}
    for jump_forward in (False, True):
        set_jump_forward(engine, jump_forward)
        jumped = core.num_jump_forward_tokens
        outs = await generate_all(engine, schema_requests())
        for (what, schema), out in zip(SCHEMAS, outs, strict=True):
            assert out.finish_reason == "stop", (what, out.text)
            jsonschema.validate(json.loads(out.text), schema)
        assert (core.num_jump_forward_tokens > jumped) == jump_forward
        texts[jump_forward] = [out.text for out in outs]
        await engine.check_integrity()
    set_jump_forward(engine, True)
    assert texts[True] == texts[False]
    assert core.num_grammar_rejections == 0
    assert core.num_masks_after_plan > 0, "constrained rows never rode an overlapped step"
    ring = core.constrained._ring
    assert ring is not None and Path(ring.path).exists(), (  # noqa: ASYNC240 (one stat() in a test check)
        "StepMasks went through the socket, not the ring"
    )


async def test_jump_forward_saves_forward_passes(engine: Engine) -> None:
    """One request at a time: a batch's step count would depend on when its requests arrive."""
    core = engine.scheduler.core
    steps = {}
    for jump_forward in (False, True):
        set_jump_forward(engine, jump_forward)
        before = core.num_forward_steps
        for request in schema_requests()[:4]:
            await engine.generate(**request)
        steps[jump_forward] = core.num_forward_steps - before
    set_jump_forward(engine, True)
    assert steps[True] < 0.75 * steps[False], steps


async def test_regex_outputs_fullmatch(engine: Engine) -> None:
    outs = await generate_all(engine, [
        {"prompt": prompt, "sampling_params": {"temperature": 0, "max_new_tokens": 40, "regex": pattern}}
        for prompt, pattern in REGEXES
    ])
    for (_, pattern), out in zip(REGEXES, outs, strict=True):
        assert re.fullmatch(pattern, out.text), (pattern, out.text)
        assert out.finish_reason == "stop"


async def test_more_constrained_rows_than_the_mask_ring_holds(engine: Engine) -> None:
    """80 constrained requests at once: the shared-memory mask ring (64 rows at first) grows into a new file
    while the workers still map the old one."""
    outs = await generate_all(engine, [
        {"prompt": f"Word {i}: ", "sampling_params": {"temperature": 1.0, "seed": i, "max_new_tokens": 6,
                                                     "regex": "[a-z]{4}"}}
        for i in range(80)
    ])
    assert all(re.fullmatch("[a-z]{4}", out.text) for out in outs), [out.text for out in outs]
    ring = engine.scheduler.core.constrained._ring
    assert ring is not None and ring.rows >= 80
    await engine.check_integrity()


async def test_sampled_outputs_follow_the_grammar(engine: Engine) -> None:
    """Temperature 1 with a seed explores tokens greedy decoding never picks."""
    requests = [
        {"prompt": "Some arithmetic: ",
         "sampling_params": {"temperature": 1.0, "seed": i, "max_new_tokens": 48, "ebnf": ARITHMETIC}}
        for i in range(4)
    ] + [
        {"prompt": prompt, "sampling_params": {"temperature": 1.0, "seed": 7, "max_new_tokens": 40,
                                               "regex": pattern, "frequency_penalty": 0.5}}
        for prompt, pattern in REGEXES
    ]
    outs = await generate_all(engine, requests)
    for out in outs[:4]:
        check_arithmetic(out.text, complete=out.finish_reason == "stop")
    for (_, pattern), out in zip(REGEXES, outs[4:], strict=True):
        assert re.fullmatch(pattern, out.text), (pattern, out.text)
    assert engine.scheduler.core.num_grammar_rejections == 0
    await engine.check_integrity()


def check_arithmetic(text: str, complete: bool = True) -> None:
    """`text` is an expression of the ARITHMETIC grammar (or, unfinished, a prefix of one)."""
    assert re.fullmatch(r"[0-9+\-*/()]+", text), text
    if not complete:
        return
    tree = ast.parse(text, mode="eval")
    allowed = (ast.Expression, ast.BinOp, ast.Constant, ast.Add, ast.Sub, ast.Mult, ast.Div)
    assert all(isinstance(node, allowed) for node in ast.walk(tree)), text


async def test_ebnf_arithmetic(engine: Engine) -> None:
    out = await engine.generate(
        "Write an arithmetic expression: ", {"temperature": 0, "max_new_tokens": 32, "ebnf": ARITHMETIC}
    )
    check_arithmetic(out.text, complete=out.finish_reason == "stop")
    assert out.text


async def test_free_json_object(engine: Engine) -> None:
    out = await engine.generate(
        messages=[{"role": "user", "content": "Give me a traffic light color as a JSON object."}],
        sampling_params={"temperature": 0, "max_new_tokens": 64, "json_object": True},
    )
    assert out.finish_reason == "stop", out.text
    assert isinstance(json.loads(out.text), dict)


async def test_schema_as_dict_and_penalties_with_jump_forward(engine: Engine) -> None:
    """from_dict takes a schema object; requests with penalties get jump-forward edits to their counts."""
    what, schema = SCHEMAS[0]
    out = await engine.generate(
        messages=[{"role": "user", "content": f"Give me {what} as a JSON object."}],
        sampling_params={"temperature": 0, "max_new_tokens": MAX_NEW, "json_schema": schema,
                         "repetition_penalty": 1.3, "presence_penalty": 0.5},
    )
    jsonschema.validate(json.loads(out.text), schema)
    await engine.check_integrity()


async def test_logprobs_cover_forced_tokens(engine: Engine) -> None:
    """A request with logprobs decodes forced text one token per step: every token has its logprob."""
    what, schema = SCHEMAS[1]
    out = await engine.generate(
        messages=[{"role": "user", "content": f"Give me {what} as a JSON object."}],
        sampling_params={"temperature": 0, "max_new_tokens": MAX_NEW, "json_schema": json.dumps(schema),
                         "logprobs": 2},
    )
    jsonschema.validate(json.loads(out.text), schema)
    assert out.logprobs is not None and [lp.token_id for lp in out.logprobs] == out.token_ids
    assert all(lp.logprob <= 0.0 and lp.top is not None and len(lp.top) == 2 for lp in out.logprobs)


BAD_INPUTS: list[tuple[dict[str, Any], str]] = [
    ({"regex": "[a-"}, "regex"),
    ({"regex": "(unclosed"}, "regex"),
    ({"ebnf": "root ::= ("}, "ebnf"),
    ({"ebnf": "expr ::= \"a\""}, "ebnf"),  # no root rule
    ({"json_schema": "{not json"}, "json_schema"),
    ({"json_schema": json.dumps({"type": "foo"})}, "json_schema"),
    ({"json_schema": "{}", "regex": "a"}, "regex"),
    ({"regex": "a", "json_object": True}, "json_object"),
    ({"regex": "a", "min_new_tokens": 2}, "min_new_tokens"),
]


@pytest.mark.parametrize(("params", "field"), BAD_INPUTS)
async def test_bad_specs_are_rejected(engine: Engine, params: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        await engine.generate("Hi", {"max_new_tokens": 4, **params})
    assert info.value.field == field, info.value


async def test_engine_serves_after_bad_specs(engine: Engine) -> None:
    out = await engine.generate("Answer: ", {"temperature": 0, "max_new_tokens": 8, "regex": "(yes|no)"})
    assert out.text in ("yes", "no")
    await engine.check_integrity()


# ------------------------------------------------------------------------------------------------ HTTP


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def http(engine: Engine) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=build_app(engine))
    async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=120) as client:
        yield client


async def test_http_response_format_and_extras(http: httpx.AsyncClient) -> None:
    model = (await http.get("/v1/models")).json()["data"][0]["id"]
    what, schema = SCHEMAS[0]
    chat = {"model": model, "messages": [{"role": "user", "content": f"Give me {what} as a JSON object."}],
            "temperature": 0, "max_tokens": MAX_NEW}
    strict = {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}}
    bodies = [
        ("/v1/chat/completions", {**chat, "response_format": strict}),
        ("/v1/chat/completions", {**chat, "response_format": {"type": "json_object"}}),
        ("/v1/chat/completions", {**chat, "json_schema": schema}),
        ("/v1/completions", {"model": model, "prompt": "Person as JSON: ", "max_tokens": MAX_NEW,
                             "temperature": 0, "json_schema": json.dumps(schema)}),
    ]
    for path, body in bodies:
        response = await http.post(path, json=body)
        assert response.status_code == 200, response.text
        choice = response.json()["choices"][0]
        text = choice["message"]["content"] if "message" in choice else choice["text"]
        value = json.loads(text)
        if body.get("response_format", {}).get("type") != "json_object":
            jsonschema.validate(value, schema)
    regex = await http.post("/v1/completions", json={
        "model": model, "prompt": "A hex color: ", "max_tokens": 16, "temperature": 0, "regex": "#[0-9a-f]{6}"
    })
    assert re.fullmatch("#[0-9a-f]{6}", regex.json()["choices"][0]["text"])
    native = await http.post("/generate", json={"text": "Answer: ", "sampling_params": {
        "max_new_tokens": 8, "temperature": 0, "ebnf": 'root ::= "yes" | "no"'}})
    assert native.json()["text"] in ("yes", "no")


@pytest.mark.parametrize(
    ("path", "extra", "param"),
    [
        ("/v1/chat/completions",
         {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "x"}}}},
         "response_format"),
        ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {"schema": 3}}},
         "response_format.json_schema"),
        ("/v1/chat/completions", {"regex": "[a-"}, "regex"),
        ("/v1/completions", {"ebnf": "root ::= ("}, "ebnf"),
        ("/v1/completions", {"json_schema": "{", "regex": "a"}, "regex"),
        ("/generate", {"sampling_params": {"json_schema": "{"}}, "json_schema"),
    ],
)
async def test_http_bad_specs_are_400(
    http: httpx.AsyncClient, path: str, extra: dict[str, Any], param: str
) -> None:
    model = (await http.get("/v1/models")).json()["data"][0]["id"]
    body: dict[str, Any] = {"text": "Hi"} if path == "/generate" else {"model": model, "max_tokens": 4}
    if path == "/v1/chat/completions":
        body["messages"] = [{"role": "user", "content": "Hi"}]
    elif path == "/v1/completions":
        body["prompt"] = "Hi"
    response = await http.post(path, json={**body, **extra})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param, response.json()
