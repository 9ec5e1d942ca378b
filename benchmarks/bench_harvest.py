"""Harvest throughput: this project's `activations.harvest` vs SAELens's `ActivationsStore`, side by side in one run.

Both get the same TransformerLens model object, the same pre-tokenized contexts (for SAELens a `datasets.Dataset`
with a `tokens` column, as its pretokenize runner writes) and the same hook. SAELens produces each batch with
`run_with_cache(..., stop_at_layer=L+1)` and keeps it in memory (`get_raw_llm_batch`, the step that feeds its
training buffer); ours runs one hooked pass that stops at the hook and also writes the safetensors chunks to disk.
Each side runs twice, alternating, and keeps its best time (the machine is shared). The two sides' activations are
checked to be equal before any number is recorded.

    .venv/bin/python benchmarks/bench_harvest.py [--tokens 524288] [--hook blocks.2.hook_resid_post]

524288 tokens are four of our default 131072-row chunks, so the measurement includes the chunk writes overlapping
the forward passes as they do in a real harvest (with one chunk, its whole write would be a serial tail that a
2M-token harvest pays once in sixteen).

Adds harvest_vs_saelens (our tokens/s over theirs) and both throughputs to benchmarks/results.json. Also measures
notebook 02's job, the residual stream at every layer: SAELens's store takes one hook, so it needs one pass per
layer, where ours serves all hooks from one pass (harvest_all_layers_vs_saelens)."""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import sparse_coding  # noqa: F401  (before torch: its OpenMP settings apply, as in the notebooks)
import torch

from sparse_coding import activations, lm
from sparse_coding.files import update_json
from sparse_coding.paths import repo_root
from rounds import spread


def get_model(device: str):
    """The default offline model if notebook 00 has run; otherwise a briefly trained one of the same shape (the
    throughput does not depend on how well the weights are trained)."""
    default = lm.offline_dir("data")
    if (default / "final" / "config.json").exists():
        return lm.load_model(default, device=device), lm.validation_contexts(default, split="train"), "offline"
    data = repo_root() / "build" / "bench-harvest" / "data"
    print(f"no trained model in {default}; training a 20-step model of the default shape into {data}", flush=True)
    lm.train_offline_model(data, lm.LMConfig(steps=20, eval_every=1000), progress=False)
    out = lm.offline_dir(data)
    return lm.load_model(out, device=device), lm.validation_contexts(out, split="train"), "offline-20step"


def run_ours(model, ctxs, hook, n_tokens, batch_size):
    hooks = hook if isinstance(hook, list) else [hook]
    root = Path(tempfile.mkdtemp(prefix="bench-harvest-", dir=repo_root() / "build"))
    try:
        t0 = time.perf_counter()
        folder = activations.harvest(model, ctxs, hooks, n_tokens=n_tokens, out_root=root, model_name="bench",
                                     batch_size=batch_size, progress=False)[hooks[-1]]
        dt = time.perf_counter() - t0
        acts = activations.ActivationStore(folder).rows(torch.arange(min(4096, n_tokens)))
        return dt, acts
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run_saelens(model, ctxs, hook, n_tokens, batch_size):
    import datasets
    from sae_lens.training.activations_store import ActivationsStore

    ctx_len = ctxs.shape[1]
    n_ctx = n_tokens // ctx_len
    ds = datasets.Dataset.from_dict({"tokens": ctxs[:n_ctx].tolist()})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        store = ActivationsStore(
            model=model, dataset=ds, streaming=False, hook_name=hook, hook_head_index=None, context_size=ctx_len,
            d_in=int(model.cfg.d_model), n_batches_in_buffer=2, total_training_tokens=n_tokens,
            store_batch_size_prompts=batch_size, train_batch_size_tokens=4096, prepend_bos=False,
            normalize_activations="none", device=torch.device(str(next(model.parameters()).device)), dtype="float32")
        t0 = time.perf_counter()
        got, kept = 0, []
        while got < n_tokens:
            acts, _ = store.get_raw_llm_batch()
            kept.append(acts)
            got += acts.shape[0]
        dt = time.perf_counter() - t0
    return dt, torch.cat(kept)[: min(4096, n_tokens)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", type=int, default=524288)
    ap.add_argument("--hook", default="blocks.2.hook_resid_post")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds (the ratio is their median)")
    args = ap.parse_args(argv)

    (repo_root() / "build").mkdir(exist_ok=True)
    model, ctxs, which = get_model(args.device)
    lm.check_hooks(model, [args.hook])
    n = (args.tokens // ctxs.shape[1]) * ctxs.shape[1]
    # Warm-up: first-call allocations and lazy imports out of the timings.
    run_ours(model, ctxs, args.hook, ctxs.shape[1] * args.batch_size, args.batch_size)
    run_saelens(model, ctxs, args.hook, ctxs.shape[1] * args.batch_size, args.batch_size)

    ours, theirs = [], []
    for _ in range(args.repeats):
        dt, a = run_ours(model, ctxs, args.hook, n, args.batch_size)
        ours.append(dt)
        dt, b = run_saelens(model, ctxs, args.hook, n, args.batch_size)
        theirs.append(dt)
    diff = (a - b).abs().max().item()
    if diff > 1e-4:
        print(f"activations differ between the two harvests (max abs {diff:.2e}); not recording", file=sys.stderr)
        return 1
    ours_tps, theirs_tps = n / statistics.median(ours), n / statistics.median(theirs)
    # Each round's ratio (the two ran back to back); its median is the figure, min and max its spread.
    ratios = [t / o for o, t in zip(ours, theirs)]
    ratio = statistics.median(ratios)
    ratio_spread = spread(ratios)

    # Every layer's residual stream (notebook 02): one pass for all hooks vs one SAELens store per hook.
    all_hooks = [lm.hook_name("resid_post", L) for L in range(lm.n_layers(model))]
    ours_all = run_ours(model, ctxs, all_hooks, n, args.batch_size)[0]
    theirs_all = sum(run_saelens(model, ctxs, h, n, args.batch_size)[0] for h in all_hooks)
    ratio_all = theirs_all / ours_all
    load = os.getloadavg()[0]
    print(f"model {which} ({model.cfg.n_layers} layers, d={model.cfg.d_model}), hook {args.hook}, {n} tokens, "
          f"batch {args.batch_size} contexts, device {args.device}, load average {load:.1f}")
    print(f"{'':>10} {'median s':>8} {'tokens/s':>10}   all runs (s)")
    print(f"{'ours':>10} {statistics.median(ours):8.2f} {ours_tps:10.0f}   {[round(t, 2) for t in ours]}  "
          f"(includes writing to disk)")
    print(f"{'SAELens':>10} {statistics.median(theirs):8.2f} {theirs_tps:10.0f}   {[round(t, 2) for t in theirs]}  "
          f"(in memory)")
    print(f"harvest_vs_saelens = {ratio:.2f}x median of {len(ratios)} rounds, spread {ratio_spread}, goal >= 1.5   "
          f"(same activations: max abs diff {diff:.1e})")
    print(f"all {len(all_hooks)} layers: ours {ours_all:.2f}s in one pass, SAELens {theirs_all:.2f}s in "
          f"{len(all_hooks)} passes -> harvest_all_layers_vs_saelens = {ratio_all:.2f}x")
    update_json(Path(__file__).with_name("results.json"), {
        "harvest_vs_saelens": round(ratio, 3), "harvest_vs_saelens_spread": ratio_spread,
        "harvest_bench_rounds": len(ratios), "harvest_ours_tokens_per_s": round(ours_tps),
        "harvest_saelens_tokens_per_s": round(theirs_tps), "harvest_bench_tokens": n, "harvest_bench_hook": args.hook,
        "harvest_all_layers_vs_saelens": round(ratio_all, 3), "harvest_bench_load_average": round(load, 2)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
