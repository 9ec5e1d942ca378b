"""Every public entry point refuses an argument that does not fit, before it does any work, with an error that names
the function, the argument, what it must be, what was given and how to fix it: `@checked` on each function and
class that a stage exports (tests/test_api.py enumerates them and tries bad values on every parameter).

What an argument must be comes from two places:
- its annotation: int (not a bool, not a float), float (finite), bool, str, paths (str or os.PathLike; never an
  object), torch.Tensor (never a path or a list), unions, Literal, sequences and mappings (a lone str is not a
  sequence of str), callables and classes (a path is not an object: the message names the function that opens it);
- its name, for what a type cannot say (ranges, a tensor's dtype, emptiness): one name means one thing across the
  package (the README's glossary), so the rule is written once, in `RULES` and the tensor name sets below.

Errors are `ArgumentError`, both a ValueError and a TypeError, so code catching either sees it."""

from __future__ import annotations

import collections.abc as abc
import functools
import inspect
import math
import numbers
import os
import types
import typing
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .checks import FLOAT_DTYPES


class ArgumentError(ValueError, TypeError):
    """A public function was given an argument it cannot use; the message names the argument and the fix."""


# Name -> (low, high, low_open, high_open) for numbers: one meaning per name (README glossary).
_COUNT = (1, None, False, False)  # a count or size: an int >= 1
_INDEX = (0, None, False, False)  # an index, seed, step or id: >= 0
_POSITIVE = (0, None, True, False)
_UNIT = (0, 1, False, False)
RULES: dict[str, tuple] = {
    **dict.fromkeys(("active", "batch", "batch_size", "bins", "candidates", "chunk_rows", "chunk_size", "ctx_len", "d",
                     "d_in", "d_sae", "d_mlp", "d_model", "dpi", "eval_contexts", "eval_every", "length", "log_every",
                     "max_bytes", "max_contexts", "max_docs", "max_rounds", "max_tokens", "max_traces",
                     "max_train_bytes", "n", "n_batches", "n_eval_tokens", "n_examples", "n_features", "n_heads",
                     "n_layers", "n_ref", "n_rows", "n_samples", "n_threads", "n_tokens", "rows_per_read", "smooth",
                     "state_every", "steps", "val_bytes", "vocab_size", "dense_limit", "resample_every",
                     "dead_window", "corr_rank", "last", "last_step", "top_k", "n_components"), _COUNT),
    **dict.fromkeys(("seed", "member", "i", "layer", "step", "epoch", "warmup_steps", "coef_warmup_steps", "eos_id", "latent",
                     "expect_bytes", "expect_rows"), _INDEX),
    **dict.fromkeys(("lr", "ratio", "input_scale", "norm_ratio", "grad_clip", "k", "l0_budget"), _POSITIVE),
    **dict.fromkeys(("seconds", "weight_decay", "noise", "eps", "tol"), (0, None, False, False)),
    **dict.fromkeys(("resample_until", "min_lr_frac", "rotary_pct", "high", "low", "settle", "dense_threshold"), _UNIT),
    "decay_frac": (0, 1, True, False),
    "val_fraction": (0, 1, True, True),
}
# Tensors by name: token ids (integers), masks (bool), values (floating point). Any tensor argument must be non-empty.
TOKEN_TENSORS = {"tokens", "ctxs", "stream"}
MASK_TENSORS = {"alive", "alive_a", "alive_b"}
FLOAT_TENSORS = {"A", "B", "x", "acts", "codes", "learned", "truth", "feature_freq", "sim", "mean_act", "samples"}
FLOAT_NAMES = {str(t).removeprefix("torch.") for t in FLOAT_DTYPES}
# Parameters that take an object from another library (or a stand-in) by name: a name, path or number is refused.
OBJECT_NAMES = {"tokenizer": "a tokenizer object (e.g. model.tokenizer), not a name or path: load one with "
                             "transformers.AutoTokenizer.from_pretrained(name_or_dir)",
                "sae": "an SAE object, not a path or a number: open a saved one with load_sae(folder)"}
# What opens a path into the object a parameter wants (named in the error when a path is given instead).
OPENERS = {"ActivationStore": "ActivationStore(path)", "EnsembleSAE": "load_sae(folder)",
           "Module": "load_model(name_or_dir)", "HookedTransformer": "load_model(name_or_dir)",
           "Corpus": "load_corpus(folder)", "Tensor": "safetensors.torch.load_file(path)[name], or ActivationStore(path)"}
_SCAN = 10_000  # elements of a list checked one by one (the first so many; a longer list is sampled at its head)
_PATHS = (str, os.PathLike)


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_))


def _array_fits(value: np.ndarray, item: Any) -> bool:
    """Whether a numpy array's items fit `item` (judged by its dtype: floats hold numbers, ints hold ints)."""
    kinds = {float: "fiu", int: "iu", bool: "b", str: "U"}
    items = typing.get_args(item) if typing.get_origin(item) in (typing.Union, types.UnionType) else (item,)
    return any(value.dtype.kind in kinds.get(i, "") for i in items)


def fits(value: Any, hint: Any) -> bool:
    """Whether `value` fits the annotation `hint` (hints this checker does not read are taken as fitting: the
    function's own checks apply)."""
    if hint is Any or hint is object or isinstance(hint, (typing.TypeVar, str, typing.ForwardRef)):
        return True
    if hint is None or hint is type(None):
        return value is None
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(fits(value, a) for a in args)
    if origin is typing.Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if origin is typing.Annotated:
        return fits(value, args[0])
    if hint is bool:
        return isinstance(value, (bool, np.bool_))
    if hint is int:
        return _is_int(value)
    if hint is float:
        return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))
    if hint is str:
        return isinstance(value, str)
    if hint in (os.PathLike, Path):
        return isinstance(value, _PATHS)
    if hint is torch.device:
        return isinstance(value, (str, torch.device))
    if origin is abc.Callable or hint is abc.Callable:
        return callable(value)
    base = origin or hint
    if base in (list, tuple, abc.Sequence, abc.Iterable, abc.Collection, abc.MutableSequence, set, frozenset):
        if isinstance(value, np.ndarray) and value.ndim >= 1:  # an array is a list of its items (numbers)
            return not args or args[0] is Any or _array_fits(value, args[0])
        if isinstance(value, (str, bytes)) or not isinstance(value, abc.Iterable):
            return False  # a lone string is not a sequence of strings (it would be read letter by letter)
        if base in (list, tuple, abc.Sequence, abc.MutableSequence) and not isinstance(value, abc.Sequence):
            return False
        if not args or not isinstance(value, (list, tuple)):
            return True  # an iterable is not consumed to look at its items
        if base is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            return len(value) == len(args) and all(fits(v, a) for v, a in zip(value, args))
        return all(fits(v, args[0]) for v in value[:_SCAN])
    if base in (dict, abc.Mapping, abc.MutableMapping):
        if not isinstance(value, abc.Mapping):
            return False
        if len(args) == 2:
            return all(fits(k, args[0]) and fits(v, args[1]) for k, v in list(value.items())[:_SCAN])
        return True
    if isinstance(base, type):
        return isinstance(value, base)
    return True


def describe(hint: Any) -> str:
    """An annotation in words, for error messages."""
    if hint is None or hint is type(None):
        return "None"
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(dict.fromkeys(describe(a) for a in args))
    if origin is typing.Literal:
        return "one of " + ", ".join(map(repr, args))
    words = {bool: "True or False", int: "an int", float: "a finite number", str: "a str",
             os.PathLike: "a path (str or os.PathLike)", Path: "a path (str or os.PathLike)",
             torch.device: "a device ('cpu', 'cuda', a torch.device)", torch.Tensor: "a torch.Tensor"}
    if hint in words:
        return words[hint]
    base = origin or hint
    if base in (list, tuple, abc.Sequence, abc.MutableSequence):
        return f"a list of {describe(args[0]) if args else 'items'}"
    if base in (abc.Iterable, abc.Collection, set, frozenset):
        return f"an iterable of {describe(args[0]) if args else 'items'}"
    if base in (dict, abc.Mapping, abc.MutableMapping):
        return "a mapping" + (f" of {describe(args[0])} to {describe(args[1])}" if len(args) == 2 else "")
    if base is abc.Callable:
        return "a callable"
    return f"a {getattr(base, '__name__', str(base))}"


def shown(value: Any) -> str:
    """A value in an error message: short, with its type."""
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    if isinstance(value, np.ndarray):
        return f"a numpy array ({value.dtype}) of shape {value.shape}"
    text = repr(value)
    text = text if len(text) <= 80 else text[:77] + "..."
    return text if isinstance(value, (numbers.Number, str, type(None))) else f"{type(value).__name__} {text}"


def _fix(value: Any, hint: Any) -> str:
    """How to turn what was given into what is wanted, where there is one obvious way."""
    names = {getattr(a, "__name__", "") for a in (typing.get_args(hint) or (hint,))}
    if isinstance(value, str) and fits([value], hint):
        return f"; wrap a single one in a list: [{value!r}]"
    opener = next((OPENERS[n] for n in sorted(names) if n in OPENERS), None)
    if isinstance(value, os.PathLike) or (isinstance(value, str) and opener):
        return f"; a path is not {describe(hint)}" + (f": open it with {opener}" if opener else "")
    if isinstance(value, (np.ndarray, list)) and "Tensor" in names:
        return "; convert it with torch.as_tensor(...)"
    if names & {"PathLike", "Path"}:
        return "; pass the path of the file or folder, not the object"
    return ""


def _number_rule(name: str, value: Any, nan_ok: bool = False) -> str | None:
    """What is wrong with a number, by its name's rule (None when it is fine). nan_ok: NaN stands for "not
    measured" (the plots draw it as a gap); inf is still refused."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        return None
    if not _is_int(value) and not math.isfinite(float(value)):
        return None if nan_ok and math.isnan(float(value)) else "a finite number" + (" or NaN" if nan_ok else "")
    rule = RULES.get(name)
    if rule is None:
        return None
    low, high, low_open, high_open = rule
    ok = (low is None or (value > low if low_open else value >= low)) and \
         (high is None or (value < high if high_open else value <= high))
    if ok:
        return None
    parts = ([f"{'>' if low_open else '>='} {low}"] if low is not None else []) + \
            ([f"{'<' if high_open else '<='} {high}"] if high is not None else [])
    return ("an int " if _is_int(value) else "a number ") + " and ".join(parts)


def _tensor_rule(name: str, value: torch.Tensor) -> str | None:
    if value.numel() == 0:
        return "a non-empty tensor"
    if name in TOKEN_TENSORS and (value.is_floating_point() or value.dtype == torch.bool):
        return "a tensor of integer token ids (e.g. torch.long)"
    if name in MASK_TENSORS and value.dtype != torch.bool:
        return "a bool tensor (a mask)"
    if name in FLOAT_TENSORS and not value.is_floating_point():
        return "a floating-point tensor (convert with .float())"
    return None


def check_argument(where: str, name: str, value: Any, hint: Any, nan_ok: bool = False) -> None:
    """Raise ArgumentError unless `value` fits parameter `name`'s annotation `hint` and its name's rules (nan_ok:
    NaN is a valid number, as in the plots, which draw results that may not have been measured)."""
    if hint is not None and not fits(value, hint):
        raise ArgumentError(f"{where}: {name} must be {describe(hint)}, got {shown(value)}{_fix(value, hint)}")
    problem = None
    if name in OBJECT_NAMES and isinstance(value, (str, bytes, os.PathLike, numbers.Number, torch.Tensor)):
        problem = OBJECT_NAMES[name]
    elif isinstance(value, numbers.Real):
        problem = _number_rule(name, value, nan_ok)
    elif isinstance(value, torch.Tensor):
        problem = _tensor_rule(name, value)
    elif name == "dtype" and (value not in FLOAT_DTYPES if isinstance(value, torch.dtype) else
                              isinstance(value, str) and value.removeprefix("torch.") not in FLOAT_NAMES):
        problem = "a floating-point dtype (" + ", ".join(map(str, FLOAT_DTYPES)) + ", or its name)"
    elif name == "device" and isinstance(value, str):
        try:
            torch.device(value)
        except RuntimeError:
            problem = "a device name such as 'cpu', 'cuda' or 'cuda:0'"
    if problem:
        raise ArgumentError(f"{where}: {name} must be {problem}, got {shown(value)}")


def resolved_hints(obj: Callable) -> dict[str, Any]:
    """obj's annotations, resolved."""
    return typing.get_type_hints(obj)


def _wants_path(hint: Any) -> bool:
    """Whether an annotation is Path (or Path | None): the body may use Path's methods."""
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    return Path in args and str not in args and os.PathLike not in args


def checked(obj: Callable) -> Callable:
    """Decorate a public function (or class: its __init__) so that every argument given is checked against its
    annotation and its name's rules before the body runs (`check_argument`). Unknown keyword arguments are refused
    by name (Python's own binding error)."""
    if isinstance(obj, type):
        obj.__init__ = checked(obj.__init__)
        obj.__checked__ = True
        return obj
    sig = inspect.signature(obj)
    where = obj.__qualname__.replace(".__init__", "")
    nan_ok = (getattr(obj, "__module__", None) or "").startswith("sparse_coding.plots")
    hints: dict[str, Any] | None = None

    @functools.wraps(obj)
    def wrapper(*args, **kwargs):
        nonlocal hints
        if hints is None:  # resolved at first call: the annotations may name classes defined later
            hints = resolved_hints(obj)
        bound = sig.bind_partial(*args, **kwargs)
        paths = []
        for name, value in bound.arguments.items():
            if name != "self" and sig.parameters[name].kind not in (inspect.Parameter.VAR_POSITIONAL,
                                                                    inspect.Parameter.VAR_KEYWORD):
                hint = hints.get(name)
                check_argument(where, name, value, hint, nan_ok)
                if isinstance(value, (str, os.PathLike)) and not isinstance(value, Path) and _wants_path(hint):
                    paths.append(name)
        if not paths:
            return obj(*args, **kwargs)
        for name in paths:  # a Path annotation takes a str too, and the body gets a Path
            bound.arguments[name] = Path(bound.arguments[name])
        return obj(*bound.args, **bound.kwargs)

    wrapper.__checked__ = True
    return wrapper
