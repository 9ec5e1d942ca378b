"""Kill anywhere, resume exactly; a full disk leaves nothing half-written.

Runs each long job - offline LM training (notebook 00), harvesting (02), SAE sweep training (03) - in a subprocess,
kills it (SIGKILL, from inside) at the N-th write or rename, N drawn from a seed, restarts it until it completes, and compares every file it wrote, byte for
byte, with an uninterrupted run (fields that record wall time or a lock holder's pid are left out). Then injects an
OSError(ENOSPC) at the N-th file write of each job and checks that the job fails with that error, leaves no
temporary file behind and lists nothing in a manifest that is not complete on disk.

    python tests/faults.py --scale small --kills 6      # what tests/test_faults.py runs in CI
    python tests/faults.py --scale full --kills 24      # on demand: the default sizes, >= 20 kills in all

Prints one line per kill and a summary (kills survived, files and bytes compared, mismatches)."""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Keys that record wall time, a pid or a creation stamp: they differ between any two runs, killed or not.
VOLATILE = {"seconds", "created", "t_train", "tokens_per_s", "train_seconds"}
SKIP_FILES = {".lock"}

SCALES = {
    "small": {"lm": dict(n_layers=2, d_model=32, n_heads=2, d_mlp=64, vocab_size=300, ctx_len=16, batch_size=8,
                         steps=60, warmup_steps=4, lr=1e-2, eval_every=10, eval_contexts=16),
              "lm_state_every": 5, "harvest_tokens": 1792, "chunk_rows": 256, "sae_tokens": 8192,
              "sae_batch": 128},
    "full": {"lm": {}, "lm_state_every": 50, "harvest_tokens": 2_000_000, "chunk_rows": 131072,
             "sae_tokens": 2_000_000, "sae_batch": 4096},
}

JOB = r'''
import json, sys, torch
sys.path.insert(0, {tests!r})
from sparse_coding import activations, dictionaries, lm
cfg = json.loads({cfg!r})
work = cfg["work"]
if cfg.get("enospc_at") or cfg.get("kill_at") or cfg.get("count"):
    # Faults at points defined by progress, not wall time: the N-th file write (ENOSPC), the N-th event - a write
    # or a rename, the only things that change the disk - (SIGKILL), so a seed kills at the same places on any
    # machine, however fast or busy. An odd kill_at dies before its event, an even one just after opening the file
    # (created or truncated, nothing written yet).
    import atexit, errno, builtins, os, signal
    import sparse_coding.files as files
    count = {{"writes": 0, "events": 0}}
    def die():
        os.kill(os.getpid(), signal.SIGKILL)
    def tick(kind):
        count["events"] += 1
        if kind == "write":
            count["writes"] += 1
            if count["writes"] == cfg.get("enospc_at"):
                raise OSError(errno.ENOSPC, "No space left on device (injected)")
        return count["events"] == cfg.get("kill_at")
    real_open, real_save, real_replace, real_rename = builtins.open, files.save_file, os.replace, os.rename
    def fake_open(file, mode="r", *a, **k):
        if any(c in mode for c in "wax+") and tick("write"):
            if cfg["kill_at"] % 2:
                die()
            real_open(file, mode, *a, **k)
            die()
        return real_open(file, mode, *a, **k)
    def fake_save(*a, **k):
        if tick("write"):
            die()
        return real_save(*a, **k)
    def fake_replace(*a, **k):
        if tick("rename"):
            die()
        return real_replace(*a, **k)
    def fake_rename(*a, **k):
        if tick("rename"):
            die()
        return real_rename(*a, **k)
    builtins.open, files.save_file, os.replace, os.rename = fake_open, fake_save, fake_replace, fake_rename
    atexit.register(lambda: sys.stderr.write(f"\nEVENTS {{count['events']}}\n"))
if cfg["job"] == "lm":
    from conftest import DOCS
    import pathlib
    texts = pathlib.Path(cfg["texts"])
    texts.mkdir(parents=True, exist_ok=True)
    for i, d in enumerate(DOCS):
        (texts / f"m{{i:02d}}.py").write_text(d)
    src = str(texts) if cfg["lm"] else "stdlib"
    lm.train_offline_model(work + "/data", lm.LMConfig(**cfg["lm"]), source=src, progress=False,
                           state_every=cfg["lm_state_every"])
else:
    model = lm.load_model(lm.offline_dir(cfg["model_data"]))
    ctxs = lm.validation_contexts(lm.offline_dir(cfg["model_data"]), split="train")
    if cfg["job"] == "harvest":
        activations.harvest(model, ctxs, ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"],
                            cfg["harvest_tokens"], work + "/acts", "offline", "final", chunk_rows=cfg["chunk_rows"],
                            progress=False)
    else:
        store = activations.ActivationStore(cfg["store"])
        dictionaries.train_lm_sweep(store, "topk", 4, {{"k": [4, 8]}}, data_dir=work + "/data",
                                    n_tokens=cfg["sae_tokens"], batch_size=cfg["sae_batch"], lr=3e-3,
                                    progress=False, log_every=5, resample_every=None)
'''


def _run(cfg: dict) -> tuple[int, str]:
    """Run one job in a subprocess (its faults, if any, come from inside it: see JOB); (return code, stderr)."""
    code = JOB.format(tests=str(ROOT / "tests"), cfg=json.dumps(cfg))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "helpers") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, env=env, text=True)
    return proc.returncode, proc.stderr


def _events(err: str) -> int:
    """The number of writes and renames a run made (its last `EVENTS n` line on stderr)."""
    lines = [ln for ln in err.splitlines() if ln.startswith("EVENTS ")]
    if not lines:
        raise RuntimeError(f"the job did not report its events:\n{err[-2000:]}")
    return int(lines[-1].split()[1])


def _normalise_json(path: Path):
    def strip(o):
        if isinstance(o, dict):
            return {k: strip(v) for k, v in o.items() if k not in VOLATILE}
        if isinstance(o, list):
            return [strip(v) for v in o]
        return o
    return strip(json.loads(path.read_text()))


def compare_trees(a: Path, b: Path) -> tuple[int, int, list[str]]:
    """(files compared, bytes compared, mismatches) between two output folders."""
    files = bytes_ = 0
    bad = []
    names_a = {p.relative_to(a) for p in a.rglob("*") if p.is_file() and p.name not in SKIP_FILES}
    names_b = {p.relative_to(b) for p in b.rglob("*") if p.is_file() and p.name not in SKIP_FILES}
    for missing in sorted(names_a ^ names_b):
        bad.append(f"only in one run: {missing}")
    for rel in sorted(names_a & names_b):
        pa, pb = a / rel, b / rel
        files += 1
        bytes_ += pa.stat().st_size
        if rel.suffix == ".json":
            if _normalise_json(pa) != _normalise_json(pb):
                bad.append(f"differs: {rel}")
        elif not filecmp.cmp(pa, pb, shallow=False):
            bad.append(f"differs: {rel}")
    return files, bytes_, bad


def leftovers(root: Path) -> list[str]:
    """Temporary files, and manifest entries whose chunk is missing or of another size."""
    out = [str(p) for p in root.rglob("*") if p.name.endswith(".tmp") or ".tmp" in p.name]
    for m in root.rglob("manifest.json"):
        man = json.loads(m.read_text())
        for c in man.get("chunks", []):
            f = m.parent / c["file"]
            if not f.exists() or ("bytes" in c and f.stat().st_size != c["bytes"]):
                out.append(f"manifest lists a chunk not complete on disk: {f}")
    return out


def run_job(name: str, cfg: dict, work: Path, kills: int, rng: random.Random, log) -> dict:
    """The job uninterrupted, then killed `kills` times at random moments and resumed; compare the outputs."""
    whole = work / f"{name}-whole"
    t0 = time.time()
    rc, err = _run({**cfg, "work": str(whole), "count": True})
    duration = time.time() - t0
    if rc != 0:
        raise RuntimeError(f"{name} failed uninterrupted:\n{err[-3000:]}")
    events = _events(err)
    cut = work / f"{name}-killed"
    survived = 0
    while True:
        # Each kill comes within the first 1/(kills+1) of a whole run's writes and renames, counted from the
        # (re)start: the resumed runs move on from where the last one died, so the kills spread over the job, and
        # every one of them lands before the job could finish.
        at = rng.randint(1, max(1, events // (kills + 1))) if survived < kills else None
        rc, err = _run({**cfg, "work": str(cut), "count": True, **({"kill_at": at} if at else {})})
        if rc == -9:
            survived += 1
            log(f"  {name}: killed at event {at} of {events} (kill {survived})")
            continue
        if rc != 0:
            raise RuntimeError(f"{name} failed after {survived} kills:\n{err[-3000:]}")
        break
    files, nbytes, bad = compare_trees(whole, cut)
    return {"job": name, "kills": survived, "files": files, "bytes": nbytes, "mismatches": bad,
            "seconds_uninterrupted": round(duration, 1)}


def run_enospc(name: str, cfg: dict, work: Path, at: int) -> dict:
    out = work / f"{name}-enospc-{at}"
    rc, err = _run({**cfg, "work": str(out), "enospc_at": at})
    clear = "No space left on device" in err
    left = leftovers(out) if out.exists() else []
    return {"job": name, "write": at, "failed": rc != 0, "clear_error": clear, "leftovers": left}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--scale", choices=sorted(SCALES), default="small")
    ap.add_argument("--kills", type=int, default=6, help="kills in all, spread over the three jobs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default=None, help="folder for the runs (default: a temporary one, removed)")
    ap.add_argument("--json", default=None, help="write the summary here")
    args = ap.parse_args(argv)
    sc = SCALES[args.scale]
    rng = random.Random(args.seed)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="faults-"))
    work.mkdir(parents=True, exist_ok=True)
    per_job = [args.kills // 3 + (1 if i < args.kills % 3 else 0) for i in range(3)]
    results, enospc = [], []
    try:
        lm_cfg = {"job": "lm", "lm": sc["lm"], "lm_state_every": sc["lm_state_every"], "texts": str(work / "texts")}
        results.append(run_job("lm_train", lm_cfg, work, per_job[0], rng, print))
        model_data = str(work / "lm_train-whole" / "data")
        hv_cfg = {"job": "harvest", "model_data": model_data, "harvest_tokens": sc["harvest_tokens"],
                  "chunk_rows": sc["chunk_rows"]}
        results.append(run_job("harvest", hv_cfg, work, per_job[1], rng, print))
        store = next((work / "harvest-whole" / "acts").rglob("manifest.json")).parent
        sae_cfg = {"job": "sae", "model_data": model_data, "store": str(store), "sae_tokens": sc["sae_tokens"],
                   "sae_batch": sc["sae_batch"]}
        results.append(run_job("sae_train", sae_cfg, work, per_job[2], rng, print))
        for name, cfg in (("lm_train", lm_cfg), ("harvest", hv_cfg), ("sae_train", sae_cfg)):
            for at in (rng.randint(2, 12), rng.randint(13, 40)):
                enospc.append(run_enospc(name, cfg, work, at))
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    summary = {"scale": args.scale, "kills": sum(r["kills"] for r in results),
               "files_compared": sum(r["files"] for r in results), "bytes_compared": sum(r["bytes"] for r in results),
               "mismatches": [m for r in results for m in r["mismatches"]], "jobs": results, "enospc": enospc}
    print(json.dumps(summary, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
    ok = not summary["mismatches"] and all(e["failed"] and e["clear_error"] and not e["leftovers"] for e in enospc)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
