"""Constrained decoding: jump-forward on a JSON-extraction workload, and what grammar masks cost at batch 64.

    python -m radixserve.benchmarks.random_model --config llama-3.1-8b --out /tmp/llama-8b
    python -m radixserve.benchmarks.bench_constrained --model-path /tmp/llama-8b --load-format dummy
    python -m radixserve.benchmarks.bench_constrained                        # the default model (SmolLM2)
    python -m radixserve.benchmarks.bench_constrained --num-requests 8 --batch-size 4 --overhead-tokens 16

Part 1, jump-forward: --num-requests prompts that ask for fields of a made-up customer record as JSON in one
fixed schema with long literal keys, all submitted at once at temperature 0, with jump-forward off and then on
(one engine: the prefix cache is flushed between the runs). Reports forward passes, wall time, output tokens,
tokens appended by jump-forward, outputs that parse and have every key, and texts equal in both runs.

Part 2, overhead: --batch-size requests of --overhead-tokens tokens: unconstrained (ignore_eos), constrained
by a grammar that forces nothing and never ends (`root ::= [a-z ] root`: masks are computed and applied, but
no jump-forward), and half of each. Reports output tokens/s and ms per forward pass. Constrained rows ride
the overlap pipeline: their masks are computed while the GPU runs the step and sent after the plan
(actors/scheduler_core.py, StepMask), so the overhead is the mask upload and its application before sampling.

Part 1 flips jump-forward on the running engine's scheduler configs, a shortcut for benchmarks and tests.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from dataclasses import dataclass
from typing import Any

import anyio
import numpy as np

from radixserve.benchmarks.bench_offline import flush_cache
from radixserve.benchmarks.common import (
    add_common_args,
    add_engine_args,
    engine_kwargs,
    print_grid,
    run_info,
    write_result,
)
from radixserve.engine import Engine
from radixserve.outputs import GenerateOutput

_TEXT = {"type": "string", "maxLength": 24}
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "customer_full_legal_name": _TEXT,
        "primary_shipping_address_city": _TEXT,
        "primary_shipping_address_postal_code": {"type": "string", "pattern": "^[0-9]{5}$"},
        "preferred_contact_method": {"enum": ["email", "phone", "postal_mail"]},
        "lifetime_number_of_orders": {"type": "integer", "minimum": 0, "maximum": 9999},
        "account_is_verified_and_in_good_standing": {"type": "boolean"},
        "most_recently_purchased_product_category": {"enum": ["books", "electronics", "garden", "toys"]},
    },
    "required": [
        "customer_full_legal_name", "primary_shipping_address_city", "primary_shipping_address_postal_code",
        "preferred_contact_method", "lifetime_number_of_orders", "account_is_verified_and_in_good_standing",
        "most_recently_purchased_product_category",
    ],
}
NEVER_ENDS = "root ::= [a-z ] root"
_FIRST = ["Maria", "John", "Aiko", "Lars", "Fatima", "Pedro", "Chen", "Olga", "Kwame", "Sofia"]
_LAST = ["Garcia", "Smith", "Tanaka", "Nilsson", "Haddad", "Silva", "Wei", "Ivanova", "Mensah", "Rossi"]
_CITIES = ["Lisbon", "Osaka", "Denver", "Malmo", "Accra", "Porto", "Chengdu", "Kazan", "Turin", "Austin"]


@dataclass(frozen=True, slots=True)
class RunStats:
    name: str
    requests: int
    wall_s: float
    forward_passes: int
    output_tokens: int
    jump_forward_tokens: int
    output_throughput: float  # output tokens / s
    ms_per_forward_pass: float
    valid: int = 0  # JSON runs: outputs that parse and carry every required key


def extraction_prompts(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    prompts = []
    for _ in range(n):
        first, last, city = rng.choice(_FIRST), rng.choice(_LAST), rng.choice(_CITIES)
        orders, zipcode = int(rng.integers(0, 500)), int(rng.integers(10000, 99999))
        method = rng.choice(["email", "phone", "postal mail"])
        category = rng.choice(["books", "electronics", "garden", "toys"])
        note = (f"{first} {last} from {city} (postal code {zipcode}) has placed {orders} orders with us and "
                f"prefers to be contacted by {method}. The account was verified last year and is in good "
                f"standing; the latest purchase was in our {category} section.")
        prompts.append(f"Extract the customer record from this note as JSON.\nNote: {note}\nJSON: ")
    return prompts


async def generate_all(engine: Engine, requests: list[dict[str, Any]]) -> list[GenerateOutput]:
    outs: list[Any] = [None] * len(requests)

    async def one(i: int) -> None:
        outs[i] = await engine.generate(**requests[i])

    async with anyio.create_task_group() as tg:
        for i in range(len(requests)):
            tg.start_soon(one, i)
    return outs


async def measure(engine: Engine, name: str, requests: list[dict[str, Any]]) -> tuple[RunStats, list[Any]]:
    await flush_cache(engine)
    cores = [s.core for s in engine.schedulers]
    steps = sum(c.num_forward_steps for c in cores)
    jumped = sum(c.num_jump_forward_tokens for c in cores)
    start = time.perf_counter()
    outs = await generate_all(engine, requests)
    wall = time.perf_counter() - start
    passes = sum(c.num_forward_steps for c in cores) - steps
    tokens = sum(len(o.token_ids) for o in outs)
    jumped = sum(c.num_jump_forward_tokens for c in cores) - jumped
    stats = RunStats(name, len(outs), wall, passes, tokens, jumped, tokens / wall,
                     1000 * wall / max(passes, 1))
    return stats, outs


def set_jump_forward(engine: Engine, on: bool) -> None:
    for scheduler in engine.schedulers:
        scheduler.core.cfg = dataclasses.replace(scheduler.core.cfg, disable_jump_forward=not on)


def valid_records(outs: list[GenerateOutput]) -> int:
    n = 0
    for out in outs:
        try:
            # NOTE: strict=False: xgrammar's strings with maxLength take raw control characters, which random
            # weights do emit.
            value = json.loads(out.text, strict=False)
        except ValueError:
            continue
        n += isinstance(value, dict) and set(SCHEMA["required"]) <= set(value)
    return n


async def jump_forward_runs(engine: Engine, args: argparse.Namespace) -> dict[str, Any]:
    schema = json.dumps(SCHEMA)
    params = {"temperature": 0.0, "max_new_tokens": args.max_new_tokens, "json_schema": schema}
    prompts = extraction_prompts(args.num_requests, args.seed)
    requests = [{"prompt": p, "sampling_params": params} for p in prompts]
    runs, texts = [], []
    for on in (False, True):
        set_jump_forward(engine, on)
        await generate_all(engine, requests[: min(4, len(requests))])  # warm-up: grammar compiled, graphs hot
        stats, outs = await measure(engine, f"json, jump-forward {'on' if on else 'off'}", requests)
        runs.append(dataclasses.replace(stats, valid=valid_records(outs)))
        texts.append([o.text for o in outs])
    set_jump_forward(engine, not engine.config.disable_jump_forward)
    same = sum(a == b for a, b in zip(*texts, strict=True))
    return {"runs": runs, "same_texts": same, "example": texts[1][0] if texts[1] else ""}


async def overhead_runs(engine: Engine, args: argparse.Namespace) -> list[RunStats]:
    n, tokens = args.batch_size, args.overhead_tokens
    prompts = extraction_prompts(n, args.seed + 1)
    free = {"temperature": 0.0, "max_new_tokens": tokens, "ignore_eos": True}
    constrained = {**free, "ebnf": NEVER_ENDS}
    await generate_all(engine, [{"prompt": prompts[0], "sampling_params": constrained}])  # compile, warm up
    runs = []
    for name, mix in (("unconstrained", [free] * n), ("constrained", [constrained] * n),
                      ("half constrained", [free, constrained] * (n // 2) + [free] * (n % 2))):
        requests = [{"prompt": p, "sampling_params": s} for p, s in zip(prompts, mix, strict=True)]
        stats, outs = await measure(engine, f"{name}, batch {n}", requests)
        if sum(len(o.token_ids) for o in outs) != n * tokens:
            print(f"WARNING: {name}: outputs ended before {tokens} tokens")
        runs.append(stats)
    return runs


async def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    async with Engine(args.model_path, **engine_kwargs(args)) as engine:
        part1 = await jump_forward_runs(engine, args) if args.num_requests else {}
        part2 = await overhead_runs(engine, args) if args.batch_size else []
        await engine.check_integrity()
    return {"jump_forward": part1, "overhead": part2}


def report(result: dict[str, Any], device: str) -> None:
    header = ["run", "requests", "wall s", "passes", "out tok", "jumped", "tok/s", "ms/pass", "valid"]
    runs = result["jump_forward"].get("runs", []) + result["overhead"]
    print(f"\nconstrained decoding ({device})")
    print_grid(header, [
        (r.name, r.requests, r.wall_s, r.forward_passes, r.output_tokens, r.jump_forward_tokens,
         r.output_throughput, r.ms_per_forward_pass, r.valid if r.name.startswith("json") else "-")
        for r in runs
    ])
    if result["jump_forward"]:
        print(f"texts equal with and without jump-forward: {result['jump_forward']['same_texts']}"
              f"/{runs[0].requests}")
        print(f"example output: {result['jump_forward']['example'][:200]}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="radixserve constrained decoding: jump-forward and overhead")
    parser.add_argument("--model-path", default=None, help="HF folder or GGUF file (default: SmolLM2)")
    parser.add_argument("--num-requests", type=int, default=200, help="JSON extraction requests (0: skip)")
    parser.add_argument("--max-new-tokens", type=int, default=512, help="JSON extraction output budget")
    parser.add_argument("--batch-size", type=int, default=64, help="overhead runs' batch (0: skip)")
    parser.add_argument("--overhead-tokens", type=int, default=128, help="output tokens per overhead request")
    add_common_args(parser)
    add_engine_args(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    info = run_info("bench_constrained", args)
    result = anyio.run(benchmark, args, backend_options={"use_uvloop": True})
    path = write_result(args.result_dir, info, result)
    report(result, info.device)
    print(f"result: {path}")
    return result


if __name__ == "__main__":
    main()
