"""A shared machine must not make a run ten times slower: time notebook 00's LM training step, a harvest and an SAE
training step, each in a fresh process, on the quiet machine and next to one competing single-thread busy process,
under each OpenMP thread setting; interleaved repetitions, medians.

    .venv/bin/python benchmarks/bench_loaded.py [--reps 3]

Workloads: LM training (notebook 00's model, batch 32x128), a one-hook harvest of 131k tokens, an SAE ensemble step
at batch 4096 (notebook 03's scale), and a toy ensemble step at batch 256 (notebook 01's: many short parallel
regions, where a sleeping OpenMP thread's wake-up costs most).
Settings compared: the OpenMP defaults (threads spin waiting for a descheduled partner), and the project's
(`sparse_coding.threads.configure`, what the runner, `make lab` and the package set before torch loads).
Adds `loaded_slowdown` {lm_train, harvest, sae_train} (loaded time / quiet time under the project's settings, goal
≤ 2), the same under the defaults, and `threads_quiet_cost` (quiet time under the project's settings / under the
defaults: what they cost when nothing competes) to benchmarks/results.json."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from rounds import spread

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# Each workload prints the seconds of its timed part (warm-up excluded) as the last line of stdout.
WORKLOADS = {
    "lm_train": """
import time, torch, torch.nn.functional as F
from transformers import GPTNeoXForCausalLM
from sparse_coding.lm import LMConfig
cfg = LMConfig(); torch.manual_seed(0)
model = GPTNeoXForCausalLM(cfg.hf_config()); opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
x = torch.randint(0, cfg.vocab_size, (cfg.batch_size, cfg.ctx_len))
def step():
    logits = model(x).logits[:, :-1]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
    opt.zero_grad(); loss.backward(); opt.step()
step(); t = time.perf_counter()
for _ in range(6): step()
print(time.perf_counter() - t)
""",
    "harvest": """
import sys, time, shutil, tempfile, torch
sys.path.insert(0, %(here)r)
from bench_harvest import get_model
from sparse_coding import activations
model, ctxs, _ = get_model("cpu")
root = tempfile.mkdtemp()
activations.harvest(model, ctxs, ["blocks.2.hook_resid_post"], 8192, root + "/w", "bench", progress=False)
t = time.perf_counter()
activations.harvest(model, ctxs, ["blocks.2.hook_resid_post"], 131072, root + "/a", "bench", progress=False)
print(time.perf_counter() - t); shutil.rmtree(root)
""",
    "sae_train": """
import time, torch
from sparse_coding.dictionaries import make_sae, train_sae
x = torch.randn(65536, 128, generator=torch.Generator().manual_seed(0))
sae = make_sae("relu", 128, 512, l1_coef=[0.5, 1, 2, 4])
train_sae(sae, x, steps=3, batch_size=4096, progress=False)
t = time.perf_counter()
train_sae(sae, x, steps=40, batch_size=4096, progress=False, input_scale=1.0)
print(time.perf_counter() - t)
""",
    "toy_train": """
import time, torch
from sparse_coding.dictionaries import make_sae, train_sae
xs = torch.randn(8, 256, 256, generator=torch.Generator().manual_seed(0))
sae = make_sae("relu", 256, 1024, l1_coef=[0.4, 1.2, 4.0])
train_sae(sae, lambda s: xs[s % 8], steps=20, progress=False, input_scale=1.0)
t = time.perf_counter()
train_sae(sae, lambda s: xs[s % 8], steps=300, progress=False, input_scale=1.0)
print(time.perf_counter() - t)
""",
}


def _env(setting: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_", "KMP_"))}
    env["PYTHONPATH"] = str(ROOT / "helpers") + os.pathsep + env.get("PYTHONPATH", "")
    if setting == "project":
        sys.path.insert(0, str(ROOT / "helpers"))
        from sparse_coding.threads import configure

        configure(env)
    elif setting.startswith("spin:"):  # candidates: spin this many iterations, then sleep
        env["GOMP_SPINCOUNT"] = setting.split(":", 1)[1]
    elif setting != "default":
        env.update(dict(kv.split("=", 1) for kv in setting.split(",")))
    return env


def _run(workload: str, setting: str) -> float:
    code = WORKLOADS[workload] % {"here": str(HERE)} if "%(here)" in WORKLOADS[workload] else WORKLOADS[workload]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(setting), cwd=ROOT,
                         timeout=900)
    if out.returncode != 0:
        raise RuntimeError(f"{workload} ({setting}) failed:\n{out.stderr[-2000:]}")
    return float(out.stdout.strip().splitlines()[-1])


def _busy() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--only", nargs="*", default=list(WORKLOADS))
    ap.add_argument("--settings", nargs="*", default=["default", "project"],
                    help="default, project, spin:N (GOMP_SPINCOUNT) or VAR=value[,VAR=value]; the first two "
                         "are what results.json records")
    args = ap.parse_args(argv)
    load0 = os.getloadavg()[0]
    times: dict[tuple[str, str, str], list[float]] = {}
    for rep in range(args.reps):
        for workload in args.only:
            for setting in args.settings:
                for loaded in (False, True):
                    busy = _busy() if loaded else None
                    try:
                        if busy:
                            time.sleep(0.5)  # let the competitor get scheduled
                        dt = _run(workload, setting)
                    finally:
                        if busy:
                            busy.kill()
                            busy.wait()
                    times.setdefault((workload, setting, "loaded" if loaded else "quiet"), []).append(dt)
                    print(f"rep {rep} {workload:9s} {setting:8s} {'loaded' if loaded else 'quiet ':6s} {dt:7.2f} s",
                          flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    for w in args.only:
        for st in args.settings:
            print(f"{w:10s} {st:24s} quiet {med[(w, st, 'quiet')]:7.2f}  loaded {med[(w, st, 'loaded')]:7.2f}  "
                  f"slowdown {med[(w, st, 'loaded')] / med[(w, st, 'quiet')]:5.2f}")
    if args.settings[:2] != ["default", "project"]:
        return 0  # an exploration: nothing recorded
    results = {"loaded_slowdown": {}, "loaded_slowdown_default_threads": {}, "threads_quiet_cost": {},
               "loaded_slowdown_spread": {}}
    print(f"\n{'workload':10s} {'quiet':>8s} {'loaded':>8s} {'slowdown':>9s} {'default slowdown':>17s} "
          f"{'quiet cost':>11s}   (goal: slowdown <= 2)")
    for w in args.only:
        q, lo = med[(w, "project", "quiet")], med[(w, "project", "loaded")]
        dq, dl = med[(w, "default", "quiet")], med[(w, "default", "loaded")]
        ratios = [a / b for a, b in zip(times[(w, "project", "loaded")], times[(w, "project", "quiet")])]
        results["loaded_slowdown"][w] = round(lo / q, 3)
        results["loaded_slowdown_spread"][w] = spread(ratios)
        results["loaded_slowdown_default_threads"][w] = round(dl / dq, 3)
        results["threads_quiet_cost"][w] = round(q / dq, 3)
        print(f"{w:10s} {q:8.2f} {lo:8.2f} {lo / q:9.2f} {dl / dq:17.2f} {q / dq:11.2f}")
    results["loaded_bench_load_average"] = round(load0, 2)
    results["loaded_bench_reps"] = args.reps
    if not os.environ.get("BENCH_NO_SAVE"):
        sys.path.insert(0, str(ROOT / "helpers"))
        from sparse_coding.files import update_json

        update_json(HERE / "results.json", results)
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
