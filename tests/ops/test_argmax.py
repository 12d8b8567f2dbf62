"""The Triton greedy argmax (ops/argmax.py) against torch.argmax, run by Triton's interpreter on the CPU
(TRITON_INTERPRET=1): the same index on every row, ties, NaNs and infinities included."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: kernels are built at import

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton", reason="triton is not installed or fails to import", exc_type=ImportError)

from radixserve.ops import argmax  # noqa: E402
from radixserve.ops.argmax import row_argmax  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs the interpreter")


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks of 64 so that short rows still take several iterations and every lane sees several values."""
    monkeypatch.setattr(argmax, "BLOCK", 64)
    monkeypatch.setattr(argmax, "NUM_WARPS", 1)


def check(x: torch.Tensor) -> None:
    assert torch.equal(row_argmax(x, interpret=True), torch.argmax(x, dim=-1))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("vocab", [1, 63, 64, 65, 1000])
def test_random_rows(dtype: torch.dtype, vocab: int) -> None:
    gen = torch.Generator().manual_seed(vocab)
    check((torch.randn(5, vocab, generator=gen) * 4).to(dtype))


def test_ties_take_the_first_index() -> None:
    """Rounded to a few values, every row has many equal maxima, in different lanes and iterations."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 3, (8, 300), generator=gen).to(torch.bfloat16)
    x[3] = 0.0
    x[4, 200] = x[4, 7] = 5.0  # two lanes (200 = 3 * 64 + 8), three iterations apart
    x[5, 71] = x[5, 7] = 5.0  # the same lane (7 and 71), the later one in the second iteration
    x[6] = -0.0
    x[6, 130] = 0.0  # -0.0 == 0.0: index 0 still wins
    check(x)


def test_nan_and_infinities() -> None:
    x = torch.randn(7, 200, generator=torch.Generator().manual_seed(1))
    x[0, 150] = float("nan")
    x[1, 20] = x[1, 100] = float("nan")  # the first NaN
    x[1, 5] = float("inf")
    x[2] = float("-inf")  # all -inf: index 0
    x[3, 99] = float("inf")
    x[3, 33] = float("inf")
    x[4] = float("-inf")
    x[4, 180] = -1e30
    x[5, :] = float("nan")
    check(x)
    check(x.to(torch.bfloat16))


def test_strided_rows_and_out() -> None:
    """A view of the first columns of padded logits (the sampler's), written into a given buffer."""
    padded = torch.randn(4, 160, generator=torch.Generator().manual_seed(2))
    x = padded[:, :130]
    out = torch.empty(4, dtype=torch.int64)
    assert row_argmax(x, out=out, interpret=True) is out
    assert torch.equal(out, torch.argmax(x, dim=-1))


def test_cpu_without_interpret_and_bad_input_take_torch_or_fail() -> None:
    x = torch.randn(3, 50)
    assert torch.equal(row_argmax(x), torch.argmax(x, dim=-1))  # no CUDA: torch's argmax
    with pytest.raises(ValueError, match=r"\[rows, vocab\]"):
        row_argmax(torch.randn(3, 4, 5))
    with pytest.raises(ValueError, match="int64"):
        row_argmax(x, out=torch.empty(3, dtype=torch.int32))
    assert row_argmax(torch.empty(0, 10), interpret=True).shape == (0,)
