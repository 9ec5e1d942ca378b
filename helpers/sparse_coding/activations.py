"""Harvest activations to disk, and read them back as shuffled batches.

Layout (one folder per model, revision and hook)::

    <out_root>/<model>/<revision>/<hook>/manifest.json
    <out_root>/<model>/<revision>/<hook>/chunk-00000.safetensors   acts [rows, d] (float32 or float16),
                                                                  tokens [rows] (int32: the token at each row)

``manifest.json`` holds model, revision, hook, d, dtype, n_tokens (rows listed so far), target_tokens, ctx_len,
corpus, seed, complete, and the chunk list with each chunk's rows, bytes and crc32. A chunk is written to a temporary
file, renamed into place, and only then added to the manifest (itself replaced atomically), so a killed harvest
leaves a manifest listing only whole chunks and ``harvest`` resumes after the last of them.

Chunks hold whole contexts in corpus order: row ``r`` of the folder is position ``r % ctx_len`` of context
``r // ctx_len``; ``ActivationStore.context_of(r)`` gives the surrounding tokens for examples.

API::

    harvest(model, tokens, hooks, n_tokens, out_root, model_name, revision, ...) -> {hook: folder}
    store = ActivationStore(folder);  store.d, store.n_tokens, store.tokens, store.manifest
    for x in store.batches(batch_size=4096, seed=0, epochs=1, device="cpu"): ...   # float32 [B, d]
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import re
import struct
import tempfile
import threading
import time
import zlib
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from .io import load_json, save_json
from .neox_forward import CPUWorkers as _CPUWorkers
from .neox_forward import NeoXFastPath as _NeoXFastPath
from .paths import resolve

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int32: "I32",
              torch.int64: "I64"}
_NP_DTYPES = {"F32": np.float32, "F16": np.float16, "I32": np.int32, "I64": np.int64}


class ChunkError(RuntimeError):
    """A chunk file is missing, truncated, or does not match its manifest entry."""


def safe_name(name: str) -> str:
    """A model name as one folder name: ``EleutherAI/pythia-70m`` -> ``EleutherAI__pythia-70m``."""
    return re.sub(r"[^\w.\-]+", "__", str(name)).strip("_") or "model"


def hook_folder(out_root: str | os.PathLike, model_name: str, revision: str | None, hook: str) -> Path:
    return resolve(out_root) / safe_name(model_name) / safe_name(revision or "final") / hook


# ----------------------------------------------------------------------------------------------------- chunk files

def write_chunk(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> tuple[int, str]:
    """Write a safetensors file straight from the tensors' memory (no serialised copy of a ~100 MB chunk), to a
    temporary name then renamed. Returns (bytes, crc32 of the whole file as 8 hex digits). Readable by
    ``safetensors.safe_open``. CRC-32 rather than a cryptographic hash: it is there to catch damaged files, and at
    ~4 GB/s it costs a harvest 2 % of its CPU where sha256 cost 5 %."""
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset, arrays = 0, []
    for name, t in tensors.items():
        t = t.detach().contiguous().cpu()
        arr = t.numpy() if t.dtype != torch.bfloat16 else t.view(torch.int16).numpy()
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
        arrays.append(arr)
    hbytes = json.dumps(header, separators=(",", ":")).encode()
    hbytes += b" " * (-len(hbytes) % 8)  # the format pads the header to 8 bytes so the data is aligned
    crc = 0
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            for piece in (struct.pack("<Q", len(hbytes)), hbytes, *(memoryview(a.reshape(-1)).cast("B") for a in arrays)):
                f.write(piece)
                crc = zlib.crc32(piece, crc)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return 8 + len(hbytes) + offset, f"{crc:08x}"


def _open_chunk(path: Path, expect_rows: int | None = None, expect_bytes: int | None = None) -> dict[str, np.ndarray]:
    """Memory-map a chunk: {name: read-only np.memmap}. Any mismatch with the manifest is a ChunkError naming the file."""
    if not path.exists():
        raise ChunkError(f"chunk {path} is listed in the manifest but missing; re-run the harvest to rewrite it")
    size = path.stat().st_size
    if expect_bytes is not None and size != expect_bytes:
        raise ChunkError(f"chunk {path} is {size} bytes but the manifest says {expect_bytes}: truncated or "
                         f"overwritten. Delete it (and its manifest entry) and re-run the harvest")
    try:
        with open(path, "rb") as f:
            (hlen,) = struct.unpack("<Q", f.read(8))
            if hlen > size - 8:
                raise ValueError(f"header length {hlen} exceeds the file")
            header = json.loads(f.read(hlen))
        out = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            start, end = info["data_offsets"]
            if 8 + hlen + end > size:
                raise ValueError(f"tensor {name} runs past the end of the file")
            out[name] = np.memmap(path, dtype=_NP_DTYPES[info["dtype"]], mode="r", offset=8 + hlen + start,
                                  shape=tuple(info["shape"]))
    except (ValueError, KeyError, struct.error, UnicodeDecodeError, TypeError) as e:
        raise ChunkError(f"chunk {path} is corrupted ({e}); delete it and re-run the harvest") from e
    if "acts" not in out or "tokens" not in out:
        raise ChunkError(f"chunk {path} lacks 'acts' or 'tokens' (has {sorted(out)})")
    if expect_rows is not None and (out["acts"].shape[0] != expect_rows or out["tokens"].shape[0] != expect_rows):
        raise ChunkError(f"chunk {path} has {out['acts'].shape[0]} rows but the manifest says {expect_rows}")
    return out


# ----------------------------------------------------------------------------------------------------- harvesting

class _StopForward(Exception):
    """Raised by the last needed hook: nothing after it is computed."""


def _hook_points(model, hooks: Sequence[str]) -> dict[str, torch.nn.Module]:
    """The HookPoint module behind each requested name (TransformerLens aliases resolved to canonical names)."""
    aliases = {}
    collect = getattr(model, "_collect_hook_aliases_from_registry", None)
    if collect is not None:
        aliases = collect()
    out = {}
    for h in hooks:
        canonical = aliases.get(h, h)
        if isinstance(canonical, list):
            canonical = canonical[0]
        if canonical not in model.hook_dict:
            raise ValueError(f"hook {h!r} does not resolve to a hook point of this model")
        out[h] = model.hook_dict[canonical]
    return out


class _Harvester:
    """One forward pass per batch for all hooks: forward hooks copy each activation as it is produced and the
    last needed one stops the pass (``stop_at_layer`` semantics without the cache machinery)."""

    def __init__(self, model, hooks: Sequence[str]):
        from .lm import check_hooks, hook_layer, n_layers

        self.model = model
        self.hooks = check_hooks(model, list(hooks))
        self.points = _hook_points(model, self.hooks)
        layers = [hook_layer(h) for h in self.hooks]
        # Hooks outside the blocks (embed, ln_final, unembed) need the full pass; otherwise stop after the last block.
        self.stop_at = None if any(l is None for l in layers) else max(layers) + 1
        if self.stop_at is not None and self.stop_at >= n_layers(model):
            self.stop_at = None
        self.out: dict[str, torch.Tensor] = {}
        self._remaining: set[str] = set()

    def _make_hook(self, name: str):
        def fn(module, args, output):
            if name in self._remaining:
                self.out[name] = output.detach()
                self._remaining.discard(name)
                if not self._remaining:
                    raise _StopForward
        return fn

    @torch.inference_mode()
    def __call__(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        self.out, self._remaining = {}, set(self.hooks)
        handles = [self.points[h].register_forward_hook(self._make_hook(h)) for h in self.hooks]
        try:
            kw = {"stop_at_layer": self.stop_at} if self.stop_at is not None else {}
            self.model(tokens, **kw)
        except _StopForward:
            pass
        finally:
            for hd in handles:
                hd.remove()
        if self._remaining:
            raise RuntimeError(f"hooks {sorted(self._remaining)} never fired during the forward pass")
        return self.out


class _ChunkWriter:
    """Writes finished chunks on a background thread (disk I/O overlaps the next forward passes) and appends each
    to its manifest only after its file is in place. At most `max_pending` chunks wait, bounding memory."""

    def __init__(self, max_pending: int = 2):
        self.q: queue.Queue = queue.Queue(maxsize=max_pending)
        self.error: BaseException | None = None
        self.bytes_written = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while True:
            job = self.q.get()
            if job is None:
                return
            folder, index, acts, toks, manifest = job
            try:
                if self.error is None:
                    name = f"chunk-{index:05d}.safetensors"
                    nbytes, crc = write_chunk(folder / name, {"acts": acts, "tokens": toks},
                                              {"hook": manifest["hook"], "index": str(index)})
                    manifest["chunks"].append({"file": name, "rows": int(acts.shape[0]), "bytes": nbytes,
                                               "crc32": crc})
                    manifest["n_tokens"] += int(acts.shape[0])
                    manifest["complete"] = manifest["n_tokens"] >= manifest["target_tokens"]
                    save_json(folder / MANIFEST, manifest)
                    self.bytes_written += nbytes
            except BaseException as e:  # surfaced in the main thread at the next put / close
                self.error = e

    def put(self, job):
        if self.error:
            raise self.error
        self.q.put(job)

    def close(self):
        self.q.put(None)
        self.thread.join()
        if self.error:
            raise self.error


def harvest(model, tokens: torch.Tensor, hooks: Sequence[str], n_tokens: int, out_root: str | os.PathLike,
            model_name: str, revision: str | None = None, *, chunk_rows: int = 131072, batch_size: int = 32,
            dtype: torch.dtype = torch.float32, ctx_len: int | None = None, corpus: str = "", seed: int = 0,
            progress: bool = True, fast: bool = True) -> dict[str, Path]:
    """Run ``tokens`` through ``model`` and store the activations of every hook in ``hooks``.

    Args:
        model: a TransformerLens model from :func:`sparse_coding.lm.load_model`.
        tokens: LongTensor contexts ``[n_contexts, ctx_len]`` (or a 1-D stream, cut with ``ctx_len``), used in order.
        hooks: hook names, e.g. ``["blocks.0.hook_resid_post", "blocks.2.mlp.hook_post"]``; all come from one pass.
        n_tokens: rows to store per hook, rounded up to whole contexts.
        out_root: folder under which ``<model>/<revision>/<hook>/`` is created (e.g. ``data/activations``).
        model_name, revision: recorded in the manifest and used in the path.
        chunk_rows: rows per chunk file (rounded down to whole contexts); 131072 x d=128 x 4 B = 64 MB.
        batch_size: contexts per forward pass (on a multi-core CPU with the lean path, passes of at most
            ``CPUWorkers.ROWS_PER_CALL`` rows, run side by side: see ``neox_forward.CPUWorkers``).
        dtype: torch.float32 (default) or torch.float16 on disk; the reader always yields float32.
        corpus, seed: provenance for the manifest.
        fast: for GPT-NeoX and block-level hooks (resid_pre/post, attn_out, mlp_out, mlp.hook_pre/post) run a lean
            forward on the same weights (fused attention, nothing after the last needed layer); False, or any other
            model or hook, uses the bridge's own hook points with ``stop_at_layer``. Both give the same values.

    Returns {hook: folder}. A folder whose manifest is complete with the same settings is left as is; a partial
    one resumes after its last complete chunk; one with different settings is an error (delete it or change
    out_root)."""
    if dtype not in (torch.float32, torch.float16):
        raise ValueError(f"dtype must be torch.float32 or torch.float16, got {dtype}")
    if tokens.ndim == 1:
        if ctx_len is None:
            raise ValueError("tokens is a 1-D stream: pass ctx_len to cut it into contexts")
        from .corpus import contexts
        tokens = contexts(tokens, ctx_len)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [n_contexts, ctx_len], got shape {tuple(tokens.shape)}")
    n_ctx_total, ctx_len = tokens.shape
    ctx_per_chunk = max(1, chunk_rows // ctx_len)
    need_ctx = -(-int(n_tokens) // ctx_len)
    if need_ctx > n_ctx_total:
        raise ValueError(f"n_tokens={n_tokens} needs {need_ctx} contexts of {ctx_len} but only {n_ctx_total} were "
                         f"given ({n_ctx_total * ctx_len} tokens); lower n_tokens or pass more text")
    target = need_ctx * ctx_len
    harvester = _Harvester(model, hooks)  # also validates the hook names against the model
    if fast and _NeoXFastPath.applies(model, harvester.hooks):
        run = _NeoXFastPath(model, harvester.hooks)
    else:
        run = harvester
    device = next(model.parameters()).device

    # Manifests: new, resumed, or already complete.
    folders, manifests, done_ctx = {}, {}, {}
    d_of = {}
    settings = {"model": str(model_name), "revision": revision or "final", "dtype": str(dtype).replace("torch.", ""),
                "ctx_len": ctx_len, "corpus": corpus, "seed": seed, "target_tokens": target,
                "chunk_contexts": ctx_per_chunk, "format": FORMAT_VERSION}
    for h in harvester.hooks:
        folder = hook_folder(out_root, model_name, revision, h)
        folder.mkdir(parents=True, exist_ok=True)
        mpath = folder / MANIFEST
        if mpath.exists():
            m = load_json(mpath)
            diff = {k: (m.get(k), v) for k, v in settings.items() if m.get(k) != v}
            if diff:
                raise ValueError(f"{folder} holds a harvest with other settings {diff} (theirs, ours); delete the "
                                 f"folder or choose another out_root")
        else:
            m = {**settings, "hook": h, "d": None, "n_tokens": 0, "complete": False, "chunks": [],
                 "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
            save_json(mpath, m)
        folders[h], manifests[h] = folder, m
        done_ctx[h] = m["n_tokens"] // ctx_len
        for stray in folder.glob(".chunk-*.tmp"):  # leftovers of a killed write
            stray.unlink(missing_ok=True)
    start_ctx = min(done_ctx.values())
    if start_ctx >= need_ctx:
        return folders

    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    workers = _CPUWorkers(run) if isinstance(run, _NeoXFastPath) and device.type == "cpu" else None
    writer = _ChunkWriter()
    # Chunk numbers are counted here, not read back from the manifests the writer thread is still appending to.
    next_index = {h: len(manifests[h]["chunks"]) for h in harvester.hooks}
    bar = tqdm(total=target, initial=start_ctx * ctx_len, desc="harvest", unit="tok", unit_scale=True,
               disable=not progress)
    try:
        for c0 in range(start_ctx, need_ctx, ctx_per_chunk):
            c1 = min(c0 + ctx_per_chunk, need_ctx)
            rows = (c1 - c0) * ctx_len
            chunk_tokens = tokens[c0:c1]
            # Hooks already past this chunk (a harvest killed between two hooks' manifests) skip it.
            todo = [h for h in harvester.hooks if done_ctx[h] <= c0]
            buffers: dict[str, torch.Tensor] = {}
            step = workers.contexts_per_call(batch_size, ctx_len) if workers else batch_size
            starts = range(0, c1 - c0, step)
            inputs = (chunk_tokens[b0:b0 + step].to(device) for b0 in starts)
            for b0, acts in zip(starts, workers.map(inputs) if workers else map(run, inputs)):
                n_rows = min(step, c1 - c0 - b0) * ctx_len
                for h in todo:
                    a = acts[h].reshape(n_rows, -1)
                    if h not in buffers:  # one preallocated buffer per chunk: each activation is copied once
                        buffers[h] = torch.empty(rows, a.shape[1], dtype=dtype)
                        d_of[h] = a.shape[1]
                    buffers[h][b0 * ctx_len:b0 * ctx_len + n_rows].copy_(a)
                bar.update(n_rows)
            toks32 = chunk_tokens.reshape(-1).to(torch.int32)
            for h in todo:
                m = manifests[h]
                if m["d"] is None:
                    m["d"] = int(d_of[h])
                writer.put((folders[h], next_index[h], buffers[h], toks32, m))
                next_index[h] += 1
    finally:
        bar.close()
        if workers:
            workers.close()
        writer.close()
        # Wall time spent harvesting, summed over resumed runs: tokens/s = n_tokens / seconds, even when a later
        # call finds the work done and returns at once.
        elapsed = time.perf_counter() - t_start
        for h in harvester.hooks:
            if manifests[h]["chunks"]:
                manifests[h]["seconds"] = manifests[h].get("seconds", 0.0) + elapsed
                save_json(folders[h] / MANIFEST, manifests[h])
    return folders


# ----------------------------------------------------------------------------------------------------- reading

class ActivationStore:
    """Read a harvested folder by memory-mapping its chunks.

    Attributes: ``d``, ``n_tokens``, ``ctx_len``, ``manifest``, ``folder``. ``tokens`` is a LongTensor [n_tokens] of
    the token at every row. Only chunks listed in the manifest are read; each is checked against its listed size
    and rows when opened (``verify()`` also checks the checksum)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = resolve(folder)
        mpath = self.folder / MANIFEST
        if not mpath.exists():
            raise FileNotFoundError(f"no {MANIFEST} in {self.folder}: not a harvest folder (see activations.harvest)")
        self.manifest = load_json(mpath)
        chunks = self.manifest["chunks"]
        if not chunks:
            raise ValueError(f"{self.folder} has no complete chunks yet; run or resume the harvest")
        self.d = int(self.manifest["d"])
        self.ctx_len = int(self.manifest["ctx_len"])
        self.hook = self.manifest.get("hook")
        self._maps = [_open_chunk(self.folder / c["file"], c["rows"], c.get("bytes")) for c in chunks]
        for c, mp in zip(chunks, self._maps):
            if mp["acts"].shape[1] != self.d:
                raise ChunkError(f"chunk {self.folder / c['file']} has width {mp['acts'].shape[1]}, manifest d={self.d}")
        self._offsets = np.cumsum([0] + [c["rows"] for c in chunks])
        self.n_tokens = int(self._offsets[-1])
        self._tokens: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.n_tokens

    def __repr__(self) -> str:
        m = self.manifest
        return (f"ActivationStore({m['model']}@{m['revision']} {self.hook}: {self.n_tokens} x {self.d} {m['dtype']}, "
                f"{len(self._maps)} chunks{'' if m.get('complete') else ', INCOMPLETE'})")

    @property
    def bytes_on_disk(self) -> int:
        return int(sum((self.folder / c["file"]).stat().st_size for c in self.manifest["chunks"]))

    @property
    def tokens(self) -> torch.Tensor:
        """The token id at every row (LongTensor [n_tokens])."""
        if self._tokens is None:
            self._tokens = torch.from_numpy(np.concatenate([np.asarray(mp["tokens"]) for mp in self._maps])).long()
        return self._tokens

    def context_of(self, row: int) -> tuple[torch.Tensor, int]:
        """(tokens of the context holding ``row``, the row's position in it)."""
        if not 0 <= row < self.n_tokens:
            raise IndexError(f"row {row} out of range [0, {self.n_tokens})")
        c = row // self.ctx_len
        return self.tokens[c * self.ctx_len:(c + 1) * self.ctx_len], row % self.ctx_len

    def rows(self, idx: torch.Tensor | np.ndarray | Sequence[int]) -> torch.Tensor:
        """Activations (float32 [len(idx), d]) at the given global row numbers, in that order."""
        idx = np.asarray(idx, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self.n_tokens):
            raise IndexError(f"row indices must be in [0, {self.n_tokens})")
        out = np.empty((idx.size, self.d), dtype=np.float32)
        which = np.searchsorted(self._offsets, idx, side="right") - 1
        for ci in np.unique(which):
            sel = np.nonzero(which == ci)[0]
            local = idx[sel] - self._offsets[ci]
            order = np.argsort(local, kind="stable")  # ascending reads are kinder to the page cache
            out[sel[order]] = self._maps[ci]["acts"][local[order]]
        return torch.from_numpy(out)

    def all(self) -> torch.Tensor:
        """Every row in order as one float32 tensor (for PCA and the like; needs n_tokens x d x 4 bytes of RAM)."""
        return torch.from_numpy(np.concatenate([np.asarray(mp["acts"], dtype=np.float32) for mp in self._maps]))

    def batches(self, batch_size: int, seed: int = 0, epochs: int = 1, device: str | torch.device = "cpu",
                drop_last: bool = False) -> Iterator[torch.Tensor]:
        """Shuffled float32 batches [batch_size, d]: each epoch is a fresh permutation of all rows drawn from a
        generator seeded by (seed, epoch), so every row appears exactly once per epoch and the order is a function
        of the seed only. The last batch of an epoch is smaller unless drop_last."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        for epoch in range(epochs):
            perm = np.random.default_rng([seed, epoch]).permutation(self.n_tokens)
            for i in range(0, self.n_tokens, batch_size):
                idx = perm[i:i + batch_size]
                if drop_last and idx.size < batch_size:
                    break
                x = self.rows(idx)
                yield x.to(device, non_blocking=True) if str(device) != "cpu" else x

    def verify(self) -> None:
        """Re-read every chunk against the manifest's checksum (crc32; sha256 in manifests written before it) -
        slow: reads everything. A ChunkError names the file."""
        for c in self.manifest["chunks"]:
            kind = "crc32" if "crc32" in c else "sha256" if "sha256" in c else None
            if kind is None:
                continue
            h, crc = hashlib.sha256(), 0
            with open(self.folder / c["file"], "rb") as f:
                for block in iter(lambda: f.read(1 << 24), b""):
                    if kind == "crc32":
                        crc = zlib.crc32(block, crc)
                    else:
                        h.update(block)
            got = f"{crc:08x}" if kind == "crc32" else h.hexdigest()
            if got != c[kind]:
                raise ChunkError(f"chunk {self.folder / c['file']} does not match its {kind} checksum in the manifest: "
                                 f"corrupted. Delete it (and its manifest entry) and re-run the harvest")


def find_harvests(out_root: str | os.PathLike) -> list[Path]:
    """Every harvest folder (holding a manifest) under ``out_root``, sorted."""
    return sorted(p.parent for p in resolve(out_root).rglob(MANIFEST))
