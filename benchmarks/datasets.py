"""Benchmark workloads as token-id prompts with fixed output lengths (run them with ignore_eos).

No tokenizer and no download: prompts are random token ids, so the prompt length in tokens is exact.

    random                    SGLang's `random`/`random-ids`: input and output lengths uniform in
                              [range_ratio * len, len] (`--random-range-ratio`, default 0 as in SGLang)
    sharegpt-synthetic        ShareGPT-like long-tailed lengths: log-normal draws fitted to ShareGPT's first
                              turns (medians about 100 prompt / 130 completion tokens), filtered as SGLang
                              filters ShareGPT (each >= 4 tokens, prompt + output <= the context length)
    generated-shared-prefix   SGLang's generated-shared-prefix: `gsp_num_groups` system prompts of
                              `gsp_system_prompt_len` tokens, each followed by `gsp_prompts_per_group`
                              questions of `gsp_question_len` tokens, shuffled; every output is
                              `gsp_output_len` tokens
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

import numpy as np

DATASETS = ("random", "sharegpt-synthetic", "generated-shared-prefix")
_ALIASES = {"random-ids": "random", "gsp": "generated-shared-prefix", "sharegpt": "sharegpt-synthetic"}

# Log-normal (median, sigma) of ShareGPT V3 first-turn lengths in Llama-family tokens: an approximation of the
# published histograms, not the data. After the 2048-token filter the means are near 190 prompt and 200
# completion tokens, with long right tails.
SHAREGPT_PROMPT_LOGNORMAL = (100.0, 1.3)
SHAREGPT_OUTPUT_LOGNORMAL = (130.0, 1.0)
SHAREGPT_MIN_LEN = 4


@dataclass(frozen=True, slots=True)
class BenchRequest:
    input_ids: list[int]
    output_len: int

    @property
    def prompt_len(self) -> int:
        return len(self.input_ids)


def random_ids(rng: np.random.Generator, n: int, vocab_size: int) -> list[int]:
    return rng.integers(0, vocab_size, size=n).tolist()


def random_requests(
    num_prompts: int,
    input_len: int,
    output_len: int,
    range_ratio: float,
    vocab_size: int,
    rng: np.random.Generator,
) -> list[BenchRequest]:
    """SGLang's random dataset: lengths uniform over [max(int(len * ratio), 1), len], inclusive.

    NOTE: SGLang lets the output lower bound be 0 (a prefill-only request); we keep at least one token so
    that every request has a TTFT.
    """
    if not 0.0 <= range_ratio <= 1.0:
        raise ValueError(f"range_ratio must be in [0, 1], got {range_ratio}")
    input_lens = rng.integers(max(int(input_len * range_ratio), 1), input_len + 1, size=num_prompts)
    output_lens = rng.integers(max(int(output_len * range_ratio), 1), output_len + 1, size=num_prompts)
    return [
        BenchRequest(random_ids(rng, int(i), vocab_size), int(o))
        for i, o in zip(input_lens, output_lens, strict=True)
    ]


def sharegpt_synthetic_requests(
    num_prompts: int,
    vocab_size: int,
    rng: np.random.Generator,
    context_len: int = 2048,
    fixed_output_len: int | None = None,
) -> list[BenchRequest]:
    """ShareGPT-shaped lengths (see the module docstring); rejected draws are drawn again."""
    if context_len < 2 * SHAREGPT_MIN_LEN:
        raise ValueError(f"context_len must be >= {2 * SHAREGPT_MIN_LEN}, got {context_len}")
    requests: list[BenchRequest] = []
    while len(requests) < num_prompts:
        prompt_len = _lognormal(rng, *SHAREGPT_PROMPT_LOGNORMAL)
        output_len = fixed_output_len or _lognormal(rng, *SHAREGPT_OUTPUT_LOGNORMAL)
        if min(prompt_len, output_len) < SHAREGPT_MIN_LEN or prompt_len + output_len > context_len:
            continue
        requests.append(BenchRequest(random_ids(rng, prompt_len, vocab_size), output_len))
    return requests


def _lognormal(rng: np.random.Generator, median: float, sigma: float) -> int:
    return int(round(rng.lognormal(math.log(median), sigma)))


def shared_prefix_requests(
    num_groups: int,
    prompts_per_group: int,
    system_prompt_len: int,
    question_len: int,
    output_len: int,
    vocab_size: int,
    rng: np.random.Generator,
) -> list[BenchRequest]:
    """SGLang's generated-shared-prefix: num_groups * prompts_per_group prompts, shuffled."""
    system_prompts = [random_ids(rng, system_prompt_len, vocab_size) for _ in range(num_groups)]
    requests = [
        BenchRequest(system + random_ids(rng, question_len, vocab_size), output_len)
        for system in system_prompts
        for _ in range(prompts_per_group)
    ]
    order = rng.permutation(len(requests))
    return [requests[i] for i in order]


def add_dataset_args(parser: argparse.ArgumentParser) -> None:
    """SGLang bench_serving's dataset flags (same names and defaults)."""
    g = parser.add_argument_group("dataset")
    g.add_argument("--dataset-name", default="random", choices=[*DATASETS, *_ALIASES])
    g.add_argument("--num-prompts", type=int, default=1000, help="random and sharegpt-synthetic")
    g.add_argument("--random-input-len", type=int, default=1024)
    g.add_argument("--random-output-len", type=int, default=1024)
    g.add_argument("--random-range-ratio", type=float, default=0.0)
    g.add_argument("--sharegpt-output-len", type=int, default=None, help="fixed output length instead")
    g.add_argument("--sharegpt-context-len", type=int, default=2048, help="drop longer prompt + output")
    g.add_argument("--gsp-num-groups", type=int, default=64)
    g.add_argument("--gsp-prompts-per-group", type=int, default=16)
    g.add_argument("--gsp-system-prompt-len", type=int, default=2048)
    g.add_argument("--gsp-question-len", type=int, default=128)
    g.add_argument("--gsp-output-len", type=int, default=256)


def build_dataset(args: argparse.Namespace, vocab_size: int) -> list[BenchRequest]:
    rng = np.random.default_rng(args.seed)
    name = _ALIASES.get(args.dataset_name, args.dataset_name)
    if name == "random":
        return random_requests(
            args.num_prompts, args.random_input_len, args.random_output_len, args.random_range_ratio,
            vocab_size, rng,
        )
    if name == "sharegpt-synthetic":
        return sharegpt_synthetic_requests(
            args.num_prompts, vocab_size, rng, args.sharegpt_context_len, args.sharegpt_output_len
        )
    if name == "generated-shared-prefix":
        return shared_prefix_requests(
            args.gsp_num_groups, args.gsp_prompts_per_group, args.gsp_system_prompt_len,
            args.gsp_question_len, args.gsp_output_len, vocab_size, rng,
        )
    raise ValueError(f"unknown dataset {args.dataset_name!r} (known: {', '.join(DATASETS)})")


def summary(requests: list[BenchRequest]) -> dict[str, float]:
    inputs = np.array([r.prompt_len for r in requests])
    outputs = np.array([r.output_len for r in requests])
    return {
        "num_requests": len(requests),
        "total_input_tokens": int(inputs.sum()),
        "total_output_tokens": int(outputs.sum()),
        "mean_input_len": float(inputs.mean()),
        "mean_output_len": float(outputs.mean()),
        "max_input_len": int(inputs.max()),
        "max_output_len": int(outputs.max()),
    }
