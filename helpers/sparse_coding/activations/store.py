"""Read harvested activations back: memory-mapped chunks, rows by index, shuffled batches; and write a store from
tensors already in memory.

    store = ActivationStore(folder);  store.d, store.n_tokens, store.tokens, store.manifest
    for x in store.batches(batch_size=4096, seed=0, epochs=1, device="cpu"): ...   # float32 [B, d]

`row_order` is the one definition of the shuffled row order: the store's batches, the trainer's batch source and the
held-out bookkeeping of notebook 04 all call it, so they agree on which rows a run saw."""

from __future__ import annotations

import os
import time
from typing import Iterator, Sequence

import numpy as np
import torch

from ..arguments import checked
from ..checks import check_bool, check_device, check_int, check_seed
from ..files import load_json, save_json
from ..paths import resolve
from .exclusion import Exclusion, exclusion_of, kept_rows
from .layout import FORMAT_VERSION, MANIFEST, ChunkError, chunk_checksum, open_chunk, write_chunk


@checked
def row_order(n_rows: int, seed: int, epoch: int) -> np.ndarray:
    """The rows of a store in the order epoch `epoch` of a run with `seed` reads them: a permutation of
    range(n_rows) drawn from numpy's default_rng([seed, epoch]), so any step's batch is computable directly."""
    return np.random.default_rng([int(seed), int(epoch)]).permutation(int(n_rows))


def _row_indices(idx) -> np.ndarray:
    """idx as int64 row numbers (1-D). A bool mask would be read as rows 0 and 1, and float indices truncated to
    other rows, each handing back the wrong activations without a word: refused instead."""
    arr = idx.detach().cpu().numpy() if isinstance(idx, torch.Tensor) else np.asarray(idx)
    if arr.ndim != 1:
        fix = "wrap a single row in a list: [row]" if arr.ndim == 0 else "flatten it with .reshape(-1)"
        raise ValueError(f"ActivationStore.rows: idx must be a 1-D sequence of row numbers, got "
                         f"{'a scalar' if arr.ndim == 0 else f'shape {arr.shape}'}; {fix}")
    if arr.size and arr.dtype.kind not in "iu":
        fix = ("pass the rows it selects: mask.nonzero()[0] (numpy) or mask.nonzero().squeeze(1) (torch)"
               if arr.dtype.kind == "b" else "convert whole numbers with .astype(np.int64) or .long()")
        raise ValueError(f"ActivationStore.rows: idx must hold integer row numbers, got {arr.dtype} values; {fix}")
    return arr.astype(np.int64, copy=False)


@checked
class ActivationStore:
    """Read a harvested folder by memory-mapping its chunks.

    Attributes: ``d``, ``n_tokens``, ``ctx_len``, ``manifest``, ``folder``, ``exclusion``, ``n_norm_excluded`` (rows
    left out for their norm alone: over the manifest's ``exclude.max_norm`` limit at this hook). ``tokens`` is a LongTensor
    [n_tokens] of the token at every row. A harvest that left positions out of the dictionaries' inputs (the
    manifest's ``exclude``, e.g. position 0 of a model with massive first-position activations) keeps them on disk
    but the store hides them: ``n_tokens``, ``rows``, ``tokens``, ``all``, ``batches`` and ``context_of`` number
    the kept rows only (``n_rows`` counts every row on disk). Only chunks listed in the manifest are read; each is checked against its listed size
    and rows when the store opens, and against its checksum the first time the store reads from it (a chunk
    damaged in place raises ChunkError naming it instead of handing back finite garbage); ``verify()`` checks all
    of them at once."""

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
        self._maps = [open_chunk(self.folder / c["file"], c["rows"], c.get("bytes")) for c in chunks]
        for c, mp in zip(chunks, self._maps):
            if mp["acts"].shape[1] != self.d:
                raise ChunkError(f"chunk {self.folder / c['file']} has width {mp['acts'].shape[1]}, manifest d={self.d}")
        self._checked = [False] * len(chunks)
        self._offsets = np.cumsum([0] + [c["rows"] for c in chunks])
        self.n_rows = int(self._offsets[-1])
        self.exclusion: Exclusion = exclusion_of(self.manifest)
        self._tokens: torch.Tensor | None = None
        self._kept: np.ndarray | None = None
        # n_norm_excluded: rows left out for their norm alone (massive activations past the excluded positions).
        self.n_norm_excluded = 0
        if self.exclusion:
            if self.n_rows % self.ctx_len:
                raise ChunkError(f"{self.folder}: {self.n_rows} rows are not whole contexts of {self.ctx_len}")
            norms = self._norms() if self.exclusion.limit(self.hook) is not None else None
            kept, self.n_norm_excluded = kept_rows(self._all_tokens(), self.ctx_len, self.exclusion, self.hook, norms)
            self._kept = kept.numpy()
        self.n_tokens = self.n_rows if self._kept is None else int(self._kept.size)

    def __len__(self) -> int:
        return self.n_tokens

    def __repr__(self) -> str:
        m = self.manifest
        return (f"ActivationStore({m['model']}@{m['revision']} {self.hook}: {self.n_tokens} x {self.d} {m['dtype']}, "
                f"{len(self._maps)} chunks{'' if m.get('complete') else ', INCOMPLETE'})")

    @property
    def bytes_on_disk(self) -> int:
        return int(sum((self.folder / c["file"]).stat().st_size for c in self.manifest["chunks"]))

    def _check(self, ci: int) -> None:
        """Chunk ci against its manifest checksum, once per store (a crc32 pass over the whole file)."""
        if self._checked[ci]:
            return
        c = self.manifest["chunks"][ci]
        kind = "crc32" if "crc32" in c else "sha256" if "sha256" in c else None
        if kind is not None and chunk_checksum(self.folder / c["file"], kind) != c[kind]:
            raise ChunkError(f"chunk {self.folder / c['file']} does not match its {kind} checksum in the manifest: "
                             f"its bytes were damaged. Delete it (and its manifest entry) and re-run the harvest")
        self._checked[ci] = True

    def _norms(self, rows_per_read: int = 131072) -> torch.Tensor:
        """The norm of every row on disk (float32 [n_rows]), read chunk by chunk."""
        out = []
        for ci, mp in enumerate(self._maps):
            self._check(ci)
            acts = mp["acts"]
            for i in range(0, acts.shape[0], rows_per_read):
                out.append(torch.from_numpy(np.array(acts[i:i + rows_per_read], dtype=np.float32)).norm(dim=1))
        return torch.cat(out)

    def _all_tokens(self) -> torch.Tensor:
        """The token id at every row on disk, excluded ones too (LongTensor [n_rows])."""
        if self._tokens is None:
            for ci in range(len(self._maps)):
                self._check(ci)
            self._tokens = torch.from_numpy(np.concatenate([np.asarray(mp["tokens"]) for mp in self._maps])).long()
        return self._tokens

    @property
    def tokens(self) -> torch.Tensor:
        """The token id at every kept row (LongTensor [n_tokens])."""
        toks = self._all_tokens()
        return toks if self._kept is None else toks[torch.from_numpy(self._kept)]

    def context_of(self, row: int) -> tuple[torch.Tensor, int]:
        """(tokens of the whole context holding kept ``row``, excluded positions included, the row's position).
        Raises ValueError for a row that is not an int (True would read as row 1), IndexError outside
        [0, n_tokens)."""
        row = check_int(row, "ActivationStore.context_of: row", hint=" (a kept row number)")
        if not 0 <= row < self.n_tokens:
            raise IndexError(f"row {row} out of range [0, {self.n_tokens})")
        row = row if self._kept is None else int(self._kept[row])
        c = row // self.ctx_len
        return self._all_tokens()[c * self.ctx_len:(c + 1) * self.ctx_len], row % self.ctx_len

    def rows(self, idx: torch.Tensor | np.ndarray | Sequence[int]) -> torch.Tensor:
        """Activations (float32 [len(idx), d]) at the given kept row numbers (a 1-D list, range, integer array or
        tensor), in that order. Raises ValueError for a bool mask, non-integer or multi-dimensional idx, IndexError
        for a row outside [0, n_tokens)."""
        idx = _row_indices(idx)
        if idx.size and (idx.min() < 0 or idx.max() >= self.n_tokens):
            raise IndexError(f"row indices must be in [0, {self.n_tokens})")
        if self._kept is not None:
            idx = self._kept[idx]
        out = np.empty((idx.size, self.d), dtype=np.float32)
        which = np.searchsorted(self._offsets, idx, side="right") - 1
        for ci in np.unique(which):
            self._check(int(ci))
            sel = np.nonzero(which == ci)[0]
            local = idx[sel] - self._offsets[ci]
            order = np.argsort(local, kind="stable")  # ascending reads are kinder to the page cache
            out[sel[order]] = self._maps[ci]["acts"][local[order]]
        return torch.from_numpy(out)

    def all(self) -> torch.Tensor:
        """Every kept row in order as one float32 tensor (for PCA and the like; needs n_tokens x d x 4 bytes)."""
        if self._kept is not None:
            return self.rows(np.arange(self.n_tokens))
        for ci in range(len(self._maps)):
            self._check(ci)
        return torch.from_numpy(np.concatenate([np.asarray(mp["acts"], dtype=np.float32) for mp in self._maps]))

    def batches(self, batch_size: int, seed: int = 0, epochs: int = 1, device: str | torch.device = "cpu",
                drop_last: bool = False) -> Iterator[torch.Tensor]:
        """Shuffled float32 batches [batch_size, d]: each epoch is a fresh permutation of all rows drawn from a
        generator seeded by (seed, epoch), so every row appears exactly once per epoch and the order is a function
        of the seed only. The last batch of an epoch is smaller unless drop_last.
        Raises ValueError when called (not at the first batch) for a batch_size or epochs that is not an int >= 1
        (a bool included: True would mean batches of one row), a seed outside [0, 2**63) or an unknown device."""
        check_int(batch_size, "batch_size", 1, hint=" (rows per batch)")
        # epochs=0 would hand back no batches at all: a run "trained" on nothing.
        check_int(epochs, "epochs", 1, hint=" (passes over the store)")
        check_seed(seed)
        check_device(device)
        check_bool(drop_last, "drop_last")
        return self._batches(batch_size, seed, epochs, device, drop_last)

    def _batches(self, batch_size: int, seed: int, epochs: int, device: str | torch.device,
                 drop_last: bool) -> Iterator[torch.Tensor]:
        for epoch in range(epochs):
            perm = row_order(self.n_tokens, seed, epoch)
            for i in range(0, self.n_tokens, batch_size):
                idx = perm[i:i + batch_size]
                if drop_last and idx.size < batch_size:
                    break
                x = self.rows(idx)
                yield x.to(device, non_blocking=True) if str(device) != "cpu" else x

    def verify(self) -> None:
        """Re-read every chunk against the manifest's checksum (crc32; sha256 in manifests written before it) -
        slow: reads everything. A ChunkError names the file."""
        for ci in range(len(self._maps)):
            self._checked[ci] = False
            self._check(ci)


@checked
def write_store(folder: str | os.PathLike, acts: torch.Tensor, tokens: torch.Tensor | None = None, *,
                model: str = "tensors", revision: str = "final", hook: str = "activations", ctx_len: int | None = None,
                chunk_rows: int | None = None, corpus: str = "", seed: int = 0,
                exclude: Exclusion | None = None) -> ActivationStore:
    """Write activations already in memory (acts [rows, d], tokens [rows] or None) as a store folder that every
    reader of this package accepts, and open it. ctx_len (rows per context, default: all rows are one context)
    must divide the rows; chunk_rows (default: one chunk) is rounded down to whole contexts; exclude: positions and
    token ids the readers leave out (`activations.exclusion`), and with a norm_ratio the rows over it x the median
    norm (the limit measured here from acts, as a harvest does).
    Raises FileExistsError when the folder already holds a manifest; ValueError for acts that are not finite
    float32/float16 and for token ids outside [0, 2**31) (int32 on disk)."""
    folder = resolve(folder)
    if (folder / MANIFEST).exists():
        raise FileExistsError(f"{folder} already holds a store ({MANIFEST}); choose another folder")
    if not isinstance(acts, torch.Tensor) or acts.ndim != 2 or not acts.is_floating_point():
        raise ValueError(f"acts must be a float tensor [rows, d], got "
                         f"{tuple(acts.shape) if isinstance(acts, torch.Tensor) else type(acts).__name__}")
    n, d = acts.shape
    if not bool(torch.isfinite(acts).all()):
        # Stored as they are, NaN rows would reach every reader (an SAE trained on them is NaN from its first step).
        bad = (~torch.isfinite(acts)).any(dim=1).nonzero().squeeze(1)
        raise ValueError(f"acts holds {int(torch.isnan(acts).sum())} NaN and {int(torch.isinf(acts).sum())} inf values "
                         f"in {bad.numel()} rows (first: row {int(bad[0])}); a store holds finite activations: drop "
                         f"or recompute those rows first")
    if tokens is not None and (int(tokens.min()) < 0 or int(tokens.max()) > 2**31 - 1):
        # int32 on disk: larger ids would wrap to other tokens, and a -1/-100 padding id reads back as a token.
        raise ValueError(f"tokens must be token ids in [0, 2**31), got values in [{int(tokens.min())}, "
                         f"{int(tokens.max())}]; drop padded rows (or map them to a real id), and check that these "
                         f"are token ids")
    tokens = torch.zeros(n, dtype=torch.int32) if tokens is None else tokens.reshape(-1).to(torch.int32)
    if tokens.numel() != n:
        raise ValueError(f"tokens has {tokens.numel()} entries for {n} rows of acts")
    ctx_len = int(ctx_len or n)
    if n % ctx_len:
        raise ValueError(f"ctx_len={ctx_len} does not divide the {n} rows (stores hold whole contexts)")
    step = max(ctx_len, (int(chunk_rows or n) // ctx_len) * ctx_len)
    dtype = {torch.float32: "float32", torch.float16: "float16"}.get(acts.dtype)
    if dtype is None:
        raise ValueError(f"acts must be float32 or float16, got {acts.dtype}; convert it with .float()")
    if exclude and exclude.norm_ratio and exclude.limit(hook) is None:
        # As a harvest does: the limit is norm_ratio x the median norm of the rows kept by position and token.
        by_token = exclude.keep(tokens.reshape(-1, ctx_len)).reshape(-1)
        med = float(acts.float().norm(dim=1)[by_token].median()) if bool(by_token.any()) else 0.0
        if med > 0:
            exclude = exclude.with_limits({hook: float(f"{exclude.norm_ratio * med:.6g}")})
    if exclude:
        exclude = exclude.for_hook(hook)
    folder.mkdir(parents=True, exist_ok=True)
    chunks = []
    for i, start in enumerate(range(0, n, step)):
        name = f"chunk-{i:05d}.safetensors"
        nbytes, crc = write_chunk(folder / name, {"acts": acts[start:start + step], "tokens": tokens[start:start + step]})
        chunks.append({"file": name, "rows": min(step, n - start), "bytes": nbytes, "crc32": crc})
    save_json(folder / MANIFEST, {"model": model, "revision": revision, "hook": hook, "d": d, "dtype": dtype,
                                  "n_tokens": n, "target_tokens": n, "ctx_len": ctx_len, "corpus": corpus, "seed": seed,
                                  "chunk_contexts": step // ctx_len, "format": FORMAT_VERSION, "complete": True,
                                  "chunks": chunks, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                  **({"exclude": exclude.to_json()} if exclude else {})})
    return ActivationStore(folder)


@checked
def norm_outliers(store: ActivationStore, norm_ratio: float = 10.0, rows_per_read: int = 65536) -> dict:
    """The kept rows of a store whose norm exceeds `norm_ratio` x the median kept norm: massive activations that the
    exclusion did not catch (they can sit past position 0, e.g. after a run of repeated tokens at a context's
    start). {"median_norm", "max_norm", "n_rows", "share_of_sum_squares" (their share of Σ‖x‖², what an SAE's
    MSE and input scale are made of), "positions" ({position in context: count})}. Reads every kept row once."""
    norms = torch.cat([store.rows(range(i, min(i + rows_per_read, store.n_tokens))).norm(dim=1)
                       for i in range(0, store.n_tokens, rows_per_read)])
    median = float(norms.median())
    big = (norms > norm_ratio * median).nonzero().squeeze(1)
    positions: dict[int, int] = {}
    for r in big.tolist():
        pos = store.context_of(r)[1]
        positions[pos] = positions.get(pos, 0) + 1
    sq = norms.double().pow(2)
    total = float(sq.sum())  # 0 for an all-zero store: no outliers, a share of 0 rather than 0/0 = NaN
    return {"median_norm": median, "max_norm": float(norms.max()), "n_rows": int(big.numel()),
            "share_of_sum_squares": float(sq[big].sum()) / total if total > 0 else 0.0,
            "positions": dict(sorted(positions.items()))}
