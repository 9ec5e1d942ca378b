"""What end-to-end training costs (Braun et al. 2024, arXiv 2405.12241): one `train_sae` step with loss="e2e" (and
"e2e+ds") over one with loss="local", the same SAE (ReLU, ratio 4, the members of notebook 08's e2e sweep) and the
same batches (notebook 08's: 512 tokens, four contexts of the default offline model, at notebook 03's hook), the local
step reading the activations of those very contexts from the model (`SplicedObjective` as its batch source, as
notebook 08 trains it) and, as the cheapest local step, from activations already in memory.

    .venv/bin/python benchmarks/bench_e2e.py [--rounds 5] [--steps 6]

Rounds interleave the variants; each round's ratio is (e2e step time) / (local step time). Adds
`e2e_step_vs_local_step` (median over rounds, contexts-read local step as the denominator) with its `_spread`,
`e2e_ds_step_vs_local_step`, `e2e_step_vs_local_step_from_memory`, the seconds per step and the CPU to
benchmarks/results.json."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import sparse_coding  # noqa: F401  (before torch: its OpenMP settings apply, as in the notebooks)
import torch

from sparse_coding.dictionaries import make_sae, train_sae
from sparse_coding.dictionaries.training.e2e import SplicedObjective
from sparse_coding.files import update_json

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_harvest import get_model  # noqa: E402
from rounds import cpu_model, median_and_spread, spread  # noqa: E402

HERE = Path(__file__).resolve().parent
HOOK = "blocks.2.hook_resid_post"
MEMBERS = {"l1_coef": [1.0, 2.0, 4.0]}


def step_seconds(mode: str, model, ctxs, steps: int, batch_size: int, from_memory: torch.Tensor | None) -> float:
    sae = make_sae("relu", int(model.cfg.d_model), ratio=4, seed=0, **MEMBERS)
    kw = dict(steps=steps, batch_size=batch_size, lr=1e-3, progress=False, input_scale=1.0, log_every=10 ** 6)
    if mode == "local":
        source = from_memory if from_memory is not None else SplicedObjective(model, HOOK, ctxs, batch_size, 0,
                                                                              "local")
        train_sae(sae, source, steps=1, batch_size=batch_size, progress=False, input_scale=1.0)  # warm-up
        t = time.perf_counter()
        train_sae(sae, source, **kw)
    else:
        extra = dict(loss=mode, model=model, hook_name=HOOK)
        train_sae(sae, ctxs, **{**kw, "steps": 1}, **extra)
        t = time.perf_counter()
        train_sae(sae, ctxs, **kw, **extra)
    return (time.perf_counter() - t) / steps


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=512)
    args = ap.parse_args(argv)
    model, ctxs, which = get_model("cpu")
    obj = SplicedObjective(model, HOOK, ctxs, args.batch_size, 0, "local")
    memory = torch.cat([obj(s) for s in range(args.steps + 1)])  # the same contexts' activations, precomputed
    times: dict[str, list[float]] = {k: [] for k in ("local", "local_memory", "e2e", "e2e+ds")}
    print(f"model {which}, hook {HOOK}, {args.batch_size} tokens/step, {len(MEMBERS['l1_coef'])} members, "
          f"load {os.getloadavg()[0]:.2f}, CPU {cpu_model()}", flush=True)
    for r in range(args.rounds):
        for key in times:
            mode = "local" if key.startswith("local") else key
            times[key].append(step_seconds(mode, model, ctxs, args.steps, args.batch_size,
                                           memory if key == "local_memory" else None))
        print(f"round {r}: " + "  ".join(f"{k} {v[-1]:.3f} s" for k, v in times.items()), flush=True)
    ratio, ratio_spread = median_and_spread(times["e2e"], times["local"])
    ds_ratio, ds_spread = median_and_spread(times["e2e+ds"], times["local"])
    mem_ratio, mem_spread = median_and_spread(times["e2e"], times["local_memory"])
    results = {"e2e_step_vs_local_step": round(ratio, 3), "e2e_step_vs_local_step_spread": ratio_spread,
               "e2e_ds_step_vs_local_step": round(ds_ratio, 3), "e2e_ds_step_vs_local_step_spread": ds_spread,
               "e2e_step_vs_local_step_from_memory": round(mem_ratio, 3),
               "e2e_step_vs_local_step_from_memory_spread": mem_spread,
               "e2e_bench_step_seconds": {k: round(statistics.median(v), 4) for k, v in times.items()},
               "e2e_bench_step_seconds_spread": {k: spread(v) for k, v in times.items()},
               "e2e_bench_setup": {"model": which, "hook": HOOK, "batch_tokens": args.batch_size,
                                   "members": len(MEMBERS["l1_coef"]), "d_sae": 4 * int(model.cfg.d_model),
                                   "steps_per_round": args.steps, "rounds": args.rounds},
               "e2e_bench_cpu": cpu_model(), "e2e_bench_load_average": round(os.getloadavg()[0], 2)}
    if not os.environ.get("BENCH_NO_SAVE"):
        update_json(HERE / "results.json", results)
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
