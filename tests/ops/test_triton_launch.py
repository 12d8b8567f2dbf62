"""When the Triton kernels are launched with programmatic dependent launch (ops/triton_launch.py)."""

from __future__ import annotations

import pytest
import torch

from radixserve.ops import triton_launch as pdl


def test_never_on_the_cpu_or_in_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not pdl.pdl_enabled(torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not pdl.pdl_enabled(torch.device("cuda", 0))  # decided before asking the device anything


def test_switched_off_through_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(pdl.DISABLE_ENV, "1")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not pdl.pdl_enabled(torch.device("cuda", 0))


def test_on_for_hopper(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(pdl.DISABLE_ENV, raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for major, expected in ((8, False), (9, True), (10, True)):
        pdl._capability_major.cache_clear()
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device, m=major: (m, 0))
        assert pdl.pdl_enabled(torch.device("cuda", 0)) is expected
    pdl._capability_major.cache_clear()
