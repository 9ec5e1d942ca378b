"""Saving and loading dictionaries in SAELens's on-disk layout.

One SAE is a folder with `cfg.json` and `sae_weights.safetensors` (W_enc [d_in, d_sae], b_enc, W_dec [d_sae, d_in],
b_dec, plus `threshold` for JumpReLU-style kinds), so `sae_lens.SAE.load_from_disk(folder)` reads ours; we keep our
own settings under the `sparse_coding` key of cfg.json, which SAELens ignores. A sweep (one ensemble) is a folder
of such members plus `sweep.json`.

A folder is read as SAELens 6 reads it (older configs get its renamed keys and defaults: `_saelens_fields`); what
SAELens would compute differently, or refuse, is refused with a ValueError naming the file and the field.

Activation normalisation is folded into the weights on save: a member that sees x·s (its `input_scale`, set by
`train_sae`; or `input_scale=` here for inputs scaled outside it) behaves, on raw x, like W_enc·s, b_dec/s, W_dec/s
(b_enc and any threshold act on codes, which do not change), so a loaded SAE takes raw activations with input_scale
1, in SAELens and here alike; cfg.json records the scale it was trained at.

Folders are written under a temporary name and renamed into place, and an existing one is never replaced unless
overwrite=True: a killed save leaves the old dictionary intact."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from ..arguments import checked
from ..files import atomic_dir, atomic_write_text, jsonable, load_json, load_tensors, save_json, save_tensors
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
# Keys SAELens before 6.0 wrote under other names (its handle_pre_6_0_config).
_RENAMED = {"hook_point": "hook_name", "hook_point_head_index": "hook_head_index", "activation_fn_str": "activation_fn"}


def _saelens_cfg(sae: EnsembleSAE, i: int, input_scale: float, metadata: Mapping[str, Any]) -> dict[str, Any]:
    h = sae.hparams[i]
    cfg: dict[str, Any] = {
        "architecture": sae.architecture, "d_in": sae.d_in, "d_sae": sae.d_sae,
        "dtype": str(sae.dtype).removeprefix("torch."), "device": "cpu", "apply_b_dec_to_input": sae.pre_bias,
        "normalize_activations": "none", "reshape_activations": "none",  # normalisation is folded into the weights
        # The version says how SAELens reads the layout, which is ours: metadata does not override it.
        "metadata": {"sae_lens_training_version": None, **metadata, "sae_lens_version": SAELENS_FORMAT_VERSION},
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


def _json_dict(obj: Mapping[str, Any] | None, name: str) -> dict[str, Any]:
    """`obj` (a dict of JSON values, or None) as a dict; a ValueError naming `name` and the key JSON cannot hold."""
    if obj is not None and not isinstance(obj, Mapping):
        raise ValueError(f"{name} must be a dict (name -> JSON value), got {type(obj).__name__}")
    for key, value in (obj or {}).items():
        try:
            json.dumps(jsonable(value))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{name}[{key!r}] (a {type(value).__name__}) is not something JSON can hold ({e}); pass "
                             f"numbers, strings, bools, None, lists or dicts of them") from None
    return dict(obj or {})


def _write_member(sae: EnsembleSAE, i: int, folder: Path, dest: Path, input_scale: float,
                  metadata: Mapping[str, Any], metrics: Mapping[str, Any] | None) -> None:
    """Member i into `folder`, the temporary name of `dest` (which errors name), for raw activations: its own input
    scale (member_state) and, for an SAE trained on inputs scaled outside it, `input_scale` folded in."""
    folder.mkdir(parents=True, exist_ok=True)
    state = fold_input_scale(sae.member_state(i), _check_scale(input_scale))
    _check_finite(state, f"{dest} (member {i} of the SAE being saved)")
    save_tensors(folder / WEIGHTS_FILE, state)
    save_json(folder / CFG_FILE, _saelens_cfg(sae, i, input_scale, metadata))
    if metrics:
        save_json(folder / "metrics.json", metrics)


@checked
def save_sae(sae: EnsembleSAE, folder: str | os.PathLike, member: int = 0, *, input_scale: float = 1.0,
             metadata: Mapping[str, Any] | None = None, metrics: Mapping[str, Any] | None = None,
             overwrite: bool = False) -> Path:
    """Save one member as a SAELens-layout folder. metadata: model_name, hook_name, context_size, dataset_path..."""
    metadata, metrics = _json_dict(metadata, "metadata"), _json_dict(metrics, "metrics")
    with atomic_dir(folder, overwrite) as tmp:
        _write_member(sae, member, tmp, resolve(folder), input_scale, metadata, metrics)
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
    metadata, extra = _json_dict(metadata, "metadata"), _json_dict(extra, "extra")
    metrics = [_json_dict(m, f"member_metrics[{i}]") for i, m in enumerate(member_metrics or [None] * sae.n_members)]
    with atomic_dir(folder, overwrite) as tmp:
        for i in range(sae.n_members):
            _write_member(sae, i, tmp / member_name(i), resolve(folder) / member_name(i), input_scale, metadata,
                          metrics[i])
        members = [{"folder": member_name(i), "hparams": h} for i, h in enumerate(sae.hparams)]
        save_json(tmp / SWEEP_FILE, {"config": sae.config, "n_members": sae.n_members, "input_scale": float(
            input_scale) * float(sae.input_scale), "members": members, "metadata": metadata, **extra})
        for name, text in (files or {}).items():
            atomic_write_text(tmp / name, text)
    return resolve(folder)


def _read_member(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], tuple[str, dict, bool, bool]]:
    """(cfg.json as SAELens reads it, the checked weights, `_kind_and_hparams`) of one SAE folder."""
    cfg_path, weights_path = folder / CFG_FILE, folder / WEIGHTS_FILE
    if not cfg_path.exists() or not weights_path.exists():
        raise FileNotFoundError(f"{folder} is not an SAE folder: it needs {CFG_FILE} and {WEIGHTS_FILE}")
    cfg = _saelens_fields(load_json(cfg_path), cfg_path)
    spec = _kind_and_hparams(cfg, cfg_path)
    return cfg, _checked_state(cfg, load_tensors(weights_path), folder), spec


def _pre_6_0(cfg: Mapping[str, Any], where: Path) -> bool:
    """Whether SAELens reads `cfg` as older than 6.0: no sae_lens_version (top level, else in metadata) or one below
    6.0.0-rc.0 (6.0.0's alpha, beta and dev releases among them)."""
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), Mapping) else {}
    version = str(cfg.get("sae_lens_version") or meta.get("sae_lens_version") or "")
    if m := re.fullmatch(r"v?(\d+(?:\.\d+)*)(\S*)", version.strip().lower()):
        n = [int(part) for part in m[1].split(".")]
        return n[0] < 6 or (n[0] == 6 and not any(n[1:]) and re.match(r"[-_.]?(a|b|dev)", m[2]) is not None)
    if version:
        raise ValueError(f"{where}: field 'sae_lens_version' must be a version such as '6.0.0' (it decides how "
                         f"SAELens reads the file), got {version!r}")
    return True


# cfg.json fields that change what a SAELens SAE computes, with the values whose computation is ours.
_NEUTRAL = {"normalize_activations": (None, "none"), "reshape_activations": (None, "none")}


def _saelens_fields(cfg: Any, where: Path) -> dict[str, Any]:
    """cfg.json as SAELens 6 reads it (`handle_pre_6_0_config`): an older config gets the renamed keys, defaults,
    TopK where activation_fn_str is "topk" with activation_fn_kwargs.k, and normalize_activations false/true as
    "none"/"expected_average_only_in". Refused, naming the field: any other activation function (SAELens 6 would
    silently run ReLU), a normalisation or reshape we do not apply, sizes that are not positive integers."""
    if not isinstance(cfg, Mapping):
        raise ValueError(f"{where} must hold a JSON object (the SAE's config), got {type(cfg).__name__}")
    new = dict(cfg)
    if _pre_6_0(cfg, where):
        new = {_RENAMED.get(k, k): v for k, v in cfg.items()}
        new.setdefault("apply_b_dec_to_input", True)
        new.setdefault("architecture", "standard")
        new.setdefault("reshape_activations", "hook_z" if "hook_z" in str(new.get("hook_name") or "") else "none")
        kwargs = new["activation_fn_kwargs"] if isinstance(new.get("activation_fn_kwargs"), Mapping) else {}
        if new.get("activation_fn") == "topk" and kwargs.get("k") is not None:
            new["architecture"] = "topk"
        if new["architecture"] == "topk" and "activation_fn_kwargs" in new:
            new["k"] = _k_field(kwargs.get("k"), "activation_fn_kwargs.k", new.get("d_sae"), where)
        if isinstance(new.get("normalize_activations"), bool):
            new["normalize_activations"] = "expected_average_only_in" if new["normalize_activations"] else "none"
    field = "activation_fn_str" if "activation_fn_str" in cfg else "activation_fn"
    fn = new.get("activation_fn", new.get("activation_fn_str"))
    if fn not in (None, "relu") and not (fn == "topk" and new.get("architecture") == "topk"):
        raise ValueError(f"{where}: {field}={fn!r} is not supported: only 'relu', or 'topk' with activation_fn_kwargs"
                         f".k, are computed here (SAELens 6 would silently run ReLU); load it with the SAELens that "
                         f"wrote it")
    for key, ok in _NEUTRAL.items():
        if new.get(key) not in ok:
            raise ValueError(f"{where}: {key}={new.get(key)!r} is not supported (SAELens applies it to the "
                             f"activations at run time; this loader would silently skip it); fold it into the "
                             f"weights or load the folder with SAELens")
    for key in ("d_in", "d_sae"):
        if isinstance(new.get(key), bool) or not isinstance(new.get(key), int) or new[key] < 1:
            raise ValueError(f"{where}: {key} must be a positive integer, got {new.get(key)!r}")
    return new


def _checked_state(cfg: Mapping[str, Any], state: dict[str, torch.Tensor], folder: Path) -> dict[str, torch.Tensor]:
    """The weights as SAELens loads them, else ValueError naming the file: a `scaling_factor` of all ones dropped
    (another refused), log_threshold as threshold = exp(log_threshold), just the architecture's tensors, shaped as
    cfg.json says, finite; rescale_acts_by_decoder_norm only with unit-norm decoder rows. A threshold below 0 loads as
    0: SAELens's codes relu(z)·H(z − θ) are then ours, z·H(z − θ), at θ = 0."""
    path, arch, d_in, d_sae = folder / WEIGHTS_FILE, cfg.get("architecture", "standard"), cfg["d_in"], cfg["d_sae"]
    state = dict(state)
    if "scaling_factor" in state and not torch.allclose(scale := state.pop("scaling_factor").float(),
                                                        torch.ones_like(scale)):
        raise ValueError(f"{path}: tensor 'scaling_factor' is not all ones (finetuning_scaling_factor="
                         f"{cfg.get('finetuning_scaling_factor')!r} in {CFG_FILE}): pre-6.0 SAELens scaled the codes "
                         f"by it, which neither this loader nor SAELens 6 does; multiply W_dec's rows by it, delete it")
    if arch == "jumprelu" and "log_threshold" in state:  # SAELens's JumpReLU training checkpoints
        state["threshold"] = state.pop("log_threshold").exp()
    expected = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    expected.update({"threshold": (d_sae,)} if arch == "jumprelu" else {})
    if unknown := sorted(set(state) - set(expected)):
        raise ValueError(f"{path}: unexpected tensor(s) {', '.join(map(repr, unknown))}: SAELens architecture "
                         f"{arch!r} has {', '.join(expected)} and refuses others; delete them, or load with what wrote "
                         f"them")
    for name, shape in expected.items():
        if name not in state:
            raise ValueError(f"{path}: tensor {name!r} is missing ({arch!r} needs {', '.join(expected)})")
        if tuple(state[name].shape) != shape:
            raise ValueError(f"{path}: {name} has shape {tuple(state[name].shape)}, but {folder / CFG_FILE} "
                             f"says d_in={d_in}, d_sae={d_sae}, so it should be {shape}")
    _check_finite(state, str(path))
    norms = state["W_dec"].float().norm(dim=1)
    if cfg.get("rescale_acts_by_decoder_norm") and not torch.allclose(norms, torch.ones_like(norms), atol=1e-4):
        raise ValueError(f"{folder / CFG_FILE}: rescale_acts_by_decoder_norm=true with decoder rows of norm "
                         f"{float(norms.min()):.3g}..{float(norms.max()):.3g} is not supported; load it with SAELens")
    if "threshold" in state:
        state["threshold"] = state["threshold"].clamp(min=0)
    return state


def _k_field(value: Any, field: str, d_sae: Any, where: Any) -> int:
    """TopK's k as a cfg.json gives it: an int in [1, d_sae], else ValueError naming the file and the field."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= (d_sae or value):
        raise ValueError(f"{where}: field {field!r} (TopK's number of active latents per token) must be an int in "
                         f"[1, d_sae={d_sae}], got {'nothing' if value is None else repr(value)}")
    return value


def _kind_and_hparams(cfg: Mapping[str, Any], where: Any = CFG_FILE) -> tuple[str, dict[str, Any], bool, bool]:
    """(kind, hyperparameters, tied, pre_bias) from `_saelens_fields`'s cfg, checking the fields each architecture
    needs and that our `sparse_coding` block agrees with the SAELens fields (ValueError naming file and fields)."""
    arch = cfg.get("architecture", "standard")
    if arch not in _ARCH_TO_KIND or _ARCH_TO_KIND[arch] not in SAE_KINDS:
        readable = [a for a, k in _ARCH_TO_KIND.items() if k in SAE_KINDS]
        raise ValueError(f"{where}: SAELens architecture {arch!r} is not supported here; readable ones: "
                         f"{', '.join(readable)}")
    pre_bias = bool(cfg.get("apply_b_dec_to_input", True))
    k = _k_field(cfg.get("k"), "k", cfg.get("d_sae"), where) if arch == "topk" else None
    if not (ours := cfg.get("sparse_coding")):  # a ReLU's training l1_coef is not in SAELens's inference config
        h = {"seed": 0, **({"k": k} if arch == "topk" else {}), **({"l1_coef": 0.0} if arch == "standard" else {})}
        return _ARCH_TO_KIND[arch], h, False, pre_bias
    if not (isinstance(ours, Mapping) and ours.get("kind") in SAE_KINDS and isinstance(ours.get("hparams"), Mapping)):
        raise ValueError(f"{where}: field 'sparse_coding' must hold 'kind' (one of {sorted(SAE_KINDS)}) and "
                         f"'hparams' (a dict), got {ours!r:.200}")
    kind, h, mine = ours["kind"], dict(ours["hparams"]), ours.get("pre_bias", True)
    if kind in ("topk", "batchtopk"):
        _k_field(h.get("k"), "sparse_coding.hparams.k", cfg.get("d_sae"), where)
    for field, theirs, our_field, ours_value, same in (
            ("architecture", arch, "sparse_coding.kind", kind, SAE_KINDS[kind].architecture == arch),
            ("k", k, "sparse_coding.hparams.k", h.get("k"), k is None or k == h.get("k")),
            ("apply_b_dec_to_input", pre_bias, "sparse_coding.pre_bias", mine, bool(mine) == pre_bias)):
        if not same:
            raise ValueError(f"{where}: fields {field!r} = {theirs!r} (what SAELens reads) and {our_field!r} = "
                             f"{ours_value!r} (ours) disagree, so SAELens and this loader would compute different "
                             f"codes (edited after saving?): make them agree, or delete 'sparse_coding'")
    return kind, h, bool(ours.get("tied", False)), pre_bias


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
    if (name := name.removeprefix("torch.")) not in _DTYPES:
        raise ValueError(f"{folder / CFG_FILE}: dtype {name!r} is not one of {sorted(_DTYPES)}; pass dtype= to "
                         "load in another")
    return _DTYPES[name]


@checked
def load_sae(folder: str | os.PathLike, device: str | torch.device | None = None,
             dtype: torch.dtype | str | None = None) -> EnsembleSAE:
    """Load one SAE folder (ours or any SAELens version's) as a 1-member ensemble that takes raw activations, in eval
    mode (BatchTopK uses its threshold), in the dtype cfg.json records unless `dtype` is given. FileNotFoundError for
    a folder without cfg.json or weights; ValueError, naming file and field, for what SAELens would run otherwise."""
    folder = resolve(folder)
    cfg, state, (kind, h, _, pre_bias) = _read_member(folder)
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
    path = (folder := resolve(folder)) / SWEEP_FILE
    if not path.exists():
        raise FileNotFoundError(f"{folder} has no {SWEEP_FILE}: not a sweep folder (use load_sae for one SAE)")
    sweep = load_json(path)
    entries = sweep.get("members") if isinstance(sweep, Mapping) else sweep
    if not isinstance(entries, list) or not entries or not all(
            isinstance(m, Mapping) and isinstance(m.get("folder"), str) and m["folder"] for m in entries):
        raise ValueError(f"{path} must hold a JSON object whose field 'members' is a non-empty list of {{'folder': "
                         f"<member folder>, ...}}, one per SAE as save_sweep writes it, got {entries!r:.200}; save the "
                         f"sweep again, or load its member folders one by one with load_sae")
    members = [_read_member(folder / m["folder"]) for m in entries]
    kinds = {(kind, cfg["d_in"], cfg["d_sae"], pre_bias) for cfg, _, (kind, _, _, pre_bias) in members}
    if len(kinds) != 1:
        raise ValueError(f"{path}: the members differ in kind, size or apply_b_dec_to_input ({sorted(kinds)}); "
                         f"load them one by one with load_sae")
    kind, d_in, d_sae, pre_bias = kinds.pop()
    sae = _build(kind, int(d_in), int(d_sae), [h for _, _, (_, h, _, _) in members], tied=False, pre_bias=pre_bias,
                 device=device, dtype=_dtype(members[0][0], dtype, folder / entries[0]["folder"]))
    for i, (_, state, _) in enumerate(members):
        sae.load_member_state_(i, {k: v.to(sae.dtype) for k, v in state.items()})
    return sae.eval()


@checked
def sweep_info(folder: str | os.PathLike) -> dict[str, Any]:
    return load_json(resolve(folder) / SWEEP_FILE)
