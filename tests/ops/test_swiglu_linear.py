"""MergedColumnParallelLinear.swiglu: silu(gate) * up of an MLP's gate/up projection (on the CPU the
projection and the activation; on the GPU optionally one Triton kernel, tests/ops/test_triton_gemv.py)."""

from __future__ import annotations

import pytest
import torch

from radixserve.ops.linear import MergedColumnParallelLinear
from radixserve.ops.parallel import TPGroup


def test_swiglu_is_silu_of_gate_times_up() -> None:
    torch.manual_seed(0)
    layer = MergedColumnParallelLinear(16, [24, 24], False, TPGroup(), torch.float32)
    layer.weight.data = torch.randn(48, 16)
    x = torch.randn(5, 16)
    gate, up = x @ layer.weight[:24].T, x @ layer.weight[24:].T
    torch.testing.assert_close(layer.swiglu(x), torch.nn.functional.silu(gate) * up)


def test_swiglu_needs_two_equal_halves_without_bias() -> None:
    for sizes, bias in (([24, 16], False), ([24, 24, 24], False), ([24, 24], True)):
        layer = MergedColumnParallelLinear(16, sizes, bias, TPGroup(), torch.float32)
        with pytest.raises(ValueError, match="two equal halves"):
            layer.swiglu(torch.zeros(1, 16))
