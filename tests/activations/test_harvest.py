"""activations: one pass harvests every hook, chunks resume after a kill, the reader shuffles exactly and names
broken files."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import train_tiny  # the same tiny trained model the lm tests use
from sparse_coding import activations as A
from sparse_coding import lm
from sparse_coding.activations import harvester as harvest_module
from sparse_coding.files import load_json, save_json

HOOKS = ["blocks.0.hook_resid_post", "blocks.0.mlp.hook_post"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("acts")
    train_tiny(root, steps=4)
    out = lm.offline_dir(root / "data")
    return lm.load_model(out), lm.validation_contexts(out, split="train"), root


def fake_folder(root: Path, chunk_rows=(50, 30, 20), d=3, name="fake") -> Path:
    """A harvest folder written directly: row r has acts[r, 0] == r, so order and coverage are checkable."""
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    chunks, start = [], 0
    for i, rows in enumerate(chunk_rows):
        acts = torch.zeros(rows, d)
        acts[:, 0] = torch.arange(start, start + rows, dtype=torch.float32)
        nbytes, sha = A.write_chunk(folder / f"chunk-{i:05d}.safetensors",
                                    {"acts": acts, "tokens": torch.arange(start, start + rows, dtype=torch.int32)})
        chunks.append({"file": f"chunk-{i:05d}.safetensors", "rows": rows, "bytes": nbytes, "crc32": sha})
        start += rows
    save_json(folder / A.MANIFEST, {"model": "fake", "revision": "final", "hook": "h", "d": d, "dtype": "float32",
                                    "n_tokens": start, "target_tokens": start, "ctx_len": 10, "corpus": "",
                                    "seed": 0, "complete": True, "chunks": chunks})
    return folder


def test_harvest_matches_run_with_cache_and_writes_manifest(tiny, tmp_path):
    model, ctx, _ = tiny
    folders = A.harvest(model, ctx, HOOKS, n_tokens=100, out_root=tmp_path, model_name="tiny/model", revision="step4",
                        chunk_rows=48, batch_size=2, corpus="texts", progress=False)
    n = 7 * 16  # 100 tokens round up to whole 16-token contexts
    _, cache = model.run_with_cache(ctx[:7], names_filter=HOOKS)
    for h in HOOKS:
        folder = folders[h]
        assert folder == tmp_path / "tiny__model" / "step4" / h
        m = load_json(folder / "manifest.json")
        assert m["complete"] and m["n_tokens"] == n and m["hook"] == h and m["model"] == "tiny/model"
        assert m["ctx_len"] == 16 and m["corpus"] == "texts" and m["dtype"] == "float32"
        assert [c["rows"] for c in m["chunks"]] == [48, 48, 16]  # whole contexts per chunk (48 = 3 x 16)
        store = A.ActivationStore(folder)
        assert store.n_tokens == n and store.d == cache[h].shape[-1]
        torch.testing.assert_close(store.all(), cache[h].reshape(n, -1), atol=1e-5, rtol=1e-5)
        assert torch.equal(store.tokens, ctx[:7].reshape(-1))
        toks, pos = store.context_of(37)
        assert torch.equal(toks, ctx[2]) and pos == 5
    from safetensors.torch import load_file  # our hand-written chunks are standard safetensors
    assert load_file(str(folders[HOOKS[0]] / "chunk-00000.safetensors"))["acts"].shape == (48, 32)


def test_one_pass_stops_after_the_last_layer_needed(tiny, tmp_path):
    model, ctx, _ = tiny
    calls = {"block0": 0, "block1": 0}
    h0 = model.blocks[0].register_forward_pre_hook(lambda *a: calls.__setitem__("block0", calls["block0"] + 1))
    h1 = model.blocks[1].register_forward_pre_hook(lambda *a: calls.__setitem__("block1", calls["block1"] + 1))
    try:
        # exclude=None: "auto" would add one detection pass over 8 contexts (tested in test_exclusion.py)
        A.harvest(model, ctx, HOOKS, n_tokens=64, out_root=tmp_path, model_name="m", batch_size=2, progress=False,
                  fast=False, exclude=None)
    finally:
        h0.remove()
        h1.remove()
    assert calls == {"block0": 2, "block1": 0}  # 4 contexts / batch 2 = 2 passes, block 1 never entered
    assert lm.NeoXFastPath(model, HOOKS).last == 0  # the lean path also stops after block 0


def test_fast_path_equals_bridge_hooks_for_every_supported_hook(tiny, tmp_path):
    model, ctx, _ = tiny
    hooks = [f"blocks.{L}.{k}" for L in range(2) for k in sorted(lm.NeoXFastPath.SUPPORTED)]
    assert lm.NeoXFastPath.applies(model, hooks)
    assert not lm.NeoXFastPath.applies(model, ["blocks.0.attn.hook_pattern"])
    fast = A.harvest(model, ctx, hooks, 64, tmp_path / "fast", "m", progress=False)
    slow = A.harvest(model, ctx, hooks, 64, tmp_path / "slow", "m", progress=False, fast=False)
    for h in hooks:
        torch.testing.assert_close(A.ActivationStore(fast[h]).all(), A.ActivationStore(slow[h]).all(),
                                   atol=1e-5, rtol=1e-5)
    # A hook only the bridge has (the attention pattern is not a [rows, d] activation, but any hook name works).
    other = A.harvest(model, ctx, ["blocks.1.ln2.hook_normalized"], 32, tmp_path / "other", "m", progress=False)
    _, cache = model.run_with_cache(ctx[:2], names_filter=["blocks.1.ln2.hook_normalized"])
    torch.testing.assert_close(A.ActivationStore(other["blocks.1.ln2.hook_normalized"]).all(),
                               cache["blocks.1.ln2.hook_normalized"].reshape(32, -1), atol=1e-5, rtol=1e-5)


def test_harvest_on_two_cpu_threads_runs_batches_side_by_side_and_matches(tiny, tmp_path, monkeypatch):
    """With 2+ torch threads the lean path runs batches on worker threads (one intra-op thread each), cut into
    passes of at most ROWS_PER_CALL rows: same values, same chunk files, rows in order, and the caller's thread
    count back afterwards."""
    model, ctx, _ = tiny
    hooks = ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_post", "blocks.1.hook_mlp_out"]
    kw = dict(n_tokens=160, model_name="m", chunk_rows=160, batch_size=3, progress=False)
    monkeypatch.setattr(lm.CPUWorkers, "ROWS_PER_CALL", 2 * ctx.shape[1])  # batches of 3 become passes of 2 + 1
    serial = A.harvest(model, ctx, hooks, out_root=tmp_path / "serial", **kw)
    used = []
    real_init = lm.CPUWorkers.__init__

    def spy(self, fn):
        real_init(self, fn)
        used.append(bool(self))

    monkeypatch.setattr(lm.CPUWorkers, "__init__", spy)
    torch.set_num_threads(2)  # the module's one_thread fixture puts 1 back afterwards
    threaded = A.harvest(model, ctx, hooks, out_root=tmp_path / "threaded", **kw)
    assert used == [True] and torch.get_num_threads() == 2
    slow = A.harvest(model, ctx, hooks, out_root=tmp_path / "slow", fast=False, **kw)
    for h in hooks:
        a, b = A.ActivationStore(threaded[h]), A.ActivationStore(serial[h])
        torch.testing.assert_close(a.all(), b.all(), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(a.all(), A.ActivationStore(slow[h]).all(), atol=1e-5, rtol=1e-5)
        assert torch.equal(a.tokens, b.tokens)


def test_killed_harvest_resumes_from_last_complete_chunk(tiny, tmp_path, monkeypatch):
    model, ctx, _ = tiny
    kw = dict(n_tokens=160, model_name="m", chunk_rows=32, batch_size=2, progress=False)
    ref = A.harvest(model, ctx, HOOKS, out_root=tmp_path / "ref", **kw)
    real_write, n_written = A.write_chunk, {"n": 0}

    def dying_write(path, tensors, metadata=None):
        if n_written["n"] == 5:  # die while writing a later chunk, after a partial temporary file exists
            (path.parent / f".{path.name}.x.tmp").write_bytes(b"partial")
            raise KeyboardInterrupt
        n_written["n"] += 1
        return real_write(path, tensors, metadata)

    monkeypatch.setattr(harvest_module, "write_chunk", dying_write)
    with pytest.raises(KeyboardInterrupt):
        A.harvest(model, ctx, HOOKS, out_root=tmp_path / "run", **kw)
    monkeypatch.setattr(harvest_module, "write_chunk", real_write)
    partial = {h: load_json(tmp_path / "run" / "m" / "final" / h / "manifest.json") for h in HOOKS}
    assert not any(m["complete"] for m in partial.values())
    assert sorted(len(m["chunks"]) for m in partial.values()) == [2, 3]  # killed between the two hooks' chunk 2
    first = (tmp_path / "run" / "m" / "final" / HOOKS[0] / "chunk-00000.safetensors").stat().st_mtime_ns
    folders = A.harvest(model, ctx, HOOKS, out_root=tmp_path / "run", **kw)
    for h in HOOKS:
        m, r = load_json(folders[h] / "manifest.json"), load_json(ref[h] / "manifest.json")
        assert m["complete"] and [c["crc32"] for c in m["chunks"]] == [c["crc32"] for c in r["chunks"]]
        assert not list(folders[h].glob("*.tmp"))
    assert (folders[HOOKS[0]] / "chunk-00000.safetensors").stat().st_mtime_ns == first  # not rewritten
    with pytest.raises(ValueError, match="other settings"):
        A.harvest(model, ctx, HOOKS, out_root=tmp_path / "run", **{**kw, "chunk_rows": 64})


def test_harvest_bad_inputs(tiny, tmp_path):
    model, ctx, _ = tiny
    with pytest.raises(ValueError, match="valid layers"):
        A.harvest(model, ctx, ["blocks.5.hook_resid_post"], 32, tmp_path, "m", progress=False)
    with pytest.raises(ValueError, match="unknown hook"):
        A.harvest(model, ctx, ["blocks.0.hook_bogus"], 32, tmp_path, "m", progress=False)
    with pytest.raises(ValueError, match="lower n_tokens"):
        A.harvest(model, ctx[:2], HOOKS, 10_000, tmp_path, "m", progress=False)


def test_float16_on_disk_reads_back_as_float32(tiny, tmp_path):
    model, ctx, _ = tiny
    f = A.harvest(model, ctx, HOOKS[:1], 32, tmp_path, "m", dtype=torch.float16, progress=False)[HOOKS[0]]
    store = A.ActivationStore(f)
    assert store.manifest["dtype"] == "float16" and next(store.batches(8)).dtype == torch.float32
    full = A.ActivationStore(A.harvest(model, ctx, HOOKS[:1], 32, tmp_path / "f32", "m", progress=False)[HOOKS[0]])
    torch.testing.assert_close(store.all(), full.all(), atol=2e-2, rtol=1e-2)


def test_reader_every_row_once_per_epoch_and_seeded_order(tmp_path):
    store = A.ActivationStore(fake_folder(tmp_path))
    assert store.n_tokens == 100 and store.d == 3

    def order(seed, epochs=1, bs=16):
        return torch.cat([b[:, 0] for b in store.batches(bs, seed=seed, epochs=epochs)]).long()

    a = order(0)
    assert sorted(a.tolist()) == list(range(100))  # each row exactly once
    assert a.tolist() != list(range(100))  # and shuffled across chunks
    assert torch.equal(a, order(0)) and not torch.equal(a, order(1))
    two = order(0, epochs=2)
    assert torch.equal(two[:100], a) and sorted(two[100:].tolist()) == list(range(100))
    assert not torch.equal(two[100:], a)  # a new permutation each epoch
    sizes = [len(b) for b in store.batches(16, seed=0)]
    assert sizes == [16] * 6 + [4] and all(len(b) == 16 for b in store.batches(16, seed=0, drop_last=True))
    assert torch.equal(store.rows([99, 0, 55])[:, 0], torch.tensor([99.0, 0.0, 55.0]))
    assert torch.equal(store.tokens, torch.arange(100))


def test_reader_names_truncated_or_corrupted_chunks(tmp_path):
    folder = fake_folder(tmp_path)
    bad = folder / "chunk-00001.safetensors"
    data = bad.read_bytes()
    bad.write_bytes(data[:-40])
    with pytest.raises(A.ChunkError, match="chunk-00001.safetensors.*truncated"):
        A.ActivationStore(folder)
    # Same size but a scrambled header: still named.
    bad.write_bytes(b"\xff" * 8 + data[8:])
    with pytest.raises(A.ChunkError, match="chunk-00001.safetensors.*corrupted"):
        A.ActivationStore(folder)
    # Same size, valid header, flipped data: only the checksum sees it.
    bad.write_bytes(data[:-4] + bytes(b ^ 0xFF for b in data[-4:]))
    store = A.ActivationStore(folder)
    with pytest.raises(A.ChunkError, match="chunk-00001.safetensors.*crc32"):
        store.verify()
    bad.unlink()
    with pytest.raises(A.ChunkError, match="chunk-00001.safetensors.*missing"):
        A.ActivationStore(folder)
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        A.ActivationStore(tmp_path / "nothing")


def test_manifest_lists_only_complete_chunks(tmp_path):
    """A chunk file on disk that the manifest does not list (written but not yet recorded) is never read."""
    folder = fake_folder(tmp_path, chunk_rows=(10, 10))
    m = json.loads((folder / "manifest.json").read_text())
    m["chunks"] = m["chunks"][:1]
    (folder / "manifest.json").write_text(json.dumps(m))
    store = A.ActivationStore(folder)
    assert store.n_tokens == 10 and sorted(torch.cat(list(store.batches(3)))[:, 0].tolist()) == list(range(10))
    assert np.isfinite(store.all().numpy()).all()
