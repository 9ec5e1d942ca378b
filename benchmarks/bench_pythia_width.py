"""Pythia-70M widths on CPU: one SAE training step at d_in = 512 (Pythia-70M's d_model) with dictionary ratios up to
32 (16384 latents), per kind, batch 4096 tokens: seconds per step and peak memory added by the SAE and its step.

    .venv/bin/python benchmarks/bench_pythia_width.py [--ratios 1 2 4 8 16 32] [--steps 3]

Each (kind, ratio) runs in a fresh process (peak memory is the process's peak resident set above what it held
before the SAE was built). Adds `pythia_width_step_seconds` and `pythia_width_peak_gib`, each {kind: {ratio: value}},
to benchmarks/results.json."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
KINDS = {"relu": {"l1_coef": 1.0}, "topk": {"k": 32}, "batchtopk": {"k": 32}, "jumprelu": {"l0_coef": 1.0}}

CHILD = r"""
import json, resource, sys, time, torch
from sparse_coding.dictionaries import make_sae, train_sae
kind, ratio, steps, device = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
hp = json.loads(sys.argv[5])
x = torch.randn(4096 * 4, 512, generator=torch.Generator().manual_seed(0)).to(device)
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
base = rss()
# A long run's dead window (10M tokens): a 3-step run's default (one batch) would make AuxK search nearly every
# latent, which is not the step a real run at this width takes.
sae = make_sae(kind, 512, ratio=ratio, device=device, dead_window=10_000_000, **hp)
train_sae(sae, x, steps=1, batch_size=4096, progress=False)  # warm-up (allocations, kernels)
t = time.perf_counter()
train_sae(sae, x, steps=steps, batch_size=4096, progress=False, input_scale=1.0)
if device == "cuda":
    torch.cuda.synchronize()
dt = (time.perf_counter() - t) / steps
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"seconds": dt, "peak_gib": max(0, peak - base) / 2 ** 30}))
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--ratios", type=float, nargs="*", default=[1, 2, 4, 8, 16, 32])
    ap.add_argument("--kinds", nargs="*", default=list(KINDS))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "helpers") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    secs: dict = {}
    peak: dict = {}
    print(f"{'kind':10s} {'ratio':>5s} {'latents':>8s} {'s/step':>8s} {'peak GiB':>9s}   load {os.getloadavg()[0]:.2f}")
    for kind in args.kinds:
        for r in args.ratios:
            out = subprocess.run([sys.executable, "-c", CHILD, kind, str(r), str(args.steps), args.device,
                                  json.dumps(KINDS[kind])], capture_output=True, text=True, env=env, timeout=1800)
            if out.returncode != 0:
                print(f"{kind} ratio {r:g} failed:\n{out.stderr[-1500:]}")
                continue
            res = json.loads(out.stdout.strip().splitlines()[-1])
            secs.setdefault(kind, {})[f"{r:g}"] = round(res["seconds"], 4)
            peak.setdefault(kind, {})[f"{r:g}"] = round(res["peak_gib"], 3)
            print(f"{kind:10s} {r:5g} {int(r * 512):8d} {res['seconds']:8.3f} {res['peak_gib']:9.3f}", flush=True)
    suffix = "" if args.device == "cpu" else f"_{args.device}"
    results = {f"pythia_width_step_seconds{suffix}": secs, f"pythia_width_peak_gib{suffix}": peak,
               f"pythia_width_batch_tokens{suffix}": 4096, f"pythia_width_load_average{suffix}": round(os.getloadavg()[0], 2)}
    if not os.environ.get("BENCH_NO_SAVE"):
        sys.path.insert(0, str(ROOT / "helpers"))
        from sparse_coding.files import update_json

        update_json(HERE / "results.json", results)
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
