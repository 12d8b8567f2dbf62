"""RMSNorm completing a row-parallel layer under tensor parallelism (reduce_tp): the fused all-reduce kernel
when the group has one and the rows fit it, else the group's all-reduce followed by the add and the norm; no
reduction without a residual (layer 0's input norm gets the whole embedding)."""

from __future__ import annotations

import pytest
import torch

from radixserve.ops.linear import RowParallelLinear
from radixserve.ops.norm import RMSNorm
from radixserve.ops.parallel import TPGroup

HIDDEN = 16


class FakeFused:
    """Stands in for ops/allreduce_norm.FusedAllReduceRMSNorm: takes up to `max_tokens` rows."""

    def __init__(self, max_tokens: int) -> None:
        self.max_tokens = max_tokens
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]] = []

    def fits(self, x: torch.Tensor, residual: torch.Tensor) -> bool:
        return x.shape[0] <= self.max_tokens

    def __call__(self, x, residual, weight, eps):  # type: ignore[no-untyped-def]
        self.calls.append((x, residual, weight, eps))
        return x + 1, residual + 1


def _reference(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    s = (x + residual).double()
    return (weight.double() * s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + eps)).float()


@pytest.fixture
def doubling_all_reduce(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """TPGroup.all_reduce as two ranks holding the same partial sum: x * 2. Returns the call log."""
    calls: list[int] = []

    def all_reduce(self: TPGroup, x: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape[0])
        return x * 2

    monkeypatch.setattr(TPGroup, "all_reduce", all_reduce)
    return calls


def test_fused_kernel_takes_the_rows_that_fit(doubling_all_reduce: list[int]) -> None:
    fused = FakeFused(max_tokens=4)
    norm = RMSNorm(HIDDEN, 1e-6, torch.float32, reduce_tp=TPGroup(0, 2, fused_norm=fused))  # type: ignore[arg-type]
    x, residual = torch.randn(3, HIDDEN), torch.randn(3, HIDDEN)
    out, res = norm(x, residual)
    assert len(fused.calls) == 1 and fused.calls[0][0] is x and fused.calls[0][2] is norm.weight
    assert torch.equal(out, x + 1) and torch.equal(res, residual + 1)
    assert doubling_all_reduce == []


def test_rows_past_the_fused_kernel_are_reduced_then_normed(doubling_all_reduce: list[int]) -> None:
    fused = FakeFused(max_tokens=4)
    norm = RMSNorm(HIDDEN, 1e-6, torch.float32, reduce_tp=TPGroup(0, 2, fused_norm=fused))  # type: ignore[arg-type]
    norm.weight.data = torch.rand(HIDDEN) + 0.5
    x, residual = torch.randn(9, HIDDEN), torch.randn(9, HIDDEN)
    out, res = norm(x, residual)
    assert fused.calls == [] and doubling_all_reduce == [9]
    torch.testing.assert_close(res, 2 * x + residual)
    torch.testing.assert_close(out, _reference(2 * x, residual, norm.weight, 1e-6), atol=1e-5, rtol=1e-5)
    # without a fused kernel: the same
    plain = RMSNorm(HIDDEN, 1e-6, torch.float32, reduce_tp=TPGroup(0, 2))
    plain.weight.data = norm.weight.data.clone()
    out2, _ = plain(x, residual)
    torch.testing.assert_close(out2, out)


def test_no_reduction_without_a_residual_or_a_group(doubling_all_reduce: list[int]) -> None:
    fused = FakeFused(max_tokens=4)
    norm = RMSNorm(HIDDEN, 1e-6, torch.float32, reduce_tp=TPGroup(0, 2, fused_norm=fused))  # type: ignore[arg-type]
    x = torch.randn(2, HIDDEN)
    torch.testing.assert_close(norm(x), _reference(x, torch.zeros_like(x), norm.weight, 1e-6))
    assert RMSNorm(HIDDEN, 1e-6, torch.float32, reduce_tp=TPGroup()).reduce_tp is None  # size 1: no sum
    assert fused.calls == [] and doubling_all_reduce == []


def test_row_parallel_linear_may_leave_its_sum_to_the_consumer(doubling_all_reduce: list[int]) -> None:
    tp = TPGroup(0, 2)
    summed = RowParallelLinear(8, HIDDEN, False, tp, torch.float32)
    partial = RowParallelLinear(8, HIDDEN, False, tp, torch.float32, reduce_results=False)
    partial.weight.data = summed.weight.data = torch.randn(HIDDEN, 4)
    x = torch.randn(3, 4)
    torch.testing.assert_close(summed(x), 2 * partial(x))
    assert doubling_all_reduce == [3]
