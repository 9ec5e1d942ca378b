"""The package's shape: stages along the data flow, each importing only earlier stages and the shared utilities;
nothing imports the notebook glue; no import circle; small files. Walks every module's imports with `ast`."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "helpers" / "sparse_coding"
# The package root ("") re-exports nothing today, but is given the top stage: a module that imports it could reach
# any stage through it, so only the notebook glue may.
STAGES = {"files": 0, "paths": 0, "checks": 0, "arguments": 0, "threads": 0, "corpus": 1, "lm": 2, "activations": 3, "dictionaries": 4,
          "analyses": 5, "plots": 6, "studies": 7, "runner": 7, "": 8}
MAX_LINES = 350


def _modules() -> dict[str, Path]:
    out = {}
    for f in sorted(PKG.rglob("*.py")):
        parts = list(f.relative_to(PKG).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(["sparse_coding", *parts])] = f
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Package modules that `name` imports (a `from X import y` counts X.y when that is a module, else X)."""
    is_pkg = path.name == "__init__.py"
    here = name.split(".") if is_pkg else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = here[:len(here) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else [])) if node.level else node.module
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in modules else mod for a in node.names]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            # importlib.import_module("sparse_coding.x") / __import__("sparse_coding.x"): imports all the same.
            f = node.func
            fname = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
            if fname in ("import_module", "__import__"):
                target = node.args[0].value
                if target.startswith("."):  # relative to the package given as the second argument
                    level = len(target) - len(target.lstrip("."))
                    target = ".".join(here[:len(here) - level + 1] + [target.lstrip(".")])
                targets = [target]
        found |= {t for t in targets if t in modules and t != name}
    return found


MODULES = _modules()
GRAPH = {m: _imports(m, f, MODULES) for m, f in MODULES.items()}


def _stage(module: str) -> str:
    """The stage a module belongs to: its top-level name under the package, "" for the package root."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_every_top_level_name_has_a_stage():
    tops = {_stage(m) for m in MODULES}
    assert tops <= set(STAGES), f"modules outside the stage map: {sorted(tops - set(STAGES))}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_a_stage_imports_only_earlier_stages(module):
    stage = _stage(module)
    for target in GRAPH[module]:
        other = _stage(target)
        if other == stage:
            continue
        assert other != "studies", f"{module} imports the notebook glue {target}"
        assert STAGES[other] <= STAGES[stage], f"{module} ({stage}) imports the later stage {target} ({other})"


def test_no_import_circle():
    index, low, stack, on, circles, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                circles.append(sorted(comp))

    sys.setrecursionlimit(max(10000, sys.getrecursionlimit()))
    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    assert not circles, f"import circles: {circles}"


def test_files_stay_small_and_shadow_nothing():
    big = {str(f.relative_to(PKG)): n for f in MODULES.values() if (n := len(f.read_text().splitlines())) > MAX_LINES}
    assert not big, f"files over {MAX_LINES} lines: {big}"
    shadow = [m for m in MODULES if m.count(".") == 1 and m.split(".")[1] in sys.stdlib_module_names]
    assert not shadow, f"top-level modules named like the standard library: {shadow}"


# Tests and benchmarks hold fixtures and printed tables, so their cap is a little higher; past it, split by concept.
MAX_LINES_TESTS = 400


def test_tests_and_benchmarks_stay_small_too():
    root = PKG.parents[1]
    files = [*root.joinpath("tests").rglob("*.py"), *root.joinpath("benchmarks").rglob("*.py")]
    big = {str(f.relative_to(root)): n for f in files if (n := len(f.read_text().splitlines())) > MAX_LINES_TESTS}
    assert not big, f"files over {MAX_LINES_TESTS} lines: {big}"


def test_the_walker_sees_dynamic_imports_and_the_root(tmp_path):
    """importlib.import_module / __import__ with a literal name, and `import sparse_coding`, are edges too."""
    fake = tmp_path / "mod.py"
    fake.write_text("import importlib\nimport sparse_coding\nm = importlib.import_module('sparse_coding.plots')\n"
                    "n = __import__('sparse_coding.studies')\n")
    found = _imports("sparse_coding.lm.fake", fake, MODULES)
    assert {"sparse_coding.plots", "sparse_coding.studies", "sparse_coding"} <= found
    assert STAGES[_stage("sparse_coding")] > STAGES["plots"]  # importing the root from a stage is a violation


def test_the_graph_sees_real_edges():
    """The walker itself works: known edges are found (a broken resolver would make the tests above vacuous)."""
    assert "sparse_coding.dictionaries.base" in GRAPH["sparse_coding.dictionaries.kinds.topk"]
    assert "sparse_coding.activations.store" in GRAPH["sparse_coding.dictionaries.training.sources"]
    assert "sparse_coding.lm" in GRAPH["sparse_coding.activations.harvester"]
