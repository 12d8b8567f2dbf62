from __future__ import annotations

import math
from collections.abc import Sequence

import pytest
import torch
from torch import Tensor

from radixserve.ops.sampler import SampleOutput, Sampler, token_logprobs
from radixserve.sampling_params import SamplingParams

EOS = (0, 1)
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=CUDA)])
def device(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def make_sampler(
    params: Sequence[SamplingParams],
    vocab_size: int,
    prompts: Sequence[Sequence[int]] = (),
    device: str = "cpu",
) -> Sampler:
    sampler = Sampler(vocab_size, EOS, device)
    for key, p in enumerate(params):
        sampler.add_request(key, p, prompts[key] if prompts else [])
    return sampler


def run(
    sampler: Sampler,
    logits: Tensor,
    keys: Sequence[int] | None = None,
    output_lens: Sequence[int] | None = None,
) -> SampleOutput:
    """sample() on a copy of CPU `logits` moved to the sampler's device; the output comes back to the CPU."""
    B = logits.shape[0]
    out = sampler.sample(
        logits.to(sampler.device, copy=True),
        range(B) if keys is None else keys,
        [0] * B if output_lens is None else output_lens,
    )
    assert out.tokens.device == sampler.device
    return SampleOutput(*(None if t is None else t.cpu() for t in out))


def sample(sampler: Sampler, logits: Tensor, output_lens: Sequence[int] | None = None) -> Tensor:
    return run(sampler, logits, output_lens=output_lens).tokens


def reference_allowed(logits: Tensor, p: SamplingParams) -> tuple[Tensor, Tensor]:
    """(allowed mask [V], renormalized probabilities [V]) in float64 from one float32 row, HF order."""
    probs = torch.softmax(logits.double() / p.temperature, dim=-1)
    order = probs.argsort(descending=True)
    kept = torch.zeros_like(probs, dtype=torch.bool)
    if 0 < p.top_k < probs.numel():
        kept[order[: p.top_k]] = True
    else:
        kept[:] = True
    renorm = torch.where(kept, probs, 0.0)
    renorm = renorm / renorm.sum()
    mass_above = renorm[order].cumsum(0) - renorm[order]
    in_top_p = torch.zeros_like(kept)
    in_top_p[order] = mass_above <= p.top_p
    kept &= in_top_p
    kept &= probs >= p.min_p * probs.max()
    final = torch.where(kept, probs, 0.0)
    return kept, final / final.sum()


def boundary_margin(logits: Tensor, p: SamplingParams) -> float:
    """How far (relatively) the row's probabilities sit from the top-p and min-p cut-offs."""
    probs = torch.softmax(logits.double() / p.temperature, dim=-1).sort(descending=True).values
    if 0 < p.top_k < probs.numel():
        probs = probs[: p.top_k]
    margins = [math.inf]
    if p.top_p < 1.0:
        margins.append(float(((probs.cumsum(0) - probs) / probs.sum() - p.top_p).abs().min()))
    if p.min_p > 0.0:
        margins.append(float(((probs - p.min_p * probs[0]) / probs[0]).abs().min()))
    return min(margins)


def chi_square(tokens: Tensor, expected: Tensor) -> tuple[float, int]:
    counts = torch.bincount(tokens, minlength=expected.numel()).double()
    exp = expected * tokens.numel()
    mask = exp > 0
    assert counts[~mask].sum() == 0, "sampled a token of probability 0"
    return float(((counts[mask] - exp[mask]) ** 2 / exp[mask]).sum()), int(mask.sum()) - 1


# -- greedy --------------------------------------------------------------------------------------------


def test_greedy_is_argmax(device: str) -> None:
    torch.manual_seed(0)
    logits = torch.randn(8, 100)
    out = run(make_sampler([SamplingParams(temperature=0.0)] * 8, 100, device=device), logits)
    assert torch.equal(out.tokens, logits.argmax(-1))
    assert out.tokens.dtype == torch.int64
    assert out.logprobs is None and out.top_ids is None and out.top_logprobs is None


def test_greedy_on_bf16_logits_argmaxes_them_as_they_are(device: str) -> None:
    """The runner hands over bf16 logits: plain greedy rows argmax them without a float32 copy (same token),
    min_new_tokens still masks EOS in them, and a batch that samples works on a float32 copy."""
    torch.manual_seed(3)
    logits = torch.randn(8, 100).bfloat16()
    logits[:, 5] = logits.max() + 1  # the top token: masked below for row 0 (an EOS id) ...
    logits[:, 0] = logits.max() + 1
    greedy = [SamplingParams(temperature=0.0, min_new_tokens=2)] + [SamplingParams(temperature=0.0)] * 7
    out = run(make_sampler(greedy, 100, device=device), logits, output_lens=[0] * 8)
    assert out.tokens[0] == 5 and (out.tokens[1:] == 0).all()
    mixed = [SamplingParams(temperature=0.0)] * 4 + [SamplingParams(temperature=1.0, top_k=1)] * 4
    assert torch.equal(run(make_sampler(mixed, 100, device=device), logits).tokens, logits.float().argmax(-1))


def test_top_k_1_is_greedy() -> None:
    torch.manual_seed(1)
    logits = torch.randn(16, 100)
    params = [SamplingParams(temperature=1.5, top_k=1)] * 8 + [SamplingParams(temperature=0.0)] * 8
    assert torch.equal(sample(make_sampler(params, 100), logits), logits.argmax(-1))


def test_mixed_batch_keeps_greedy_rows_greedy() -> None:
    torch.manual_seed(2)
    logits = torch.randn(10, 50)
    params = [SamplingParams(temperature=0.0 if b % 2 else 1.0) for b in range(10)]
    tokens = sample(make_sampler(params, 50), logits)
    assert torch.equal(tokens[1::2], logits[1::2].argmax(-1))


# -- filters and the sampled distribution --------------------------------------------------------------

FILTERS = [
    SamplingParams(top_k=5),
    SamplingParams(top_p=0.62),
    SamplingParams(min_p=0.17),
    SamplingParams(top_k=12, top_p=0.55, temperature=0.7),
    SamplingParams(top_k=30, min_p=0.05, temperature=1.3),
    SamplingParams(top_p=0.8, min_p=0.1, temperature=2.0),
    SamplingParams(),  # in the same batch as sorting rows: must still see all V columns
]


def test_filters_never_leave_allowed_set(device: str) -> None:
    torch.manual_seed(3)
    V, copies = 64, 600
    base = torch.randn(len(FILTERS), V) * 2
    for row, p in zip(base, FILTERS, strict=True):
        assert boundary_margin(row, p) > 1e-5, p  # float32 and float64 could disagree on a boundary
    params = [p for p in FILTERS for _ in range(copies)]
    logits = base.repeat_interleave(copies, dim=0)
    tokens = sample(make_sampler(params, V, device=device), logits).view(len(FILTERS), copies)
    for f, p in enumerate(FILTERS):
        allowed, probs = reference_allowed(base[f], p)
        picked = torch.unique(tokens[f])
        assert allowed[picked].all(), (p, picked[~allowed[picked]])
        # and the filter is not too strict: every likely allowed token shows up
        likely = torch.nonzero(probs > 0.02).flatten()
        assert torch.isin(likely, picked).all(), (p, likely, picked)


def test_top_p_applies_to_top_k_survivors(device: str) -> None:
    # HF order: top-p sees the renormalized top-k. Survivors 0.4 and 0.2 renormalize to 2/3 and 1/3: with
    # top_p = 0.5 the mass above token 1 (2/3) exceeds it, so only token 0 stays. (Unrenormalized, 0.4 <= 0.5
    # would keep token 1 too.)
    logits = torch.tensor([0.4, 0.2, 0.2, 0.2]).log().expand(2000, 4).contiguous()
    tokens = sample(make_sampler([SamplingParams(top_k=2, top_p=0.5)] * 2000, 4, device=device), logits)
    assert (tokens == 0).all()


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.5),
        SamplingParams(top_k=6, top_p=0.9),
        SamplingParams(min_p=0.1, temperature=1.2),
    ],
)
def test_distribution_matches_reference(params: SamplingParams, device: str) -> None:
    torch.manual_seed(4)
    V, N = 16, 20000
    row = torch.randn(V)
    _, expected = reference_allowed(row, params)
    tokens = sample(make_sampler([params] * N, V, device=device), row.expand(N, V).contiguous())
    stat, dof = chi_square(tokens, expected)
    assert stat < dof + 6 * math.sqrt(2 * dof), (stat, dof)  # ~6 sigma of the chi-square


def test_seeded_rows_follow_the_distribution(device: str) -> None:
    V, N = 12, 3000
    row = torch.randn(V, generator=torch.Generator().manual_seed(5))
    sampler = make_sampler([SamplingParams(seed=s) for s in range(N)], V, device=device)
    tokens = sample(sampler, row.expand(N, V).contiguous())
    stat, dof = chi_square(tokens, torch.softmax(row.double(), -1))
    assert stat < dof + 6 * math.sqrt(2 * dof), (stat, dof)


# -- penalties -----------------------------------------------------------------------------------------


def reference_penalties(logits: Tensor, p: SamplingParams, prompt: list[int], outputs: list[int]) -> Tensor:
    out = logits.clone()
    for t in set(prompt) | set(outputs):
        x = out[t]
        out[t] = x / p.repetition_penalty if x > 0 else x * p.repetition_penalty
    for t in set(outputs):
        n = outputs.count(t)
        out[t] -= p.frequency_penalty * n + p.presence_penalty
    return out


def test_penalties_match_naive_reference(device: str) -> None:
    torch.manual_seed(6)
    V, steps = 40, 12
    params = [
        SamplingParams(temperature=0.0, repetition_penalty=1.3),
        SamplingParams(temperature=0.0, frequency_penalty=0.7, presence_penalty=-0.4),
        SamplingParams(temperature=0.0),  # no penalty, between penalized rows
        SamplingParams(temperature=0.9, repetition_penalty=0.8, frequency_penalty=1.5, presence_penalty=1.0),
        SamplingParams(temperature=1.0, top_k=5),
        SamplingParams(temperature=0.0, presence_penalty=2.0, repetition_penalty=2.0),
    ]
    prompts = [torch.randint(0, V, (n,)).tolist() for n in (7, 3, 5, 0, 4, 9)]
    sampler = make_sampler(params, V, prompts, device=device)
    outputs: list[list[int]] = [[] for _ in params]
    for step in range(steps):
        # Few distinct values so that tokens repeat and counts exceed 1.
        raw = torch.randn(len(params), V) * 3
        raw[:, :4] += 6
        expected = torch.stack(
            [reference_penalties(raw[b], p, prompts[b], outputs[b]) for b, p in enumerate(params)]
        )
        logits = raw.to(device, copy=True)
        tokens = sampler.sample(logits, range(len(params)), [step] * len(params)).tokens.cpu()
        torch.testing.assert_close(logits.cpu(), expected)  # penalties were applied in place
        for b, p in enumerate(params):
            if p.greedy:
                assert tokens[b] == expected[b].argmax()
            outputs[b].append(int(tokens[b]))
    assert any(len(set(o)) < len(o) for o in outputs), "the test never repeated a token"


def test_penalty_only_rows_in_subset_and_slot_reuse(device: str) -> None:
    V = 20
    sampler = Sampler(V, EOS, device)
    for key in range(20):  # more than the initial slots: the state grows
        sampler.add_request(key, SamplingParams(temperature=0.0, frequency_penalty=2.0), [])
    logits = torch.zeros(20, V)
    logits[:, 7] = 1.0
    assert (sample(sampler, logits, [0] * 20) == 7).all()
    assert (sample(sampler, logits, [1] * 20) != 7).all()  # 1 - 2 < 0
    sampler.remove_request(3)
    sampler.add_request(3, SamplingParams(temperature=0.0, frequency_penalty=2.0), [])
    assert int(run(sampler, logits[:1], [3]).tokens) == 7  # fresh counts


def test_resumed_request_restores_output_counts() -> None:
    V = 10
    sampler = Sampler(V, EOS, "cpu")
    sampler.add_request(0, SamplingParams(temperature=0.0, presence_penalty=2.0), [4], output_ids=[5, 5])
    logits = torch.zeros(1, V)
    logits[0, 5] = 1.5
    logits[0, 6] = 0.5
    logits[0, 7] = 0.4
    assert int(sampler.sample(logits.clone(), [0], [2]).tokens) == 6
    sampler.append_tokens(0, [6])  # e.g. jump-forward: the host appended it without sampling
    assert int(sampler.sample(logits.clone(), [0], [4]).tokens) == 7


# -- logit bias and min_new_tokens ---------------------------------------------------------------------


def test_logit_bias_forbids_and_forces(device: str) -> None:
    torch.manual_seed(7)
    V, N = 30, 200
    logits = torch.randn(N, V)
    top = logits.argmax(-1)
    forbid = [SamplingParams(temperature=0.0, logit_bias={int(t): -math.inf}) for t in top[: N // 2]]
    force = [SamplingParams(temperature=1.0, logit_bias={13: 100.0})] * (N // 2)
    tokens = sample(make_sampler(forbid + force, V, device=device), logits)
    second = logits[: N // 2].topk(2, dim=-1).indices[:, 1]
    assert torch.equal(tokens[: N // 2], second)
    assert (tokens[N // 2 :] == 13).all()


def test_min_new_tokens_masks_eos_and_stop_tokens(device: str) -> None:
    V, N = 16, 64
    logits = torch.zeros(N, V)
    logits[:, [0, 1, 9]] = 50.0  # EOS ids 0 and 1, stop token 9
    logits[:, 3] = 1.0
    p_greedy = SamplingParams(temperature=0.0, min_new_tokens=3, stop_token_ids=[9])
    p_sampled = SamplingParams(min_new_tokens=3, stop_token_ids=[9], ignore_eos=True)
    sampler = make_sampler([p_greedy, p_sampled] * (N // 2), V, device=device)
    for step in range(3):
        tokens = sample(sampler, logits, [step] * N)
        assert not torch.isin(tokens, torch.tensor([0, 1, 9])).any()
        assert (tokens[::2] == 3).all()
    tokens = sample(sampler, logits, [3] * N)
    assert torch.isin(tokens, torch.tensor([0, 1, 9])).all()  # ignore_eos does not change sampling


# -- seeds ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "seeded", [SamplingParams(seed=1234, temperature=0.8), SamplingParams(seed=99, top_p=0.9, top_k=20)]
)
def test_seeded_request_is_independent_of_its_batch(seeded: SamplingParams, device: str) -> None:
    torch.manual_seed(8)
    V, steps = 67, 25  # odd: batch rows of the seeded noise start at unaligned offsets
    rows = torch.randn(steps, V) * 1.5
    alone = Sampler(V, EOS, device)
    alone.add_request(41, seeded, [])
    alone_tokens = [int(run(alone, rows[s : s + 1], [41], [s]).tokens) for s in range(steps)]

    others = [
        SamplingParams(top_k=3),
        SamplingParams(temperature=0.0),
        SamplingParams(top_p=0.5, seed=7),
        SamplingParams(min_p=0.2, repetition_penalty=1.2),
        SamplingParams(temperature=1.7),
    ]
    batch = Sampler(V, EOS, device)
    for key, p in enumerate(others):
        batch.add_request(key, p, [])
    batch.add_request(9, seeded, [])
    keys = [0, 1, 2, 9, 3, 4]  # the seeded request sits at row 3
    batch_tokens = []
    for s in range(steps):
        logits = torch.randn(6, V)
        logits[3] = rows[s]
        batch_tokens.append(int(run(batch, logits, keys, [s, s + 3, 0, s, 5, s]).tokens[3]))
    assert batch_tokens == alone_tokens
    assert len(set(alone_tokens)) > 3  # it did sample, not pick one token


def test_seed_noise_depends_on_seed_and_position(device: str) -> None:
    V = 1000
    logits = torch.zeros(2, V)
    sampler = make_sampler([SamplingParams(seed=1), SamplingParams(seed=2)], V, device=device)
    steps = [sample(sampler, logits, [n, n]).tolist() for n in range(10)]
    assert all(a != b for a, b in steps)  # seeds differ
    assert len({a for a, _ in steps}) == 10  # positions differ
    again = make_sampler([SamplingParams(seed=1)], V, device=device)
    alone = [int(sample(again, logits[:1], [n])) for n in range(10)]
    assert alone == [a for a, _ in steps]


# -- logprobs and padding ------------------------------------------------------------------------------


def test_logprobs_are_of_raw_logits(device: str) -> None:
    torch.manual_seed(9)
    V, B = 50, 6
    raw = torch.randn(B, V) * 2
    params = [
        SamplingParams(logprobs=3, repetition_penalty=1.5, logit_bias={2: 5.0}),
        SamplingParams(logprobs=0, temperature=0.0),
        SamplingParams(),  # asks nothing: still gets values, the host ignores them
        SamplingParams(logprobs=5, top_k=4, temperature=0.3, frequency_penalty=1.0),
        SamplingParams(logprobs=1, min_new_tokens=2),
        SamplingParams(logprobs=2, seed=3),
    ]
    sampler = make_sampler(params, V, [[1, 2, 3]] * B, device=device)
    for step in range(3):
        out = run(sampler, raw, output_lens=[step] * B)
        reference = torch.log_softmax(raw, dim=-1)
        assert out.logprobs is not None and out.top_ids is not None and out.top_logprobs is not None
        torch.testing.assert_close(out.logprobs, reference.gather(1, out.tokens[:, None]).squeeze(1))
        assert out.top_ids.shape == (B, 5) and out.top_ids.dtype == torch.int64
        torch.testing.assert_close(out.top_logprobs, reference.topk(5, -1).values)
        assert torch.equal(out.top_ids, reference.topk(5, -1).indices)


def test_logprobs_with_zero_alternatives(device: str) -> None:
    out = run(make_sampler([SamplingParams(logprobs=0)] * 2, 10, device=device), torch.randn(2, 10))
    assert out.top_ids is not None and out.top_ids.shape == (2, 0)


def test_padded_vocab_columns_are_never_sampled(device: str) -> None:
    torch.manual_seed(10)
    V, padded, N = 40, 64, 300
    logits = torch.randn(N, padded)
    logits[:, V:] = 1e4
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(),
        SamplingParams(top_p=0.9),
        SamplingParams(min_p=0.1, seed=5),
        SamplingParams(logprobs=2),
    ]
    out = run(make_sampler(params * (N // 5), V, device=device), logits)
    assert (out.tokens < V).all()
    assert out.top_ids is not None and (out.top_ids < V).all()
    torch.testing.assert_close(out.tokens[::5], logits[::5, :V].argmax(-1))
    assert out.logprobs is not None
    reference = torch.log_softmax(logits[:, :V], -1)
    torch.testing.assert_close(out.logprobs, reference.gather(1, out.tokens[:, None]).squeeze(1))


def test_token_logprobs() -> None:
    torch.manual_seed(11)
    logits = torch.randn(7, 36)
    ids = torch.randint(0, 30, (7,))
    chosen, top_ids, top_lp = token_logprobs(logits, ids, 4, vocab_size=30)
    reference = torch.log_softmax(logits[:, :30], -1)
    torch.testing.assert_close(chosen, reference[torch.arange(7), ids])
    assert torch.equal(top_ids, reference.topk(4, -1).indices)
    torch.testing.assert_close(top_lp, reference.topk(4, -1).values)


def test_plan_follows_request_changes() -> None:
    V = 8
    sampler = Sampler(V, EOS, "cpu")
    sampler.add_request(0, SamplingParams(temperature=0.0), [])
    logits = torch.arange(V, dtype=torch.float32).expand(1, V)
    assert int(sampler.sample(logits.clone(), [0], [0]).tokens) == V - 1
    sampler.remove_request(0)
    sampler.add_request(0, SamplingParams(temperature=0.0, logit_bias={2: 100.0}), [])
    assert int(sampler.sample(logits.clone(), [0], [0]).tokens) == 2


def test_empty_batch() -> None:
    out = Sampler(8, EOS, "cpu").sample(torch.empty(0, 8), [], [])
    assert out.tokens.shape == (0,)


@CUDA
def test_sample_is_sync_free_on_cuda() -> None:
    V, padded = 1000, 1024
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(top_k=20, top_p=0.8, seed=3),
        SamplingParams(min_p=0.1, repetition_penalty=1.2, frequency_penalty=0.5, presence_penalty=0.5),
        SamplingParams(logit_bias={5: -math.inf, 6: 3.0}, min_new_tokens=4, stop_token_ids=[7], logprobs=3),
        SamplingParams(temperature=0.7, seed=11),
    ]
    sampler = make_sampler(params, V, [[1, 2, 3]] * len(params), device="cuda")
    logits = torch.randn(len(params), padded, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host-device sync raises
    try:
        for step in range(3):
            out = sampler.sample(logits.clone(), range(len(params)), [step] * len(params))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert out.logprobs is not None and (out.tokens < V).all()
