"""Writing and reading files: every write lands under its real name whole or not at all.

A file is written to a temporary name in the same folder and renamed into place (`atomic_path`); a folder is built
under a temporary name and renamed (`atomic_dir`), so a killed run never leaves a half-written file or folder under
a real name. Tensors go to safetensors, everything else to JSON: nothing here unpickles."""

from __future__ import annotations

import json
import math
import glob
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from safetensors.torch import load_file, save_file

from .paths import resolve


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# mkstemp/mkdtemp make owner-only files and folders (0600/0700); what we write should get the permissions any
# other file the user makes gets, so that a shared data/ or figures/ folder stays readable by the group.
_UMASK = _umask()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sweep_stale(parent: Path, name: str) -> bool:
    """Remove the temporaries a writer that died left beside `name` (killed between creating one and renaming it:
    they are named `.<name>.<pid>-...`); True when no live writer's temporary remains."""
    prefix = f".{name}."
    clear = True
    for p in parent.glob(glob.escape(prefix) + "*"):
        pid, dash, _ = p.name[len(prefix):].partition("-")
        if not (dash and pid.isdigit()):
            continue
        if int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        else:
            clear = False
    return clear


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; when the block ends without an error it is renamed to `path`, else
    deleted. The one place this package turns a temporary file into a real one. A relative path is taken from the
    repo root (paths.resolve), so a notebook run from notebooks/ writes where one run from the root does."""
    path = resolve(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _sweep_stale(path.parent, path.name)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}-", suffix=".tmp")
    os.fchmod(fd, 0o666 & ~_UMASK)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _remove(path: Path) -> None:
    """Delete `path` whatever it is (a folder, a file, a link: the link, not its target); nothing if absent."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def atomic_dir(final: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary folder beside `final`; when the block ends without an error it replaces `final`.

    Raises FileExistsError (before anything is built) when `final` exists and overwrite is False."""
    final = resolve(final)
    old = final.with_name(f".{final.name}.old")
    if final.parent.exists() and _sweep_stale(final.parent, final.name) and old.exists() and not final.exists():
        os.replace(old, final)  # a writer died between moving the old version aside and the new one in: restore it
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} already exists; pass overwrite=True to replace it, or choose another folder")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.{os.getpid()}-"))
    tmp.chmod(0o777 & ~_UMASK)
    try:
        yield tmp
        if final.exists():
            _remove(old)
            os.replace(final, old)  # the old version stays whole under `.name.old` until the new one is in place
            os.replace(tmp, final)
            _remove(old)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    return resolve(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def jsonable(obj: Any) -> Any:
    """`obj` as plain JSON types: tuples become lists, tensors and numpy values lists or numbers, paths strings,
    NaN/inf null (JSON has no NaN; null says "not measured" honestly)."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return jsonable(obj.tolist())
    if hasattr(obj, "tolist"):  # numpy scalars and arrays
        return jsonable(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def canonical(obj: Any) -> Any:
    """What `obj` is after a JSON round trip (tuples -> lists, 2 -> 2, 2.0 -> 2.0): settings are compared in this
    form, so a tuple argument equals the list saved for it."""
    return json.loads(json.dumps(jsonable(obj)))


def save_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(jsonable(obj), indent=2, sort_keys=False) + "\n")


def load_json(path: str | os.PathLike) -> Any:
    """The JSON at `path`; a ValueError naming the file when it is not valid JSON."""
    try:
        with open(resolve(path), encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); it was damaged or written by something else") from e


def update_json(path: str | os.PathLike, updates: Mapping[str, Any]) -> dict:
    """Merge `updates` into the JSON object at `path` (created if missing). Used by benchmarks, which each add
    their own keys to one shared results file; a key whose old and new values are both objects is merged one level
    deep, so a run of some workloads (e.g. `bench_loaded.py --only harvest`) keeps the others' figures."""
    path = resolve(path)
    current = load_json(path) if path.exists() else {}
    for key, value in jsonable(updates).items():
        old = current.get(key)
        current[key] = {**old, **value} if isinstance(old, dict) and isinstance(value, dict) else value
    save_json(path, current)
    return current


def save_tensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                 metadata: Mapping[str, str] | None = None) -> Path:
    """safetensors, written atomically. Tensors are made contiguous and moved to the CPU first."""
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp),
                  metadata=dict(metadata) if metadata else None)
    return resolve(path)


def load_tensors(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file; a ValueError naming the file when it is truncated or not safetensors."""
    try:
        return load_file(str(resolve(path)), device=str(device))
    except FileNotFoundError:
        raise
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise ValueError(f"{path} could not be read as safetensors ({e}); it is truncated or damaged") from e


def write_metrics(figures_dir: str | os.PathLike, notebook_number: str, metrics: Mapping[str, Any]) -> Path:
    """figures/NN_metrics.json: the key numbers of one notebook run; the write-up and checks read these keys."""
    return save_json(resolve(figures_dir) / f"{notebook_number}_metrics.json", metrics)


LOCK_FILE = ".lock"


@contextmanager
def folder_lock(folder: str | os.PathLike, what: str) -> Iterator[Path]:
    """Hold an exclusive lock on `folder` (fcntl on `<folder>/.lock`, released when the block ends or the process
    dies) so that two jobs never write one folder at once. Raises BlockingIOError naming the folder and the pid of
    the job holding it."""
    import fcntl

    folder = resolve(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    f = open(path, "a+")
    try:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            raise BlockingIOError(f"{folder} is being written by another job ({holder}); wait for it to finish "
                                  f"or write somewhere else (this job: {what})") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}: {what}")
        f.flush()
        yield folder
    finally:
        f.close()
