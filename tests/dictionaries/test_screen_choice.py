"""The screen is chosen from the measured rate of a bfloat16 matmul against float32 (`bf16_matmul_speedup`), not
from the CPU's flags (issue #25): with a speedup of at least 1.3 where the shape allows it, `SCREEN` overriding."""

import builtins
import inspect

import pytest
import torch

from sparse_coding.dictionaries import screening
from sparse_coding.dictionaries.screening import bf16_matmul_speedup, screens

WIDE = torch.zeros(1, 4, 512)  # d_in 512 with n 16384, k 32: a shape the size rule admits
N, K = 1 << 14, 32


@pytest.fixture
def timed(monkeypatch):
    """Sets what the timing returns (counting the calls); the cached speedup is cleared before and after."""
    calls = []

    def set_speedup(value: float) -> list:
        bf16_matmul_speedup.cache_clear()
        monkeypatch.setattr(screening, "_time_bf16_speedup", lambda: calls.append(value) or value)
        return calls

    monkeypatch.setattr(screening, "SCREEN", None)
    yield set_speedup
    bf16_matmul_speedup.cache_clear()


@pytest.mark.parametrize("speedup, chosen", [(3.0, True), (1.0, False), (0.0, False), (0.5, False),
                                             (1.29, False), (1.3, True), (1.9, True)])
def test_choice_follows_the_measured_speedup(timed, speedup, chosen):
    timed(speedup)
    assert bf16_matmul_speedup() == speedup
    assert screens(WIDE, N, K) is chosen


def test_size_rule_still_applies(timed):
    timed(3.0)
    assert screens(WIDE, N, K)
    assert not screens(WIDE, 1 << 12, K)  # n under 256·k
    assert not screens(WIDE[..., :128], N, K)  # d_in under 256


@pytest.mark.parametrize("speedup", [3.0, 0.0])
def test_screen_overrides_both_ways(timed, monkeypatch, speedup):
    calls = timed(speedup)
    monkeypatch.setattr(screening, "SCREEN", True)
    assert screens(WIDE, N, K) and screens(WIDE, 64, 32)  # forced on, whatever the shape or the speedup
    monkeypatch.setattr(screening, "SCREEN", False)
    assert not screens(WIDE, N, K)
    assert not calls  # forcing needs no timing


@pytest.mark.parametrize("forced", [None, True])
def test_only_float32_on_the_cpu(timed, monkeypatch, forced):
    timed(3.0)
    monkeypatch.setattr(screening, "SCREEN", forced)
    for dtype in (torch.float64, torch.bfloat16, torch.float16):
        assert not screens(WIDE.to(dtype), N, K)
    meta = torch.zeros(1, 4, 512, device="meta")  # another device, no accelerator needed
    assert not screens(meta, N, K)
    if torch.cuda.is_available():
        assert not screens(WIDE.cuda(), N, K)


def test_timed_once(timed):
    calls = timed(2.5)
    for _ in range(3):
        assert screens(WIDE, N, K)
        assert bf16_matmul_speedup() == 2.5
    assert calls == [2.5]


def test_raising_bf16_matmul_means_no_screen(monkeypatch):
    """Where this build cannot multiply bfloat16 matrices the speedup is 0 and the screen is never chosen."""
    real_mm = torch.mm

    def mm(a, b, *args, **kwargs):
        if a.dtype == torch.bfloat16:
            raise RuntimeError('"addmm_impl_cpu_" not implemented for \'BFloat16\'')
        return real_mm(a, b, *args, **kwargs)

    monkeypatch.setattr(torch, "mm", mm)
    monkeypatch.setattr(screening, "SCREEN", None)
    bf16_matmul_speedup.cache_clear()
    try:
        assert bf16_matmul_speedup() == 0.0
        assert not screens(WIDE, N, K)
    finally:
        bf16_matmul_speedup.cache_clear()


def test_measured_without_reading_cpu_flags(monkeypatch):
    """The real timing runs with files closed to it (no /proc/cpuinfo), and gives a finite rate ratio."""
    assert "cpuinfo" not in inspect.getsource(screening)

    def no_files(*args, **kwargs):
        raise AssertionError(f"the screen's choice opened a file: {args}")

    bf16_matmul_speedup.cache_clear()
    monkeypatch.setattr(builtins, "open", no_files)
    try:
        speedup = bf16_matmul_speedup()
    finally:
        monkeypatch.undo()
        bf16_matmul_speedup.cache_clear()
    assert isinstance(speedup, float) and 0 <= speedup < float("inf")
