"""Harvest a model's activations at one or more hooks to disk (the layout in `activations.layout`).

    harvest(model, tokens, hooks, n_tokens, out_root, model_name, revision, ...) -> {hook: folder}
    ensure_activations(model, "offline", "final", hook, n_tokens, data_dir=...) -> ActivationStore
    revision_store("offline", "step0", hook, n_tokens, data_dir=...) -> ActivationStore (loads the model if needed)
    model_and_store("offline", "final", hook, n_tokens, data_dir=...) -> (model, ActivationStore)
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Sequence

import torch

from .. import lm
from ..arguments import checked
from ..corpus import contexts
from ..checks import check_bool
from ..files import folder_lock, load_json, save_json
from ..paths import resolve
from .exclusion import Exclusion, norm_limits, resolve_exclusion
from .layout import FORMAT_VERSION, MANIFEST, hook_folder, revision_name, write_chunk
from .settings import HarvestSettings
from .store import ActivationStore

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


@checked
def harvest(model: torch.nn.Module, tokens: torch.Tensor, hooks: Sequence[str], n_tokens: int | None, out_root: str | os.PathLike,
            model_name: str, revision: str | None = None, *, settings: HarvestSettings | None = None,
            progress: bool = True, model_id: str | None = None, **fields: Any) -> dict[str, Path]:
    """Run ``tokens`` through ``model`` and store the activations of every hook in ``hooks``.

    Args:
        model: a TransformerLens model from :func:`sparse_coding.lm.load_model`.
        tokens: LongTensor contexts ``[n_contexts, ctx_len]`` (or a 1-D stream, cut with ``ctx_len``), used in order.
        hooks: hook names, e.g. ``["blocks.0.hook_resid_post", "blocks.2.mlp.hook_post"]``; all come from one pass.
        n_tokens: rows to store per hook, rounded up to whole contexts (or None: the settings' n_tokens).
        out_root: folder under which ``<model>/<revision>/<hook>/`` is created (e.g. ``data/activations``).
        model_name, revision: recorded in the manifest and used in the path.
        settings: how to harvest (`HarvestSettings`: n_tokens, chunk_rows, batch_size, dtype, ctx_len, corpus, seed,
            fast, exclude; each field's unit and default in its docstring); its fields given as keywords override
            it (``harvest(..., dtype=torch.float16)``), a misspelt one is an error.
        model_id: what the model's weights came from (`lm.model_id`: the offline model's training settings), recorded
            in the manifest so that a store made from a model since retrained is refused as stale.
        exclude: positions left out of the dictionaries' inputs (`activations.exclusion`): "auto" (default) leaves
            out position 0, the tokenizer's special tokens and every row over `exclusion.NORM_RATIO` x the median
            norm at its hook when the first position's activations are massive (median norm over
            `exclusion.MASSIVE_RATIO` times the others' in the residual stream at any of the model's
            `lm.default_layers`, whatever the hooks harvested), None nothing, True always, or {"positions": [...],
            "token_ids": [...], "norm_ratio": r}. They are stored (the model saw them) and recorded in the
            manifest as ``exclude`` (with the norm limit measured at that hook on the first 8 contexts,
            ``max_norm``); every reader of the store leaves them out.
        fast: for GPT-NeoX and block-level hooks (resid_pre/post, attn_out, mlp_out, mlp.hook_pre/post) run a lean
            forward on the same weights (fused attention, nothing after the last needed layer); False, or any other
            model or hook, uses the bridge's own hook points with ``stop_at_layer``. Both give the same values.

    Returns {hook: folder}. A folder whose manifest is complete with the same settings (the same text among them:
    the manifest's tokens_sha1) is left as is; a partial one resumes after its last complete chunk; one with
    different settings is an error (delete it or change out_root), as is a hook named twice."""
    cfg = HarvestSettings.build(settings, **({"n_tokens": n_tokens} if n_tokens is not None else {}), **fields)
    n_tokens, chunk_rows, batch_size, dtype = cfg.n_tokens, cfg.chunk_rows, cfg.batch_size, cfg.dtype
    ctx_len, corpus, seed, fast, exclude = cfg.ctx_len, cfg.corpus, cfg.seed, cfg.fast, cfg.exclude
    check_bool(progress, "progress")
    if isinstance(hooks, str) or not hooks or not all(isinstance(h, str) for h in hooks):
        raise ValueError(f"hooks must be a non-empty list of hook names, e.g. ['blocks.0.hook_resid_post'], got "
                         f"{hooks!r}")
    repeated = sorted({h for h in hooks if list(hooks).count(h) > 1})
    if repeated:
        raise ValueError(f"hooks lists {repeated} more than once; name each hook once")
    if not isinstance(tokens, torch.Tensor) or tokens.is_floating_point() or tokens.is_complex():
        raise ValueError(f"tokens must be an integer tensor of token ids [n_contexts, ctx_len] (or a 1-D stream), "
                         f"got {type(tokens).__name__ if not isinstance(tokens, torch.Tensor) else tokens.dtype}")
    if tokens.ndim == 1:
        if ctx_len is None:
            raise ValueError("tokens is a 1-D stream: pass ctx_len to cut it into contexts")
        tokens = contexts(tokens, ctx_len)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [n_contexts, ctx_len], got shape {tuple(tokens.shape)}")
    n_ctx_total, ctx_len = tokens.shape
    n_ctx = getattr(getattr(model, "cfg", None), "n_ctx", None)
    if n_ctx is not None and ctx_len > n_ctx:
        raise ValueError(f"contexts of {ctx_len} tokens exceed the model's n_ctx={n_ctx} (a learned-position model "
                         f"fails, a rotary one runs past its trained length); cut the text into contexts of at "
                         f"most {n_ctx} tokens")
    ctx_per_chunk = max(1, chunk_rows // ctx_len)
    need_ctx = -(-int(n_tokens) // ctx_len)
    if need_ctx > n_ctx_total:
        raise ValueError(f"n_tokens={n_tokens} needs {need_ctx} contexts of {ctx_len} but only {n_ctx_total} were "
                         f"given ({n_ctx_total * ctx_len} tokens); lower n_tokens or pass more text")
    target = need_ctx * ctx_len
    run = lm.hook_reader(model, hooks, fast=fast)  # also validates the hook names against the model
    device = next(model.parameters()).device
    # Massive activations are a property of the model, not of the hooks asked for (they can be absent at one layer
    # and huge at the next: 02_metrics.json's first_position_norm_ratio), so "auto" probes the default layers.
    probe = lm.hook_reader(model, [lm.hook_name("resid_post", L) for L in lm.default_layers(model)], fast=fast)
    exclusion = resolve_exclusion(exclude, probe, tokens[:8].to(device), getattr(model, "tokenizer", None))
    # Each hook's norm limit is measured on this model (a limit passed in, e.g. another revision's, is replaced).
    exclusion = exclusion.with_limits(norm_limits(run, tokens[:8].to(device), exclusion))

    with ExitStack() as locks:
        # Manifests: new, resumed, or already complete.
        folders, manifests, done_ctx = {}, {}, {}
        d_of = {}
        settings = {"model": str(model_name), "revision": revision_name(model_name, revision), "dtype": str(dtype).replace("torch.", ""),
                    "ctx_len": ctx_len, "corpus": corpus, "seed": seed, "target_tokens": target,
                    "chunk_contexts": ctx_per_chunk, "format": FORMAT_VERSION}
        if model_id is not None:
            settings["model_id"] = str(model_id)
        # Which text: a resumed or reused store must hold these tokens' activations, not another text's.
        text = tokens[:need_ctx].cpu().to(torch.int64).numpy().tobytes()
        settings["tokens_sha1"] = hashlib.sha1(text).hexdigest()[:16]
        for h in run.hooks:
            if exclusion:  # absent when nothing is left out, so earlier harvests keep matching
                settings["exclude"] = exclusion.for_hook(h).to_json()
            folder = hook_folder(out_root, model_name, revision, h)
            # Two harvests into one folder would interleave chunks: the second one fails naming the first's pid.
            locks.enter_context(folder_lock(folder, f"harvest {model_name} {revision} {h}"))
            mpath = folder / MANIFEST
            if mpath.exists():
                m = load_json(mpath)
                # A manifest from before model ids (token digests) were recorded matches any id (digest).
                diff = {k: (m.get(k), v) for k, v in settings.items() if m.get(k) != v and k != "exclude"
                        and not (k in ("model_id", "tokens_sha1") and m.get(k) is None)}
                if not Exclusion.from_json(m.get("exclude")).same_as(exclusion.for_hook(h)):
                    diff["exclude"] = (m.get("exclude"), settings.get("exclude"))
                if diff:
                    raise ValueError(f"{folder} holds a harvest with other settings {diff} (theirs, ours); delete the "
                                     f"folder or choose another out_root")
            else:
                m = {**settings, "hook": h, "d": None, "n_tokens": 0, "complete": False, "chunks": [],
                     "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                     "harvest_settings": {k: v for k, v in cfg.to_json().items() if k != "exclude"}}
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
        workers = lm.CPUWorkers(run) if isinstance(run, lm.NeoXFastPath) and device.type == "cpu" else None
        writer = _ChunkWriter()
        # Chunk numbers are counted here, not read back from the manifests the writer thread is still appending to.
        next_index = {h: len(manifests[h]["chunks"]) for h in run.hooks}
        bar = tqdm(total=target, initial=start_ctx * ctx_len, desc="harvest", unit="tok", unit_scale=True,
                   disable=not progress)
        try:
            for c0 in range(start_ctx, need_ctx, ctx_per_chunk):
                c1 = min(c0 + ctx_per_chunk, need_ctx)
                rows = (c1 - c0) * ctx_len
                chunk_tokens = tokens[c0:c1]
                # Hooks already past this chunk (a harvest killed between two hooks' manifests) skip it.
                todo = [h for h in run.hooks if done_ctx[h] <= c0]
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
            for h in run.hooks:
                if manifests[h]["chunks"]:
                    manifests[h]["seconds"] = manifests[h].get("seconds", 0.0) + elapsed
                    save_json(folders[h] / MANIFEST, manifests[h])
        return folders


@checked
def default_dtype(tl: torch.nn.Module) -> torch.dtype:
    """How a model's activations are stored by default: float16 (half the disk) for models of 100M parameters or
    more, whose harvests run to gigabytes per layer, float32 below. float16 keeps 11 significant bits, far finer
    than an SAE's reconstruction error; a value past its range (±65504) would be stored as inf, which the
    trainer refuses (massive first-position activations sit in the excluded positions)."""
    n = sum(p.numel() for p in tl.parameters())
    return torch.float16 if n >= 100_000_000 else torch.float32


@checked
def ensure_activations(tl: torch.nn.Module, model: str, revision: str, hook: str, n_tokens: int | None = None, *,
                       data_dir: str | os.PathLike = "data", settings: HarvestSettings | None = None,
                       progress: bool = True, **fields: Any) -> ActivationStore:
    """The activation store for (model, revision, hook), harvested now if it is missing or short; an existing
    harvest of at least n_tokens is reused as is (also one made by notebook 02 with every layer). settings and
    fields as in `harvest`; here ctx_len defaults to `lm.default_ctx_len` (the model's own, at most 256 tokens),
    dtype to `default_dtype` and corpus to "stdlib". Raises ValueError for a store made from a model that has
    since been retrained (its manifest's model_id is not the model's)."""
    if settings is None:
        fields = {"dtype": default_dtype(tl), "corpus": "stdlib", **fields}
    cfg = HarvestSettings.build(settings, **({"n_tokens": n_tokens} if n_tokens is not None else {}), **fields)
    n_tokens = cfg.n_tokens
    folder = hook_folder(resolve(data_dir) / "activations", model, revision, hook)
    current = lm.model_id(model, data_dir)
    if (folder / MANIFEST).exists():
        store = ActivationStore(folder)
        made_from = store.manifest.get("model_id")
        if current is not None and made_from is not None and made_from != current:
            raise ValueError(f"{folder} was harvested from an earlier {model} model (model_id {made_from}, now "
                             f"{current}): it is stale; delete the folder to harvest it again")
        if store.manifest.get("complete") and store.n_rows >= n_tokens:
            return store
    ctxs = lm.model_contexts(tl, model, data_dir=data_dir, ctx_len=cfg.ctx_len or lm.default_ctx_len(tl))
    harvest(tl, ctxs, [hook], None, resolve(data_dir) / "activations", model, revision, settings=cfg,
            progress=progress, model_id=current)
    return ActivationStore(folder)


@checked
def revision_store(model: str, revision: str, hook: str, n_tokens: int, *, data_dir: str | os.PathLike = "data",
                   device: str | torch.device = "cpu", settings: HarvestSettings | None = None, progress: bool = True,
                   **fields: Any) -> ActivationStore:
    """The store of (model, revision, hook) with at least n_tokens rows, the model loaded (and the hook harvested,
    as `ensure_activations` does) only when it is missing or short, so a rerun touches no model at all. settings
    and fields as in `harvest` (e.g. exclude=: pass the final revision's `store.exclusion` for the others, so that
    every revision leaves out the same positions; a random-init revision has no massive activations to detect).
    Raises ValueError for a hook the model does not fire."""
    folder = hook_folder(resolve(data_dir) / "activations", model, revision, hook)
    if (folder / MANIFEST).exists():
        store = ActivationStore(folder)
        if store.manifest.get("complete") and store.n_rows >= n_tokens:
            return store
    return model_and_store(model, revision, hook, n_tokens, data_dir=data_dir, device=device, settings=settings,
                           progress=progress, **fields)[1]


@checked
def model_and_store(model: str, revision: str, hook: str, n_tokens: int, *, data_dir: str | os.PathLike = "data",
                    device: str | torch.device = "cpu", settings: HarvestSettings | None = None,
                    progress: bool = True, **fields: Any) -> tuple[torch.nn.Module, ActivationStore]:
    """(the model at `revision`, loaded with `lm.load_model`, and its store at `hook` with at least n_tokens rows
    from `ensure_activations`): the setup notebooks 03, 04 and 07 share. Raises ValueError for a hook the model
    does not fire (naming the valid ones)."""
    tl = lm.load_model(lm.model_source(model, data_dir), revision, device=device)
    lm.check_hooks(tl, [hook])
    return tl, ensure_activations(tl, model, revision, hook, n_tokens, data_dir=data_dir, settings=settings,
                                  progress=progress, **fields)
