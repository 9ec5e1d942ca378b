"""Documents: the text a model is trained and validated on, split by document.

Sources:

- ``"stdlib"`` (the offline default): the running interpreter's own standard-library ``*.py`` source, sorted so every
  machine with the same Python sees the same text. Test packages (``test/``, ``tests/``, ``idle_test/``) never enter
  training. Validation is, by default, 5 % of the library's modules held out by a hash of their path (same
  distribution as training); ``stdlib_val="tests"`` validates on the test packages instead — a different
  distribution (fixtures, odd encodings, long literal blobs).
- a folder of text files (``*.txt *.md *.rst *.py``), split by a hash of each file's relative path.
- a Hugging Face dataset name such as ``NeelNanda/pile-10k`` (needs the ``datasets`` package).
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

from ..arguments import checked
from ..paths import resolve


TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py")
_TEST_DIRS = {"test", "tests", "idle_test"}


@checked
@dataclass
class Corpus:
    """Documents split by document. ``name`` identifies the source in manifests (e.g. ``stdlib-3.11``)."""

    name: str
    train: list[str]
    val: list[str]
    train_ids: list[str] = field(default_factory=list)  # file paths or row numbers, for provenance
    val_ids: list[str] = field(default_factory=list)
    # Files that were not valid UTF-8: {path: characters replaced with U+FFFD} (load_corpus's errors="replace").
    replaced: dict[str, int] = field(default_factory=dict)

    def __repr__(self) -> str:
        mb = lambda docs: sum(len(d) for d in docs) / 1e6  # noqa: E731
        return (f"Corpus({self.name!r}: {len(self.train)} train docs / {mb(self.train):.1f} MB chars, "
                f"{len(self.val)} val docs / {mb(self.val):.1f} MB chars)")


@checked
def hub_offline() -> bool:
    """huggingface_hub's own reading of HF_HUB_OFFLINE (and its aliases): whether it will refuse to download. Read
    from its constants, never re-parsed here, so every spelling means what it means to the hub client."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _read_file(path: Path, errors: str = "replace", replaced: dict[str, int] | None = None) -> str:
    """The file decoded as UTF-8. Bytes that are not UTF-8 (a few stdlib test files are mis-encoded on purpose) are
    replaced with U+FFFD and counted in `replaced` under errors="replace"; errors="strict" raises ValueError naming
    the file and the first bad byte."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        if errors == "strict":
            raise ValueError(f"{path} is not valid UTF-8 (byte {e.start}: {data[e.start:e.start + 1]!r}); convert it "
                             f"to UTF-8 (e.g. iconv -f latin1 -t utf-8) or pass errors='replace' to load it with "
                             f"the bad bytes replaced and counted") from None
        text = data.decode("utf-8", errors="replace")
        if replaced is not None:
            replaced[str(path)] = text.count("\ufffd")
        return text


@checked
def stdlib_files(stdlib_dir: str | os.PathLike | None = None) -> tuple[list[Path], list[Path]]:
    """(non-test files, test files) of the standard library's ``*.py`` source, each sorted. site-packages (third
    party code, different per machine) is excluded."""
    root = Path(stdlib_dir or sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise FileNotFoundError(f"standard library source not found at {root}; pass stdlib_dir= or use a folder source")
    train, test = [], []
    for p in sorted(root.rglob("*.py")):
        parts = p.relative_to(root).parts
        if "site-packages" in parts or "dist-packages" in parts or "__pycache__" in parts:
            continue
        (test if _TEST_DIRS.intersection(parts[:-1]) else train).append(p)
    if not train:
        raise FileNotFoundError(f"no *.py files under {root}")
    return train, test


def _hash_fraction(key: str) -> float:
    """A stable number in [0, 1) for a document key: the split does not depend on file order or Python's hash seed."""
    return int.from_bytes(hashlib.sha1(key.encode()).digest()[:8], "big") / 2**64


@checked
def load_corpus(source: str | os.PathLike = "stdlib", *, stdlib_val: str = "split", val_bytes: int = 1_000_000,
                val_fraction: float = 0.05,
                max_train_bytes: int | None = None, hf_split: str = "train", text_field: str = "text",
                max_docs: int | None = None, errors: str = "replace") -> Corpus:
    """Load documents from ``source`` and split them by document.

    Args:
        source: ``"stdlib"``, a folder of text files, or a HF dataset name (``"NeelNanda/pile-10k"``).
        stdlib_val: ``"split"`` (default): validate on held-out library modules (``val_fraction`` of them, by a
            hash of the path), the test packages left out entirely; ``"tests"``: validate on the test packages.
        val_bytes: ``stdlib_val="tests"`` only: characters of test-package source to validate on (evenly spaced).
        val_fraction: share of documents (by a hash of their path / id) held out for validation.
        max_train_bytes: keep only the first documents up to this many characters (smoke runs).
        hf_split, text_field: which split / column of a HF dataset holds the text.
        max_docs: HF only: read at most this many rows.
        errors: for files that are not valid UTF-8: "replace" (default) replaces the bad bytes with U+FFFD, counts
            them in the corpus's ``replaced`` and, for a folder, warns naming the files; "strict" raises ValueError
            naming the first such file.

    A relative folder is looked up from the working directory, then from the repo root (as every path of this
    package is). Raises FileNotFoundError for a source that can only be a path (absolute, ``./``/``../``/``~``,
    several ``/``, an os.PathLike) but is no folder, and ValueError for a file, instead of asking the hub for it.
    """
    if errors not in ("replace", "strict"):
        raise ValueError(f"errors must be 'replace' or 'strict', got {errors!r}")
    if not isinstance(source, (str, os.PathLike)):
        raise ValueError(f"source must be 'stdlib', a folder path or a hub dataset name, got {type(source).__name__}")
    replaced: dict[str, int] = {}

    def _read(path: Path) -> str:
        return _read_file(path, errors, replaced)

    src = str(source)
    if src == "stdlib":
        import sys

        train_paths, test_paths = stdlib_files()
        root = Path(sysconfig.get_paths()["stdlib"])
        rel = [str(p.relative_to(root)) for p in train_paths]
        name = f"stdlib-{sys.version_info.major}.{sys.version_info.minor}"
        if stdlib_val == "split":
            # Held-out library modules, chosen by a hash of their path: the same distribution as training.
            is_val = [_hash_fraction(r) < val_fraction for r in rel]
            corpus = Corpus(name, [_read(p) for p, v in zip(train_paths, is_val) if not v],
                            [_read(p) for p, v in zip(train_paths, is_val) if v],
                            [r for r, v in zip(rel, is_val) if not v], [r for r, v in zip(rel, is_val) if v])
        elif stdlib_val == "tests":
            if not test_paths:
                raise FileNotFoundError("this Python has no test packages to validate on; use stdlib_val='split'")
            # Evenly spaced test files until val_bytes: deterministic, and samples every test package.
            sizes = [p.stat().st_size for p in test_paths]
            stride = max(1, int(sum(sizes) / max(val_bytes, 1)))
            val_paths, total = [], 0
            for p in test_paths[::stride]:
                if total >= val_bytes:
                    break
                val_paths.append(p)
                total += p.stat().st_size
            corpus = Corpus(name, [_read(p) for p in train_paths], [_read(p) for p in val_paths], rel,
                            [str(p.relative_to(root)) for p in val_paths])
        else:
            raise ValueError(f"stdlib_val must be 'split' or 'tests', got {stdlib_val!r}")
    elif Path(src).is_dir() or resolve(src).is_dir():
        root = Path(src) if Path(src).is_dir() else resolve(src)
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"no text files ({', '.join(TEXT_SUFFIXES)}) under {root}")
        rel = [str(p.relative_to(root)) for p in files]
        is_val = [_hash_fraction(r) < val_fraction for r in rel]
        if len(files) >= 2 and not any(is_val):  # tiny folders: still validate on something
            is_val[-1] = True
        if all(is_val):
            is_val[0] = False
        texts = [_read(p) for p in files]
        corpus = Corpus(f"folder:{root.name}", [t for t, v in zip(texts, is_val) if not v],
                        [t for t, v in zip(texts, is_val) if v],
                        [r for r, v in zip(rel, is_val) if not v], [r for r, v in zip(rel, is_val) if v])
    else:
        _refuse_missing_path(source, src)
        corpus = _load_hf(src, val_fraction=val_fraction, split=hf_split, text_field=text_field, max_docs=max_docs)
    if max_train_bytes is not None:
        keep, total = 0, 0
        for keep, doc in enumerate(corpus.train, start=1):
            total += len(doc)
            if total >= max_train_bytes:
                break
        corpus.train, corpus.train_ids = corpus.train[:keep], corpus.train_ids[:keep]
    if not corpus.val:
        raise ValueError(f"corpus {corpus.name} has no validation documents; raise val_fraction / val_bytes")
    corpus.replaced = replaced
    if replaced and src != "stdlib":  # a folder: the stdlib's few mis-encoded test files are expected
        import warnings

        names = ", ".join(f"{Path(p).name} ({n})" for p, n in list(replaced.items())[:5])
        warnings.warn(f"{len(replaced)} file(s) under {src} are not valid UTF-8: {sum(replaced.values())} characters "
                      f"were replaced with U+FFFD ({names}{', ...' if len(replaced) > 5 else ''}); convert them to "
                      f"UTF-8, or pass errors='strict' to refuse them (corpus.replaced lists them all)", stacklevel=2)
    return corpus


def _refuse_missing_path(source: str | os.PathLike, src: str) -> None:
    """A source that is a file, or can only be a path, is not a hub dataset: asking the hub for it ends (offline,
    after a minute of retries) in a ConnectionError about the datasets cache that hides the mistyped path."""
    if Path(src).is_file() or resolve(src).is_file():
        raise ValueError(f"corpus source {src!r} is a file; pass the folder that holds the text files "
                         f"({', '.join(TEXT_SUFFIXES)}), e.g. {str(Path(src).parent)!r}")
    if isinstance(source, os.PathLike) or src.startswith(("/", ".", "~")) or src.count("/") > 1 or "\\" in src:
        places = " and ".join(map(str, dict.fromkeys([Path(src).absolute(), resolve(src)])))
        tilde = " (~ is not expanded)" if src.startswith("~") else ""
        raise FileNotFoundError(f"corpus source folder {src!r} does not exist (looked in {places}); check the "
                                f"path{tilde}, or pass 'stdlib' or a hub dataset name such as 'NeelNanda/pile-10k'")


def _load_hf(name: str, *, val_fraction: float, split: str, text_field: str, max_docs: int | None) -> Corpus:
    if "/" not in name:
        raise FileNotFoundError(f"corpus source {name!r} is neither 'stdlib', an existing folder, nor a hub dataset "
                                f"name like 'NeelNanda/pile-10k'")
    try:
        import datasets
    except ImportError as e:
        raise ImportError(f"loading the hub dataset {name!r} needs `pip install datasets`") from e
    try:
        # Cached datasets load offline (HF_HUB_OFFLINE=1 / HF_DATASETS_OFFLINE=1); others need the hub.
        ds = datasets.load_dataset(name, split=split)
    except (ConnectionError, OSError, ValueError) as e:
        raise ConnectionError(
            f"hub dataset {name!r} is not in the datasets cache ({datasets.config.HF_DATASETS_CACHE})"
            f"{' and HF_HUB_OFFLINE is set' if hub_offline() else ''}: load it once where the hub is "
            f"reachable, or use load_corpus('stdlib') or a folder of text files ({type(e).__name__}: {e})") from e
    if text_field not in ds.column_names:
        raise KeyError(f"dataset {name!r} has no column {text_field!r}; columns: {ds.column_names}")
    n = len(ds) if max_docs is None else min(max_docs, len(ds))
    texts = ds[text_field][:n]
    is_val = [_hash_fraction(f"{name}:{i}") < val_fraction for i in range(n)]
    return Corpus(f"hf:{name}", [t for t, v in zip(texts, is_val) if not v], [t for t, v in zip(texts, is_val) if v],
                  [str(i) for i, v in enumerate(is_val) if not v], [str(i) for i, v in enumerate(is_val) if v])


@checked
def held_out_stdlib(val_modules: list[str] | None = None, max_bytes: int | None = None) -> Corpus:
    """Standard-library text a model trained with `load_corpus("stdlib")` never saw, as the `val` documents of a
    Corpus (train empty): the held-out library modules named in `val_modules` (paths relative to the stdlib root,
    as recorded in the offline model's corpus.json), then the test packages, evenly spaced until `max_bytes`
    characters (None: all of them)."""
    train_paths, test_paths = stdlib_files()
    root = Path(sysconfig.get_paths()["stdlib"])
    docs, ids, total = [], [], 0
    for rel in val_modules or []:
        p = root / rel
        if p.exists():
            docs.append(_read_file(p))
            ids.append(rel)
            total += len(docs[-1])
    sizes = sum(p.stat().st_size for p in test_paths)
    stride = 1 if max_bytes is None else max(1, int(sizes / max(1, max_bytes - total)))
    for p in test_paths[::stride]:
        if max_bytes is not None and total >= max_bytes:
            break
        docs.append(_read_file(p))
        ids.append(str(p.relative_to(root)))
        total += len(docs[-1])
    if not docs:
        raise FileNotFoundError(f"no held-out standard-library text under {root}: this Python has no test packages "
                                f"and no held-out modules were named")
    return Corpus("stdlib-held-out", [], docs, [], ids)
