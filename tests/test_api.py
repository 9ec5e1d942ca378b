"""Every public entry point refuses bad input by kind: each function and class a stage exports (its `__all__`) is
called with a bad value for one parameter at a time, and must raise a ValueError or TypeError naming that parameter
before doing any work.

The bad values are generated here from each parameter's annotation and name, independently of the checker
(`sparse_coding.arguments`): a value of every kind the annotation does not take (wrong type, a path where an object
is wanted and an object where a path is wanted, a lone string where a list is wanted, a bool where a number is
wanted), NaN and inf for every number, an empty tensor for every tensor, a wrong dtype for tensors whose name says
what they hold, and, for names with a documented range (`arguments.RULES`, the README's glossary), the values just
outside it (zero and negative sizes, negative seeds, shares above 1)."""

from __future__ import annotations

import collections.abc as abc
import importlib
import inspect
import math
import os
import types
import typing
from pathlib import Path

import pytest
import torch

from sparse_coding import arguments

STAGES = ("corpus", "lm", "activations", "dictionaries", "analyses", "plots")
# Exported types that the package returns rather than takes from a user (results and records), and exceptions.
RECORDS = {"SAEOutput", "LMSweep", "MatchResult", "MCSResult", "NullBaseline", "SweepEvaluation", "BirthDeath",
           "RevisionMatching", "SelfSimilarity", "TrainingTrack", "Loaded", "HookName", "ChunkError",
           "TrainingDiverged", "AblationEffect", "Record", "Score", "Split", "Example", "Mined"}
# Parameters whose annotation is Any on purpose (matplotlib axes, objects from other libraries' pipelines); each is
# still refused when given a path or a number by the function's own checks where it matters.
UNTYPED_OK = {"ax", "traj", "em", "examples", "hf_config"} | set(arguments.OBJECT_NAMES)


def public() -> dict[str, typing.Callable]:
    out = {}
    for stage in STAGES:
        module = importlib.import_module(f"sparse_coding.{stage}")
        for name in module.__all__:
            obj = getattr(module, name)
            if (inspect.isfunction(obj) or inspect.isclass(obj)) and name not in RECORDS:
                out[f"{stage}.{name}"] = obj
    return out


PUBLIC = public()


def parameters() -> list[tuple[str, str]]:
    out = []
    for qual, obj in PUBLIC.items():
        for p in inspect.signature(obj).parameters.values():
            if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                out.append((qual, p.name))
    return out


PARAMETERS = parameters()


def test_every_public_callable_is_checked_and_annotated():
    assert len(PUBLIC) >= 150 and len(PARAMETERS) >= 550  # the whole API, not a sample (see the module docstring)
    unchecked = [q for q, obj in PUBLIC.items() if not getattr(obj, "__checked__", False)]
    assert not unchecked, f"public callables without @checked: {unchecked}"
    untyped = []
    for qual, name in PARAMETERS:
        obj = PUBLIC[qual]
        hints = arguments.resolved_hints(obj.__init__ if inspect.isclass(obj) else obj)
        if name not in hints and name not in arguments.OBJECT_NAMES:
            untyped.append(f"{qual}({name})")
        elif hints.get(name) is typing.Any and name not in UNTYPED_OK:
            untyped.append(f"{qual}({name}: Any)")
    assert not untyped, f"parameters without a usable annotation: {untyped}"


def _atoms(hint) -> list:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return [a for arg in typing.get_args(hint) for a in _atoms(arg)]
    return [hint]


class _Obj:
    """An object of no type the package takes."""


def _candidates() -> dict[str, object]:
    return {"text": "some/file.safetensors", "path": Path("some/folder"), "int": 3, "float": 2.5, "bool": True,
            "none": None, "object": _Obj(), "tensor": torch.ones(3), "list": [1.5, 2.5], "dict": {"a": 1.0},
            "callable": lambda *a: None}


def _accepted(hint) -> set[str]:
    """Which candidate kinds an annotation takes (coarse, written apart from the checker on purpose)."""
    ok: set[str] = set()
    for a in _atoms(hint):
        origin = typing.get_origin(a) or a
        args = typing.get_args(a)
        if a is typing.Any or a is object:
            ok |= set(_candidates())
        elif a is None or a is type(None):
            ok.add("none")
        elif a is bool:
            ok.add("bool")
        elif a is int:
            ok.add("int")
        elif a is float:
            ok |= {"int", "float"}
        elif a is str:
            ok.add("text")
        elif a in (os.PathLike, Path):
            ok |= {"text", "path"}
        elif a is torch.device:
            ok.add("text")
        elif origin is typing.Literal:
            pass
        elif origin is abc.Callable:
            ok.add("callable")
        elif origin in (abc.Iterable, abc.Collection):
            ok |= {"tensor", "dict"} | ({"list"} if not args or float in _atoms(args[0]) or args[0] is typing.Any
                                        else set())
        elif origin in (list, tuple, abc.Sequence, abc.MutableSequence):
            el = args[0] if args else typing.Any
            if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
                el = None  # fixed-length tuples: [1.5, 2.5] fits only a pair of floats
                if len(args) == 2 and all(float in _atoms(x) for x in args):
                    ok.add("list")
            elif el is typing.Any or float in _atoms(el):
                ok.add("list")
        elif origin in (dict, abc.Mapping, abc.MutableMapping):
            if not args or (str in _atoms(args[0]) or args[0] is typing.Any) and \
                    (float in _atoms(args[1]) or args[1] is typing.Any):
                ok.add("dict")
        elif isinstance(origin, type):
            for kind, value in _candidates().items():
                if isinstance(value, origin):
                    ok.add(kind)
    return ok


def bad_values(qual: str, name: str) -> list[tuple[str, object]]:
    obj = PUBLIC[qual]
    hints = arguments.resolved_hints(obj.__init__ if inspect.isclass(obj) else obj)
    hint = hints.get(name, typing.Any)
    out = []
    if name in arguments.OBJECT_NAMES and hint is typing.Any:
        return [("text", "gpt2"), ("path", Path("some/folder")), ("int", 3)]
    if hint is typing.Any:
        return out
    accepted = _accepted(hint)
    for kind, value in _candidates().items():
        if kind not in accepted:
            out.append((kind, value))
    if "text" in accepted and "path" not in accepted and any(a is str for a in _atoms(hint)):
        pass  # a name, not a path: any string type-checks (the function checks its meaning)
    if any(typing.get_origin(a) in (list, tuple, abc.Sequence) and typing.get_args(a)[:1] == (str,)
           for a in _atoms(hint)) and str not in _atoms(hint):
        out.append(("lone string", "blocks.0.hook_resid_post"))
    if "float" in accepted:
        # the plots draw results, where NaN means "not measured" (a documented valid value); inf never is
        out += ([] if qual.startswith("plots.") else [("nan", math.nan)]) + [("inf", math.inf), ("-inf", -math.inf)]
    if "tensor" in accepted and any(a is torch.Tensor for a in _atoms(hint)):
        out.append(("empty tensor", torch.empty(0)))
        if name in arguments.TOKEN_TENSORS:
            out.append(("float token ids", torch.rand(4)))
        if name in arguments.FLOAT_TENSORS:
            out.append(("integer values", torch.arange(4)))
        if name in arguments.MASK_TENSORS:
            out.append(("float mask", torch.rand(4)))
    rule = arguments.RULES.get(name)
    if rule is not None and accepted & {"int", "float"}:
        low, high, low_open, high_open = rule
        if low is not None:
            out.append(("below range", low if low_open else low - 1))
            out.append(("negative", -5))
        if high is not None:
            out.append(("above range", high if high_open else high + 0.5 if "float" in accepted else high + 1))
    if name == "dtype":
        out.append(("integer dtype", torch.int64))
    if name == "device":
        out.append(("unknown device", "gpu0"))
    return out


CASES = [(qual, name, label, value) for qual, name in PARAMETERS for label, value in bad_values(qual, name)]


def test_the_generated_cases_cover_the_api():
    covered = {(q, n) for q, n, _, _ in CASES}
    assert len(CASES) >= 3000 and len(covered) >= 0.97 * len(PARAMETERS), (len(CASES), len(covered))


@pytest.mark.parametrize("qual,name,label,value", CASES,
                         ids=[f"{q}({n}={lab})" for q, n, lab, _ in CASES])
def test_bad_value_is_refused_naming_the_parameter(qual, name, label, value, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing a wrong call might write lands in the repository
    with pytest.raises((TypeError, ValueError)) as err:
        PUBLIC[qual](**{name: value})
    message = str(err.value)
    assert name in message and "missing" not in message, message


def test_errors_say_how_to_fix_the_common_mistakes():
    from sparse_coding.dictionaries import make_sae, train_sae
    sae = make_sae("relu", 4, 8)
    with pytest.raises(ValueError, match=r"batches.*a path is not.*ActivationStore\(path\)"):
        train_sae(sae, "activations.safetensors", steps=5)
    from sparse_coding.lm import check_hooks
    with pytest.raises(ValueError, match=r"model.*a path is not.*load_model"):
        check_hooks("EleutherAI/pythia-70m", ["blocks.0.hook_resid_post"])
    from sparse_coding.analyses import mcs
    with pytest.raises(TypeError, match=r"A must be a torch.Tensor.*torch.as_tensor"):
        mcs([[1.0, 0.0]], torch.eye(2))
    from sparse_coding.activations import harvest
    with pytest.raises(ValueError, match=r"hooks.*wrap a single one in a list"):
        harvest(torch.nn.Linear(2, 2), torch.zeros(2, 4, dtype=torch.long), "blocks.0.hook_resid_post", 8, "out",
                "m")
    # ArgumentError is both kinds, so code written against either keeps working
    assert issubclass(arguments.ArgumentError, TypeError) and issubclass(arguments.ArgumentError, ValueError)


def test_valid_edge_values_are_taken(tmp_path):
    """Positive controls: what the checks must let through (a wrongful refusal broke notebook 07 on GGUF models,
    whose missing step0 control is NaN)."""
    import matplotlib

    matplotlib.use("Agg")
    import numpy as np

    from sparse_coding import dictionaries, lm, plots
    from sparse_coding.analyses import hungarian_match
    iv = {"mean": 0.5, "low": 0.4, "high": 0.6}
    nan_iv = {"mean": math.nan, "low": math.nan, "high": math.nan}  # a method with no scored direction
    fig = plots.plot_controls({"sae": iv, "pca": nan_iv}, {"sae": 0.0, "pca": math.nan}, {"trained": iv}, "2")  # GGUF
    fig = plots.plot_score_vs_mcs(np.array([0.1, 0.2]), np.array([0.5, 0.6]), math.nan, "no reference")
    assert fig is not None
    with pytest.raises(ValueError, match="step0"):
        plots.plot_controls({"sae": iv}, {"sae": 0.0}, {"step0": {**iv, "mean": math.inf}}, "2")
    assert dictionaries.state_dir("runs/topk-r2-s0") == Path("runs/topk-r2-s0.training")  # a str for a Path
    assert lm.hook_name("resid_post", np.int64(2)) == "blocks.2.hook_resid_post"  # numpy ints are ints
    a = torch.eye(3)
    assert hungarian_match(a, a, tol=0).cos.min() == pytest.approx(1.0)  # exact matching: tol 0 is valid
    assert dictionaries.make_sae("topk", np.int64(4), np.int64(8), k=np.int64(2)).d_sae == 8
    from sparse_coding.analyses import bootstrap_ci
    assert bootstrap_ci(np.linspace(0, 1, 21), n_boot=50)[0] == pytest.approx(0.5)  # an array is a list of floats
    with pytest.raises(TypeError, match="scores must be a list of a finite number"):
        bootstrap_ci(np.array(["a", "b"]), n_boot=50)
