"""Argument checks shared by every stage: each raises a ValueError that names the argument, what it must be, and
what was given, so a wrong call is fixed from the message alone."""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch


def check_int(value: Any, name: str, minimum: int | None = None, maximum: int | None = None, hint: str = "") -> int:
    """`value` as an int, refusing bools, floats and values outside [minimum, maximum]."""
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if ok and minimum is not None and value < minimum:
        ok = False
    if ok and maximum is not None and value > maximum:
        ok = False
    if not ok:
        bounds = (f" in [{minimum}, {maximum}]" if minimum is not None and maximum is not None
                  else f" >= {minimum}" if minimum is not None else f" <= {maximum}" if maximum is not None else "")
        raise ValueError(f"{name} must be an int{bounds}{hint}, got {value!r}")
    return int(value)


def check_number(value: Any, name: str, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False, hint: str = "") -> float:
    """`value` as a finite float in the interval given (open or closed at each end); bools and NaN refused."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        parts = []
        if low is not None:
            parts.append(f"{'>' if low_open else '>='} {low:g}")
        if high is not None:
            parts.append(f"{'<' if high_open else '<='} {high:g}")
        bounds = (" " + " and ".join(parts)) if parts else ""
        raise ValueError(f"{name} must be a finite number{bounds}{hint}, got {value!r}")
    return float(value)


def check_positive(value: Any, name: str, hint: str = "") -> float:
    """A finite number > 0 (scales, rates, widths)."""
    return check_number(value, name, low=0, low_open=True, hint=hint)


def check_coef(value: Any, name: str, hint: str = "") -> float:
    """A finite number >= 0 (loss coefficients: 0 switches a term off)."""
    return check_number(value, name, low=0, hint=hint)


def check_seed(value: Any, name: str = "seed") -> int:
    """An int seed in numpy's and torch's accepted range [0, 2**63)."""
    return check_int(value, name, 0, 2**63 - 1, " (a seed)")


def check_choice(value: Any, name: str, choices: tuple) -> Any:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def check_tensor(x: Any, name: str, ndim: int | tuple[int, ...], *, floating: bool = True,
                 finite: bool = False, shape_hint: str = "") -> torch.Tensor:
    """A tensor with `ndim` dimensions (one of several if a tuple), floating point if asked, finite if asked."""
    dims = (ndim,) if isinstance(ndim, int) else ndim
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor{' ' + shape_hint if shape_hint else ''}, got "
                         f"{type(x).__name__}; wrap it with torch.as_tensor(...)")
    if x.ndim not in dims:
        raise ValueError(f"{name} must have {' or '.join(map(str, dims))} dimensions"
                         f"{' ' + shape_hint if shape_hint else ''}, got shape {tuple(x.shape)}")
    if floating and not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}; convert it with .float()")
    if finite and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains {int(torch.isnan(x).sum())} NaN and {int(torch.isinf(x).sum())} inf "
                         f"values; clean it (or drop those rows) first")
    return x


FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def check_dtype(value: Any, name: str, allowed: tuple = FLOAT_DTYPES) -> torch.dtype:
    """A torch.dtype among `allowed` (a string such as "float32" is refused: pass torch.float32)."""
    if not isinstance(value, torch.dtype) or value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(str, allowed))}, got {value!r}")
    return value


def check_bool(value: Any, name: str) -> bool:
    """A bool (0/1, strings and None are refused: "False" would read as true)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def check_device(value: Any, name: str = "device") -> torch.device | None:
    """None or a device torch knows ("cpu", "cuda", "cuda:1", a torch.device)."""
    if value is None or isinstance(value, torch.device):
        return value
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a device name such as 'cpu' or 'cuda', got {type(value).__name__}")
    try:
        return torch.device(value)
    except RuntimeError:
        raise ValueError(f"{name} must be a device name such as 'cpu', 'cuda' or 'cuda:0', got {value!r}") from None
