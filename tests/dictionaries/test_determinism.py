"""Same seed, same numbers: a small sweep of every kind, trained and evaluated twice in separate processes (fresh
interpreters, so hash seeds, allocation addresses and thread start-up all differ), gives byte-identical weights and
identical logs and evaluation tables."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

JOB = r'''
import hashlib, json, sys, torch
from sparse_coding import activations, analyses, dictionaries
g = torch.Generator().manual_seed(0)
D = torch.randn(96, 32, generator=g); D /= D.norm(dim=1, keepdim=True)
codes = (torch.rand(24576, 96, generator=g) < 0.05) * torch.rand(24576, 96, generator=g)
x = codes @ D + 0.01 * torch.randn(24576, 32, generator=g)
store = activations.write_store(sys.argv[1] + "/acts", x, torch.zeros(24576, dtype=torch.long), model="toy",
                                hook="blocks.0.hook_resid_post", ctx_len=16)
out = {}
for kind, hp in [("relu", {"l1_coef": [0.5, 2.0]}), ("topk", {"k": [4, 8]}), ("batchtopk", {"k": [4]}),
                 ("jumprelu", {"l0_coef": [1.0]})]:
    run = dictionaries.train_lm_sweep(store, kind, 4, hp, data_dir=sys.argv[1] + "/data", batch_size=512,
                                      n_tokens=20480, lr=3e-3, progress=False, log_every=5,
                                      **({"resample_every": 10} if kind == "relu" else {}))
    w = b"".join((p / "sae_weights.safetensors").read_bytes() for p in sorted(run.folder.glob("member-*")))
    ev = analyses.evaluate_sweep(None, run.sae, store.batches(2048, seed=7), None, "blocks.0.hook_resid_post",
                                 progress=False)
    out[kind] = {"weights": hashlib.sha256(w).hexdigest(),
                 "history": hashlib.sha256(run.history.to_csv(index=False).encode()).hexdigest(),
                 "eval": hashlib.sha256(ev.table.to_csv(index=False).encode()).hexdigest()}
print(json.dumps(out))
'''


def _run(folder: Path, hash_seed: str) -> dict:
    env = {**os.environ, "PYTHONHASHSEED": hash_seed,
           "PYTHONPATH": str(ROOT / "helpers") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", JOB, str(folder)], capture_output=True, text=True, env=env,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_two_processes_give_identical_weights_logs_and_evaluations(tmp_path):
    a = _run(tmp_path / "a", "1")
    b = _run(tmp_path / "b", "2")
    for kind in a:
        assert a[kind] == b[kind], kind
