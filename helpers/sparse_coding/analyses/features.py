"""A dictionary's features on held-out text: mine them once (`analyses.mining`) with the model and the hook the
dictionary was trained on, save what was kept beside the dictionary (safetensors + JSON), reuse it on rerun, and
rebuild the examples of any feature — also at token positions the mining pass only sampled.

    mined = mine_dictionary(model, sae, hook, tokens, folder=sweep_folder / "member-000")
    mined.top_examples(f), mined.moments()["kurtosis"][f], examples_at(model, sae, hook, mined, f, locations)
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..arguments import checked
from .. import lm
from ..activations import Exclusion
from ..checks import check_int
from ..files import atomic_dir, load_json, load_tensors, save_json, save_tensors
from ..paths import resolve
from .mining import FORMAT, Example, Mined, RowPicks, mine
from .reconstruction import eval_mode

MINED_FILE = "mined.safetensors"
MINED_META = "mined.json"
_FIELDS = ["count", "power_sums", "hist", "top_value", "top_context", "top_position", "top_acts",
           "random_value", "random_context", "random_position", "random_acts", "sample_value", "sample_context",
           "sample_position", "sample_acts"]


@checked
def sae_encoder(sae: Any, member: int = 0) -> Callable[[torch.Tensor], torch.Tensor]:
    """activations [rows, d_in] -> codes [rows, d_sae] of one member, in eval mode (a loaded BatchTopK encodes
    with its inference threshold), on the SAE's device and dtype. Each call gives the SAE back its train/eval mode."""
    check_int(member, "member", 0, int(sae.n_members) - 1, " (an index into the ensemble)")

    @torch.no_grad()
    def encode(x: torch.Tensor) -> torch.Tensor:
        with eval_mode(sae):
            return sae.encode(x.to(device=sae.device, dtype=sae.dtype))[member]

    return encode


@checked
def sae_picks_encoder(sae: Any, member: int = 0) -> Callable[[torch.Tensor], torch.Tensor | RowPicks]:
    """`sae_encoder` for `mining.mine`: where the SAE chooses each row's codes itself (a TopK SAE's k per row,
    `encode_picks`), activations [rows, d_in] -> `RowPicks` (values, latents [rows, k]), else the dense codes
    [rows, d_sae]. The same mining result either way, without the dense codes (a TopK SAE of 32768 latents:
    512 MB per 4096 tokens, and a pass over all of them to find the firing pairs)."""
    check_int(member, "member", 0, int(sae.n_members) - 1, " (an index into the ensemble)")
    picks_of = getattr(sae, "encode_picks", None)

    @torch.no_grad()
    def encode(x: torch.Tensor) -> torch.Tensor | RowPicks:
        x = x.to(device=sae.device, dtype=sae.dtype)
        with eval_mode(sae):
            picks = picks_of(x) if picks_of is not None else None
            if picks is None:
                return sae.encode(x)[member]
        return RowPicks(picks[0][member], picks[1][member], int(sae.d_sae))

    return encode


def check_width(model, sae: Any, hook: str, read: Callable | None = None) -> int:
    """The hook's activation width, checked against the SAE's d_in (ValueError naming both and the fix)."""
    read = read or lm.hook_reader(model, [hook])
    dev = next(model.parameters()).device
    width = int(read(torch.zeros(1, 2, dtype=torch.long, device=dev))[hook].shape[-1])
    if width != int(sae.d_in):
        raise ValueError(f"the dictionary has d_in={sae.d_in} but hook {hook!r} has width {width}: use the model "
                         f"and hook the dictionary was trained on (its cfg.json metadata names them)")
    return width


def _weights_digest(sae: Any, member: int) -> str:
    """The member's weights and what else decides its codes: its kind and hyperparameters (two TopK SAEs of the same
    weights and another k encode differently) and the input scale."""
    h = hashlib.sha1(json.dumps([type(sae).__name__, getattr(sae, "architecture", None), sae.hparams[member],
                                 float(getattr(sae, "input_scale", 1.0))], sort_keys=True, default=str).encode())
    for name, t in sorted(sae.member_state(member).items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _model_digest(model: torch.nn.Module) -> str:
    """A fingerprint of the model's weights (its source and revision name them only as loaded: a model changed in
    place, or one not built by `lm.load_model`, would share a cache otherwise): per tensor its name, dtype, shape,
    float64 sum and up to 4096 entries at a fixed stride. Hashing every weight would copy the whole model on each
    call, cache hits included (device to host on a GPU)."""
    h = hashlib.sha1()
    for name, t in sorted(model.state_dict().items()):
        flat = t.detach().reshape(-1)
        total = float(flat.sum(dtype=torch.float64)) if flat.numel() else 0.0
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}:{total!r}".encode())
        sample = flat[::max(1, flat.numel() // 4096)][:4096].contiguous().cpu()
        h.update(sample.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _key(settings: dict, tokens: torch.Tensor) -> str:
    h = hashlib.sha1(json.dumps(settings, sort_keys=True).encode())
    h.update(tokens.to(torch.int64).numpy().tobytes())
    return h.hexdigest()[:12]


@checked
def save_mined(mined: Mined, folder: str | os.PathLike, overwrite: bool = False) -> Path:
    """mined.safetensors (every tensor, tokens as int32) + mined.json (meta), written as one folder atomically."""
    with atomic_dir(folder, overwrite=overwrite) as tmp:
        tensors = {name: getattr(mined, name) for name in _FIELDS}
        tensors["tokens"] = mined.tokens.to(torch.int32)
        save_tensors(Path(tmp) / MINED_FILE, tensors)
        save_json(Path(tmp) / MINED_META, mined.meta)
    return resolve(folder)


@checked
def load_mined(folder: str | os.PathLike) -> Mined:
    """Inverse of `save_mined`. ValueError naming the folder when it was mined in another format (`mining.FORMAT`,
    meta "format": e.g. the old grid anchored at the first batch's max) or a tensor is missing."""
    folder = resolve(folder)
    meta = load_json(folder / MINED_META)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{folder} was mined in format {meta.get('format', 1)}, this code reads format {FORMAT} "
                         f"(histograms on a fixed grid, order-free samples): delete the folder to mine again")
    t = load_tensors(folder / MINED_FILE)
    missing = [n for n in _FIELDS + ["tokens"] if n not in t]
    if missing:
        raise ValueError(f"{folder / MINED_FILE} lacks {', '.join(missing)}; delete the folder to mine again")
    return Mined(t["tokens"].long(), *(t[n] for n in _FIELDS), meta=meta)


@checked
def mine_dictionary(model: torch.nn.Module, sae: Any, hook: str, tokens: torch.Tensor, *, member: int = 0,
                    folder: str | os.PathLike | None = None, batch_size: int | None = None, n_top: int = 20,
                    n_random: int = 5, per_bin: int = 4, window: tuple[int, int] | None = (12, 4), seed: int = 0,
                    exclude: Exclusion | None = None, progress: bool = True) -> Mined:
    """Mine every feature of one member of `sae` on `tokens` [n_contexts, ctx_len] read at `hook` of `model`.

    batch_size: contexts per forward pass (default: about 4096 tokens' worth; the result depends on it only through
    the float rounding of the batched forward pass). With `folder` (e.g. the member's dictionary folder), the result
    is saved in `folder/mining-<key>/` and reused when the same dictionary weights, model, settings (the batch size
    aside) and tokens come again in the same format (`mining.FORMAT` is part of the key: a cache mined by older code
    is never reused; the key holds the dictionary's kind and hyperparameters and the model's weights too). exclude:
    positions left out of the dictionary's inputs, as its cfg.json records them (`activations.exclusion_of(cfg)`);
    see `mining.mine`. Raises ValueError when the hook is not the model's or its width is not the dictionary's d_in,
    for token ids outside the model's vocabulary, a negative window, and contexts longer than the model's n_ctx."""
    lm.check_hooks(model, [hook])
    lm.check_token_ids(tokens, getattr(getattr(model, "cfg", None), "d_vocab", None))
    n_ctx = getattr(getattr(model, "cfg", None), "n_ctx", None)
    if n_ctx is not None and tokens.shape[1] > n_ctx:
        raise ValueError(f"contexts of {tokens.shape[1]} tokens exceed the model's n_ctx={n_ctx}; cut them with "
                         f"tokens[:, :{n_ctx}] or use lm.held_out_contexts")
    read_all = lm.hook_reader(model, [hook])
    check_width(model, sae, hook, read_all)
    batch_size = batch_size or max(1, 4096 // tokens.shape[1])
    rec = lm.loaded(model)
    settings = {"format": FORMAT, "weights": _weights_digest(sae, member),
                "model": [rec.source, rec.revision] if rec else None, "hook": hook, "member": member, "n_top": n_top,
                "n_random": n_random, "per_bin": per_bin, "window": list(window) if window else None, "seed": seed,
                "d_sae": int(sae.d_sae), "shape": list(tokens.shape),
                **({"exclude": exclude.to_json()} if exclude else {})}
    if folder is not None:
        settings["model_weights"] = _model_digest(model)
    cache = resolve(folder) / f"mining-{_key(settings, tokens)}" if folder is not None else None
    if cache is not None and (cache / MINED_FILE).exists():
        return load_mined(cache)
    dev = next(model.parameters()).device
    mined = mine(lambda tb: read_all(tb.to(dev)), {"sae": (hook, sae_picks_encoder(sae, member))}, tokens,
                 batch_size=batch_size, n_top=n_top, n_random=n_random, per_bin=per_bin, window=window, seed=seed,
                 exclude=exclude, progress=progress)["sae"]
    mined.meta.update(settings)
    if cache is not None:
        save_mined(mined, cache, overwrite=True)
    return mined


def check_feature(mined: Mined, latent: int, allow_dead: bool = False) -> int:
    """`latent` (a feature's index), refusing one out of range, or (unless allow_dead) one that never fired on the
    mined text, naming the fix."""
    check_int(latent, "latent", 0, mined.n_directions - 1, f" (the dictionary has {mined.n_directions} features)")
    if not allow_dead and int(mined.count[latent]) == 0:
        raise ValueError(f"feature {latent} never fired on the {mined.n_tokens} mined tokens (a dead feature): pick "
                         f"a live one, e.g. one of {mined.count.nonzero().squeeze(1)[:5].tolist()}")
    return int(latent)


@checked
@torch.no_grad()
def examples_at(model: torch.nn.Module, sae: Any, hook: str, mined: Mined, latent: int,
                locations: Sequence[tuple[int, int, float]], member: int = 0) -> list[Example]:
    """Examples (windows as `mined` keeps them) of the feature of index `latent` at (context, position, value)
    locations of the mined text, recomputed with one forward pass over the contexts involved (e.g.
    `mined.quantile_locations`); positions the mining excluded read 0, as they did there. ValueError for a hook or
    member other than the ones `mine_dictionary` recorded, and for a location outside the mined text."""
    latent = check_feature(mined, latent, allow_dead=True)
    for key, value in (("hook", hook), ("member", member)):  # as mine_dictionary recorded them
        if mined.meta.get(key, value) != value:
            raise ValueError(f"{key}={value!r} but these features were mined with {key}={mined.meta[key]!r}: pass "
                             f"the same, or the examples would be of other codes than the mined values")
    if not locations:
        return []
    N, T = mined.tokens.shape
    bad = [loc for loc in locations if not (0 <= loc[0] < N and 0 <= loc[1] < T)]
    if bad:
        raise ValueError(f"locations must be (context in [0, {N}), position in [0, {T}), value), got {bad[0]!r}")
    ctxs = sorted({c for c, _, _ in locations})
    dev = next(model.parameters()).device
    tokens = mined.tokens[ctxs]
    acts = lm.hook_reader(model, [hook])(tokens.to(dev))[hook]
    codes = sae_encoder(sae, member)(acts.reshape(len(ctxs) * T, -1))[:, latent]
    codes = codes.reshape(len(ctxs), T).float().cpu()
    if mined.meta.get("exclude"):  # positions the mining left out read 0 there: here too
        codes = codes * Exclusion.from_json(mined.meta["exclude"]).keep(tokens, acts, hook).cpu()
    row = {c: i for i, c in enumerate(ctxs)}
    window = mined.meta.get("window")
    out = []
    for c, p, v in locations:
        toks, target = mined.window_tokens(c, p)
        if window is None:
            a = codes[row[c]].tolist()
        else:
            idx = torch.arange(p - window[0], p + window[1] + 1)
            ok = (idx >= 0) & (idx < T)
            a = torch.where(ok, codes[row[c], idx.clamp(0, T - 1)], torch.full(idx.shape, float("nan"))).tolist()
        out.append(Example(c, p, float(codes[row[c], p]), toks, a, target))
    return out
