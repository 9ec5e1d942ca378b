"""Saving and loading dictionaries in SAELens's on-disk layout.

One SAE is a folder with `cfg.json` and `sae_weights.safetensors` (W_enc [d_in, d_sae], b_enc, W_dec [d_sae, d_in],
b_dec, plus `threshold` for JumpReLU-style kinds), so `sae_lens.SAE.load_from_disk(folder)` reads ours; we keep our
own settings under the `sparse_coding` key of cfg.json, which SAELens ignores. A sweep (one ensemble) is a folder
of such members plus `sweep.json`.

Activation normalisation is folded into the weights on save: a member that sees x·s (its `input_scale`, set by
`train_sae`; or `input_scale=` here for inputs scaled outside it) behaves, on raw x, like W_enc·s, b_dec/s, W_dec/s
(b_enc and any threshold act on codes, which do not change), so a loaded SAE takes raw activations with input_scale
1, in SAELens and here alike; cfg.json records the scale it was trained at.

Folders are written under a temporary name and renamed into place, and an existing one is never replaced unless
overwrite=True: a killed save leaves the old dictionary intact."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from ..arguments import checked
from ..files import atomic_dir, atomic_write_text, load_json, load_tensors, save_json, save_tensors
from ..paths import resolve
from .base import SAE_KINDS, EnsembleSAE, fold_input_scale
from .factory import make_sae

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SWEEP_FILE = "sweep.json"
# The SAELens config format we write (the 6.x layout); older ones get renamed keys on load.
SAELENS_FORMAT_VERSION = "6.0.0"
# SAELens architectures we can read that SAELens itself saved, mapped to our kinds.
_ARCH_TO_KIND = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu"}


def _folded_state(sae: EnsembleSAE, i: int, input_scale: float) -> dict[str, torch.Tensor]:
    """Member i for raw activations: its own input scale (member_state) and, for an SAE trained on inputs scaled
    outside it, `input_scale` folded in."""
    return fold_input_scale(sae.member_state(i), input_scale)

def _saelens_cfg(sae: EnsembleSAE, i: int, input_scale: float, metadata: Mapping[str, Any]) -> dict[str, Any]:
    h = sae.hparams[i]
    cfg: dict[str, Any] = {
        "architecture": sae.architecture,
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "dtype": str(sae.dtype).removeprefix("torch."),
        "device": "cpu",
        "apply_b_dec_to_input": sae.pre_bias,
        "normalize_activations": "none",  # already folded into the weights
        "reshape_activations": "none",
        "metadata": {"sae_lens_version": SAELENS_FORMAT_VERSION, "sae_lens_training_version": None, **metadata},
        "sparse_coding": {"kind": sae.kind, "tied": sae.tied, "pre_bias": sae.pre_bias,
                          "hparams": h, "input_scale": float(input_scale) * float(sae.input_scale)},
    }
    if "k" in h:
        cfg["k"] = int(h["k"])
        cfg["rescale_acts_by_decoder_norm"] = False
    return cfg


def _check_scale(input_scale: Any) -> float:
    if isinstance(input_scale, bool) or not isinstance(input_scale, (int, float)) or not (
            math.isfinite(input_scale) and input_scale > 0):
        raise ValueError(f"input_scale must be a finite number > 0 (the factor the inputs were multiplied by "
                         f"in training), got {input_scale!r}")
    return float(input_scale)


def _check_finite(state: Mapping[str, torch.Tensor], where: str) -> None:
    for name, t in state.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{where}: tensor {name!r} holds NaN or inf ({int((~torch.isfinite(t)).sum())} "
                             f"entries); the dictionary is damaged or its training diverged")


def _write_member(sae: EnsembleSAE, i: int, folder: Path, input_scale: float, metadata: Mapping[str, Any],
                  metrics: Mapping[str, Any] | None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    state = _folded_state(sae, i, _check_scale(input_scale))
    _check_finite(state, f"member {i} of the SAE being saved to {folder}")
    save_tensors(folder / WEIGHTS_FILE, state)
    save_json(folder / CFG_FILE, _saelens_cfg(sae, i, input_scale, metadata))
    if metrics:
        save_json(folder / "metrics.json", metrics)


@checked
def save_sae(sae: EnsembleSAE, folder: str | os.PathLike, member: int = 0, *, input_scale: float = 1.0,
             metadata: Mapping[str, Any] | None = None, metrics: Mapping[str, Any] | None = None,
             overwrite: bool = False) -> Path:
    """Save one member as a SAELens-layout folder. metadata: model_name, hook_name, context_size, dataset_path..."""
    with atomic_dir(folder, overwrite) as tmp:
        _write_member(sae, member, tmp, input_scale, metadata or {}, metrics)
    return resolve(folder)


@checked
def member_name(i: int) -> str:
    return f"member-{i:03d}"


@checked
def save_sweep(sae: EnsembleSAE, folder: str | os.PathLike, *, input_scale: float = 1.0,
               metadata: Mapping[str, Any] | None = None, member_metrics: Sequence[Mapping[str, Any]] | None = None,
               extra: Mapping[str, Any] | None = None, files: Mapping[str, str] | None = None,
               overwrite: bool = False) -> Path:
    """Save every member of an ensemble (one SAELens folder each) plus sweep.json describing the sweep.
    files: extra text files (name -> content, e.g. the training log as CSV) written into the folder before it is
    renamed into place, so the sweep appears whole or not at all."""
    if member_metrics is not None and len(member_metrics) != sae.n_members:
        raise ValueError(f"member_metrics has {len(member_metrics)} entries for {sae.n_members} members")
    with atomic_dir(folder, overwrite) as tmp:
        for i in range(sae.n_members):
            _write_member(sae, i, tmp / member_name(i), input_scale, metadata or {},
                          member_metrics[i] if member_metrics else None)
        save_json(tmp / SWEEP_FILE, {"config": sae.config, "n_members": sae.n_members,
                                     "input_scale": float(input_scale) * float(sae.input_scale),
                                     "members": [{"folder": member_name(i), "hparams": h}
                                                 for i, h in enumerate(sae.hparams)],
                                     "metadata": dict(metadata or {}), **(extra or {})})
        for name, text in (files or {}).items():
            atomic_write_text(tmp / name, text)
    return resolve(folder)


def _read_member(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    cfg_path, weights_path = folder / CFG_FILE, folder / WEIGHTS_FILE
    if not cfg_path.exists() or not weights_path.exists():
        raise FileNotFoundError(f"{folder} is not an SAE folder: it needs {CFG_FILE} and {WEIGHTS_FILE}")
    cfg, state = load_json(cfg_path), load_tensors(weights_path)
    _check_cfg(cfg, state, folder)
    return cfg, state


# cfg.json fields that change what a SAELens SAE computes, with the values whose computation is ours.
_NEUTRAL = {"normalize_activations": (None, "none"), "reshape_activations": (None, "none")}


def _check_cfg(cfg: Mapping[str, Any], state: Mapping[str, torch.Tensor], folder: Path) -> None:
    """Refuse (naming the file and the field) what would load silently wrong: a normalisation or reshape of the
    activations we do not apply, TopK's rescale_acts_by_decoder_norm with decoder rows not of unit norm, missing
    or misshapen tensors, NaN/inf."""
    where = folder / CFG_FILE
    if not isinstance(cfg, Mapping):
        raise ValueError(f"{where} must hold a JSON object (the SAE's config), got {type(cfg).__name__}")
    for key, ok in _NEUTRAL.items():
        if cfg.get(key) not in ok:
            raise ValueError(f"{where}: {key}={cfg.get(key)!r} is not supported (SAELens applies it to the "
                             f"activations at run time; this loader would silently skip it); fold it into the "
                             f"weights or load the folder with SAELens")
    for key in ("d_in", "d_sae"):
        if not isinstance(cfg.get(key), int) or cfg[key] < 1:
            raise ValueError(f"{where}: {key} must be a positive integer, got {cfg.get(key)!r}")
    d_in, d_sae = cfg["d_in"], cfg["d_sae"]
    expected = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    for name, shape in expected.items():
        if name not in state:
            raise ValueError(f"{folder / WEIGHTS_FILE}: tensor {name!r} is missing (has {sorted(state)})")
        if tuple(state[name].shape) != shape:
            raise ValueError(f"{folder / WEIGHTS_FILE}: {name} has shape {tuple(state[name].shape)}, but {where} "
                             f"says d_in={d_in}, d_sae={d_sae}, so it should be {shape}")
    if cfg.get("rescale_acts_by_decoder_norm"):
        norms = state["W_dec"].float().norm(dim=1)
        if not torch.allclose(norms, torch.ones_like(norms), atol=1e-4):
            raise ValueError(f"{where}: rescale_acts_by_decoder_norm=true with decoder rows of norm "
                             f"{float(norms.min()):.3g}..{float(norms.max()):.3g} is not supported; load the folder "
                             f"with SAELens")
    kind = _kind_and_hparams(cfg, where)[0]
    if kind == "jumprelu" and tuple(state.get("threshold", torch.empty(0)).shape) != (d_sae,):
        raise ValueError(f"{folder / WEIGHTS_FILE}: a JumpReLU SAE needs tensor 'threshold' of shape ({d_sae},), "
                         f"got {tuple(state['threshold'].shape) if 'threshold' in state else 'none'}")
    _check_finite(state, str(folder / WEIGHTS_FILE))


def _k_field(value: Any, field: str, d_sae: Any, where: Any) -> int:
    """TopK's k as a cfg.json gives it: an int in [1, d_sae], else ValueError naming the file and the field."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= (d_sae or value):
        raise ValueError(f"{where}: field {field!r} (the number of active latents per token, which the TopK "
                         f"architecture needs) must be an int in [1, d_sae={d_sae}], got "
                         f"{'nothing' if value is None else repr(value)}")
    return value


def _kind_and_hparams(cfg: Mapping[str, Any], where: Any = CFG_FILE) -> tuple[str, dict[str, Any], bool, bool]:
    """(kind, hyperparameters, tied, pre_bias) from a cfg.json, checking the fields each architecture needs
    (ValueError naming the file and the field)."""
    ours = cfg.get("sparse_coding")
    if ours:
        if not isinstance(ours, Mapping) or ours.get("kind") not in SAE_KINDS or not isinstance(ours.get("hparams"),
                                                                                             Mapping):
            raise ValueError(f"{where}: field 'sparse_coding' must hold 'kind' (one of {sorted(SAE_KINDS)}) and "
                             f"'hparams' (a dict), got {ours!r}")
        h = {k: v for k, v in ours["hparams"].items()}
        if ours["kind"] in ("topk", "batchtopk"):
            _k_field(h.get("k"), "sparse_coding.hparams.k", cfg.get("d_sae"), where)
        return ours["kind"], h, bool(ours.get("tied", False)), bool(ours.get("pre_bias", True))
    arch = cfg.get("architecture", "standard")
    if arch not in _ARCH_TO_KIND or _ARCH_TO_KIND[arch] not in SAE_KINDS:
        readable = [a for a, k in _ARCH_TO_KIND.items() if k in SAE_KINDS]
        raise ValueError(f"{where}: SAELens architecture {arch!r} is not supported here; readable ones: "
                         f"{', '.join(readable)}")
    kind = _ARCH_TO_KIND[arch]
    h: dict[str, Any] = {"seed": 0}
    if kind == "topk":
        h["k"] = _k_field(cfg.get("k"), "k", cfg.get("d_sae"), where)
    if kind == "relu":
        h["l1_coef"] = 0.0  # the training coefficient is not part of SAELens's inference config
    return kind, h, False, bool(cfg.get("apply_b_dec_to_input", True))


def _build(kind: str, d_in: int, d_sae: int, hparams: Sequence[dict[str, Any]], tied: bool, pre_bias: bool,
           device: str | torch.device | None, dtype: torch.dtype) -> EnsembleSAE:
    per_member = {k: [h[k] for h in hparams] for k in hparams[0]}
    return make_sae(kind, d_in, d_sae, tied=tied, pre_bias=pre_bias, device=device, dtype=dtype, **per_member)


_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _dtype(cfg: Mapping[str, Any], dtype: torch.dtype | str | None, folder: Path) -> torch.dtype:
    """The caller's dtype, else the one cfg.json records (float32 when it records none)."""
    name = dtype if dtype is not None else str(cfg.get("dtype") or "float32")
    if isinstance(name, torch.dtype):
        return name
    name = name.removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"{folder / CFG_FILE}: dtype {name!r} is not one of {sorted(_DTYPES)}; pass dtype= to "
                         "load in another")
    return _DTYPES[name]


@checked
def load_sae(folder: str | os.PathLike, device: str | torch.device | None = None,
             dtype: torch.dtype | str | None = None) -> EnsembleSAE:
    """Load one SAE folder (ours or one saved by SAELens) as a 1-member ensemble that takes raw activations, in
    eval mode (inference-ready: BatchTopK uses its threshold, not the batch's top k), in the dtype cfg.json records
    unless `dtype` is given. Raises FileNotFoundError for a folder without cfg.json/weights and ValueError, naming
    the file, for what would load wrong (see `_check_cfg`)."""
    folder = resolve(folder)
    cfg, state = _read_member(folder)
    kind, h, tied, pre_bias = _kind_and_hparams(cfg, folder / CFG_FILE)
    # Loaded untied even if trained tied: the file holds W_enc explicitly (= W_dec.T), and the folded weights of a
    # normalised member are no longer transposes of each other.
    sae = _build(kind, int(cfg["d_in"]), int(cfg["d_sae"]), [h], tied=False, pre_bias=pre_bias, device=device,
                 dtype=_dtype(cfg, dtype, folder))
    sae.load_member_state_(0, {k: v.to(sae.dtype) for k, v in state.items()})
    return sae.eval()


@checked
def load_sweep(folder: str | os.PathLike, device: str | torch.device | None = None,
               dtype: torch.dtype | str | None = None) -> EnsembleSAE:
    """Load a sweep folder (sweep.json + member folders) back into one ensemble, members in saved order, in eval
    mode and the recorded dtype unless `dtype` is given (see load_sae)."""
    folder = resolve(folder)
    if not (folder / SWEEP_FILE).exists():
        raise FileNotFoundError(f"{folder} has no {SWEEP_FILE}: not a sweep folder (use load_sae for one SAE)")
    sweep = load_json(folder / SWEEP_FILE)
    members = [_read_member(folder / m["folder"]) for m in sweep["members"]]
    kinds = {(_kind_and_hparams(cfg)[0], cfg["d_in"], cfg["d_sae"]) for cfg, _ in members}
    if len(kinds) != 1:
        raise ValueError(f"sweep members differ in kind or size ({kinds}); load them one by one with load_sae")
    kind, d_in, d_sae = kinds.pop()
    _, _, _, pre_bias = _kind_and_hparams(members[0][0])
    hparams = [_kind_and_hparams(cfg)[1] for cfg, _ in members]
    sae = _build(kind, int(d_in), int(d_sae), hparams, tied=False, pre_bias=pre_bias, device=device,
                 dtype=_dtype(members[0][0], dtype, folder))
    for i, (_, state) in enumerate(members):
        sae.load_member_state_(i, {k: v.to(sae.dtype) for k, v in state.items()})
    return sae.eval()


@checked
def sweep_info(folder: str | os.PathLike) -> dict[str, Any]:
    return load_json(resolve(folder) / SWEEP_FILE)
