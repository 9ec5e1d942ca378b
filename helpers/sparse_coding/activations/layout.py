"""The on-disk layout of harvested activations: one folder per (model, revision, hook) holding chunk files.

    <out_root>/<model>/<revision>/<hook>/manifest.json
    <out_root>/<model>/<revision>/<hook>/chunk-00000.safetensors   acts [rows, d] (float32 or float16),
                                                                  tokens [rows] (int32: the token at each row)

``manifest.json`` holds model, revision, hook, d, dtype, n_tokens (rows listed so far), target_tokens, ctx_len,
corpus, seed, complete, and the chunk list with each chunk's rows, bytes and crc32. A chunk is written to a
temporary file, renamed into place, and only then added to the manifest (itself replaced atomically), so a killed
harvest leaves a manifest listing only whole chunks.

Chunks hold whole contexts in corpus order: row ``r`` of the folder is position ``r % ctx_len`` of context
``r // ctx_len``."""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from ..arguments import checked
from ..checks import check_choice
from .. import lm
from ..files import atomic_path
from ..paths import resolve

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int32: "I32",
              torch.int64: "I64"}
_NP_DTYPES = {"F32": np.float32, "F16": np.float16, "I32": np.int32, "I64": np.int64}


class ChunkError(RuntimeError):
    """A chunk file is missing, truncated, or does not match its manifest entry."""


@checked
def safe_name(name: str) -> str:
    """A model name as one folder name: ``EleutherAI/pythia-70m`` -> ``EleutherAI__pythia-70m``. Never a name the
    file system reads as a path step (``.``, ``..``): those would put the folder beside or above its parent."""
    out = re.sub(r"[^\w.\-]+", "__", str(name)).strip("_")
    return out if out.strip(".") else "model"


def revision_name(model_name: str, revision: str | None) -> str:
    """The revision as manifests record it: a hub model's "final"/None is its "main" ref; a local model's None is
    "final"."""
    return lm.hub_revision(revision) if lm.is_hub_name(str(model_name)) else (revision or "final")


@checked
def hook_folder(out_root: str | os.PathLike, model_name: str, revision: str | None, hook: str) -> Path:
    """out_root/<model>/<revision>/<hook>, each part one folder name (`safe_name`: a hook name such as
    ``blocks.2.hook_resid_post`` is kept as is; ``..`` or ``/etc`` cannot lead outside out_root)."""
    return resolve(out_root) / safe_name(model_name) / safe_name(revision_name(model_name, revision)) / safe_name(hook)


# ----------------------------------------------------------------------------------------------------- chunk files

@checked
def write_chunk(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
                ) -> tuple[int, str]:
    """Write a safetensors file straight from the tensors' memory (no serialised copy of a ~100 MB chunk), to a
    temporary name then renamed. Returns (bytes, crc32 of the whole file as 8 hex digits). Readable by
    ``safetensors.safe_open``. CRC-32 rather than a cryptographic hash: it is there to catch damaged files, at a
    fraction of sha256's cost. Raises ValueError, before writing, for a tensor whose dtype the format here does not
    hold (float32/float16/bfloat16, int32/int64); note that `open_chunk` maps float32/float16/int32/int64 only."""
    for name, t in tensors.items():
        if t.dtype not in _ST_DTYPES:
            raise ValueError(f"write_chunk: tensor {name!r} is {t.dtype}, which a chunk cannot hold; convert it to "
                             f"one of {', '.join(map(str, _ST_DTYPES))} (e.g. .float() or .to(torch.int32))")
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
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            for piece in (struct.pack("<Q", len(hbytes)), hbytes, *(memoryview(a.reshape(-1)).cast("B") for a in arrays)):
                f.write(piece)
                crc = zlib.crc32(piece, crc)
            f.flush()
            os.fsync(f.fileno())
    return 8 + len(hbytes) + offset, f"{crc:08x}"


@checked
def open_chunk(path: Path, expect_rows: int | None = None, expect_bytes: int | None = None) -> dict[str, np.ndarray]:
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
            if info["dtype"] not in _NP_DTYPES:
                # A valid file numpy cannot map (bfloat16): not damage, so no advice to delete it.
                raise ChunkError(f"chunk {path} stores {name!r} as {info['dtype']}, which cannot be memory-mapped; "
                                 f"the readers take {', '.join(_NP_DTYPES)}: rewrite it with .float() tensors")
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


@checked
def chunk_checksum(path: Path, kind: str = "crc32") -> str:
    """The checksum of a whole chunk file as the manifest records it: crc32 (8 hex digits) or, in manifests written
    before crc32, sha256. Raises ValueError for any other kind (it would otherwise silently be sha256)."""
    check_choice(kind, "kind", ("crc32", "sha256"))
    h, crc = hashlib.sha256(), 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            if kind == "crc32":
                crc = zlib.crc32(block, crc)
            else:
                h.update(block)
    return f"{crc:08x}" if kind == "crc32" else h.hexdigest()
