"""Feature mining: this project's `analyses.features.mine_dictionary` vs SAEDashboard's `SaeVisRunner`, side by side
in one run (issue acceptance point: >= 3x the peer's tokens/s, with bounded memory).

Same inputs for both sides:
  - model: the offline model (data/lm/offline) if notebook 00 has run, else a 20-step model of the default shape
    (trained once into build/bench-harvest/data, shared with bench_harvest.py); both sides get the TransformerBridge
    that `lm.load_model` returns (ours reads the hook through `lm.hook_reader`, i.e. the lean GPT-NeoX forward;
    SAEDashboard through the bridge's `run_with_hooks(stop_at_layer=L+1)`, its only way in);
  - dictionary: a TopK SAE (k=32, d_sae = 4 x d_model) fitted for 30 steps on activations of the model's training
    text (so codes have realistic sparsity and the latents unequal frequencies), saved ONCE with `save_sae` as a
    SAELens-layout folder; SAEDashboard gets `sae_lens.SAE.load_from_disk(folder)`, ours `load_sae(folder)`. Both
    encodings of one batch are checked equal (to 1e-5) before anything runs; SAEDashboard's in-place
    `fold_W_dec_norm()` is turned off (it refuses TopK SAEs without decoder-norm rescaling, and would rescale the
    activations otherwise);
  - tokens: held-out contexts of the model's length (`lm.held_out_contexts`), 256k tokens at BENCH_SCALE=1;
  - what is built, per feature: the top 20 examples, 10 equal-width activation intervals between 0 and the max with
    5 examples each, whole-context windows (ours `window=None`; SAEDashboard `buffer=None`, as its Neuronpedia runner
    uses), an activation histogram and summary statistics.
    Ours: `mine_dictionary(...)` (one streaming pass), then `top_examples(f)` and `quantile_examples(f, 10, 5)` (each
    with its token window and per-token activations, kept during the same pass), for every feature. SAEDashboard: `SaeVisRunner(cfg).run(...)`, every requested
    feature in ONE feature batch (its fastest setting: a single sweep of forward passes; its memory then grows as
    tokens x features), 32 contexts per forward pass as ours.

Not identical, stated rather than hidden: SAEDashboard's top group is the 20 largest token positions (one context can
appear several times, and zero activations fill it when fewer fire), ours the 20 contexts with the largest max; its
lowest interval starts at 0 inclusive (mostly non-firing tokens), ours holds firing tokens only, drawn from a bounded
sample (4 per geometric histogram bin), so ours lists fewer examples per feature (printed). SAEDashboard also
computes what a dashboard shows and we do not (logit tables and histograms, neuron and feature correlation tables, a
fine quantile grid) — it cannot be switched off, so its time is split by component in the printout (forward, encode,
example groups, statistics, the rest). Both sides colour whole windows: ours keeps the per-token activations of the
sampled windows while it streams.

Same number of features: ours always mines every one of the d_sae latents (mining has no feature subset: one pass
serves all). SAEDashboard runs all d_sae too at BENCH_SCALE >= 1. Below that (or with --peer-features F), it runs
the first F features and its time is extrapolated to d_sae features as fixed + (total - fixed) x d_sae / F, where
fixed is its measured forward + encode time (the TopK encode computes all latents whatever F is; for the plain loop,
the encode-and-keep pass): per-feature work scales with the features, one sweep of forward passes does not. The
printout says when this is used.

Method (the machine may be shared): each side lives in its own worker process (imports, model, and one untimed
warm-up run on all the tokens, so that no side's first timed run pays for its heap growing); the timed runs
alternate between the two (>= 3 repetitions, the first side swapping each round), each ratio is the median of the
per-round ratios, and `<key>_spread` is [min, max] over rounds. Peak memory: each worker resets its
peak-RSS mark (/proc/self/clear_refs) before a run and reports VmHWM minus the RSS it started the run with (these
vary by tens of MiB between runs: glibc keeps freed memory or not). For the verdict, ours also runs once on all the
tokens and once on 1/8 of them (at least 2 batches), each in a fresh worker with MALLOC_MMAP_THRESHOLD_=65536 (every
large allocation mmapped and returned on free, so the peak is what was live, repeatable to ~1 MiB); it counts as
bounded when its peak grows by at most a quarter of what the dense code matrix [tokens x d_sae] grows by (a
keep-everything miner grows by all of it) + 4 MiB.
`feature_mining_fraction_of_ideal`: our time against the lean forward to the hook plus `x @ W_enc` alone over the
same batches, measured in our worker right after each of our runs. Beside it, the dictionary's own encode as
mining calls it (matmul, bias, the per-row top-k, its values and latents; `feature_mining_encode_seconds`) and
`x @ W_enc` alone (`feature_mining_encode_matmul_seconds`), timed per batch over the same batches; their difference
over what the 0.8 goal leaves beyond the ideal (ideal / 0.8 - ideal) is `feature_mining_topk_share_of_goal_slack`:
above 1, the TopK dictionary's top-k by itself costs more than the goal allows on top of the ideal.

Without SAEDashboard installed (`make bench` installs it with --no-deps: its pins conflict with transformer-lens 3
and transformers 5, but its code runs with them), the import error is printed and the peer becomes the plain loop a
researcher would write: encode every token keeping all activations, then per feature sort the context maxima for
the top examples and draw the interval examples from masks over all tokens (key `feature_mining_vs_plain_loop`).

    .venv/bin/python benchmarks/bench_mining.py [--tokens 262144] [--reps 3] [--peer auto|saedashboard|plain]
                                                [--peer-features F] [--no-save]
BENCH_SCALE (float, default 1) scales the tokens and, below 1, SAEDashboard's feature count; BENCH_NO_SAVE=1 or
--no-save leaves benchmarks/results.json alone.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import warnings

from mining_sides import BATCH, FIT_STEPS, HERE, HOOK, K, N_QUANT, N_TOP, PEERS, PER_QUANT, SCALE, prepare
from mining_worker import Worker, worker
from rounds import spread
from run import GOALS

GOAL_FRACTION = GOALS["feature_mining_fraction_of_ideal"]


def peer_choice(wanted: str) -> tuple[str, str | None]:
    """('saedashboard' | 'plain', the import error when SAEDashboard was wanted but is missing)."""
    if wanted == "plain":
        return "plain", None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import sae_dashboard.sae_vis_runner  # noqa: F401
        return "saedashboard", None
    except Exception as e:  # ImportError, or a broken install raising something else on import
        err = f"{type(e).__name__}: {e}"
        if wanted == "saedashboard":
            raise SystemExit(f"--peer saedashboard but sae_dashboard is not importable: {err}")
        return "plain", err


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=max(BATCH * 128, round(262144 * SCALE)),
                    help="held-out tokens to mine (rounded up to whole contexts)")
    ap.add_argument("--reps", type=int, default=3, help="interleaved timed rounds (at least 3)")
    ap.add_argument("--peer", choices=["auto", "saedashboard", "plain"], default="auto",
                    help="auto: SAEDashboard when importable, else the plain loop")
    ap.add_argument("--peer-features", type=int, default=None,
                    help="features the peer runs (default: all at BENCH_SCALE >= 1, else max(16, d_sae x scale))")
    ap.add_argument("--no-save", action="store_true", help="print only; do not touch benchmarks/results.json")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--contexts", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--features", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args.worker, args.contexts, args.features)
        return 0
    if args.reps < 3:
        ap.error("--reps must be at least 3")
    save = not (args.no_save or os.environ.get("BENCH_NO_SAVE", "") not in ("", "0"))

    peer, import_error = peer_choice(args.peer)
    if import_error:
        print(f"sae_dashboard is not importable ({import_error}); comparing against the plain loop instead "
              f"(install it with `make bench`, or: pip install --no-deps sae-dashboard==0.8.0 eindex-callum "
              f"dataclasses-json marshmallow typing-inspect mypy-extensions)", flush=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        info = prepare(args.tokens)
    N, T, d_sae = info["n_contexts"], info["ctx_len"], info["d_sae"]
    n_tok = N * T
    if not info["encode_max_abs_diff"] <= 1e-5 and peer == "saedashboard":
        print(f"SAELens and ours encode the saved dictionary differently (max abs {info['encode_max_abs_diff']:.2e} "
              f"> 1e-5); not comparing", file=sys.stderr)
        return 1
    F = args.peer_features or (d_sae if SCALE >= 1 else max(16, round(d_sae * SCALE)))
    F = min(F, d_sae)

    # Start the two workers together (their start-up is not timed), then alternate timed runs.
    warm = {"BENCH_WARM_FULL": "1"}  # each timed side warms up once on all the tokens (mining_worker.worker)
    ours_w, peer_w = Worker("ours", N, d_sae, "ours", warm), Worker(peer, N, F, peer, warm)
    runs: dict[str, list[dict]] = {"ours": [], "peer": []}
    try:
        ready = ours_w.read(), peer_w.read()
        threads = ready[0]["threads"]
        for r in range(args.reps):
            for name in (("ours", "peer") if r % 2 == 0 else ("peer", "ours")):
                runs[name].append(ours_w.ask("run+ideal") if name == "ours" else peer_w.ask("run"))
    finally:
        ours_w.close()
        peer_w.close()
    # Bounded memory: ours once at all the tokens and once at 1/8 of them (at least 2 batches), each in a fresh worker
    # whose large allocations all go through mmap (MALLOC_MMAP_THRESHOLD_), so that its peak RSS is what was live
    # rather than what glibc happened to keep; that makes the peak repeatable to ~1 MiB (the timed runs' vary by tens).
    n_small = min(N, max(N // 8, 2 * BATCH))
    probes: dict[int, dict] = {}
    for n in ((n_small, N) if n_small < N else ()):
        w = Worker("ours", n, d_sae, f"ours-memory-{n}", {"MALLOC_MMAP_THRESHOLD_": "65536"})
        try:
            w.read()
            probes[n] = w.ask("run")
        finally:
            w.close()

    # ----- numbers
    o, p = runs["ours"], runs["peer"]
    extrapolated = F < d_sae

    def peer_all(run: dict) -> float:
        """The peer's seconds for all d_sae features (measured, or extrapolated from F; see the docstring)."""
        if not extrapolated:
            return run["seconds"]
        fixed = min(run["fixed_seconds"], run["seconds"])
        return fixed + (run["seconds"] - fixed) * d_sae / F

    ratios = [peer_all(b) / a["seconds"] for a, b in zip(o, p)]
    fractions = [a["ideal_seconds"] / a["seconds"] for a in o]
    ratio, fraction = statistics.median(ratios), statistics.median(fractions)
    t_ours = statistics.median(a["seconds"] for a in o)
    t_peer = statistics.median(peer_all(b) for b in p)
    t_peer_measured = statistics.median(b["seconds"] for b in p)
    t_ideal = statistics.median(a["ideal_seconds"] for a in o)
    # What the goal (0.8 of the ideal) leaves beyond the ideal, against what the dictionary's own top-k costs
    # (its encode less the ideal's matmul, timed over the same batches): a share > 1 means the top-k alone exceeds it.
    t_encode = statistics.median(a["encode_seconds"] for a in o)
    t_matmul = statistics.median(a["matmul_seconds"] for a in o)
    slack = t_ideal / GOAL_FRACTION - t_ideal
    topk_share = (t_encode - t_matmul) / slack
    # Agreement on the features both ran: the largest activation and the firing frequency of each.
    dmax = max(abs(x - y) for x, y in zip(o[0]["max"][:F], p[0]["max"]))
    rel = dmax / max(1e-12, max(o[0]["max"][:F]))
    dfreq = max(abs(x - y) for x, y in zip(o[0]["freq"][:F], p[0]["freq"]))
    ours_peak = max(a["peak_delta_gib"] for a in o)
    peer_peak = max(b["peak_delta_gib"] for b in p)
    dense_gib = n_tok * d_sae * 4 / 2**30
    # Bounded: from 1/8 of the tokens to all of them, our peak may grow by at most a quarter of what the dense code
    # matrix grows by (a keep-everything miner grows by all of it, plus the activations), + 4 MiB of slack.
    dense_growth = (N - n_small) * T * d_sae * 4 / 2**30
    growth = probes[N]["peak_delta_gib"] - probes[n_small]["peak_delta_gib"] if probes else None
    bounded = growth <= 0.25 * dense_growth + 4 / 1024 if probes else None
    loads = [x["load"] for x in o + p]
    load = statistics.mean(loads)

    # ----- table
    peer_label = PEERS[peer].label
    print(f"model {info['which']} ({info['n_layers']} layers, d={info['d_model']}), hook {HOOK}; {n_tok} held-out "
          f"tokens ({N} x {T}); TopK k={K} dictionary, d_sae={d_sae}, fitted {FIT_STEPS} steps (FVU "
          f"{info['fit_fvu']:.2f}); {BATCH} contexts per forward; torch threads {threads}; load average "
          f"{min(loads):.1f}..{max(loads):.1f} on {os.cpu_count()} cores")
    print(f"one dictionary folder, two loaders: SAELens SAE.load_from_disk vs ours load_sae encode 4096 rows to max "
          f"|diff| {info['encode_max_abs_diff']:.1e}")
    print(f"each feature: top {N_TOP} + {N_QUANT} intervals x {PER_QUANT} examples, whole-context windows; "
          f"{args.reps} interleaved rounds, medians")
    rows = [("side", "features", "median s", "tokens/s", "runs (s)", "peak GiB (+ over start)")]
    rows.append(("ours: mine_dictionary + examples", str(d_sae), f"{t_ours:.2f}", f"{n_tok / t_ours:,.0f}",
                 str([round(a["seconds"], 2) for a in o]), f"{max(a['peak_gib'] for a in o):.2f} (+{ours_peak:.3f})"))
    rows.append((peer_label, str(F), f"{t_peer_measured:.2f}", f"{n_tok / t_peer_measured:,.0f}",
                 str([round(b["seconds"], 2) for b in p]), f"{max(b['peak_gib'] for b in p):.2f} (+{peer_peak:.3f})"))
    if extrapolated:
        rows.append((f"  {peer} extrapolated to all features", str(d_sae), f"{t_peer:.2f}", f"{n_tok / t_peer:,.0f}",
                     "fixed + per-feature x d_sae/F", ""))
    rows.append(("ideal: lean forward + x @ W_enc", "", f"{t_ideal:.2f}", f"{n_tok / t_ideal:,.0f}",
                 str([round(a["ideal_seconds"], 2) for a in o]), ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    key = f"feature_mining_vs_{PEERS[peer].key}"
    print(f"{key} = {ratio:.2f}x  (per round {', '.join(f'{x:.2f}' for x in ratios)}; target >= 3"
          f"{'; peer time extrapolated from ' + str(F) + ' of ' + str(d_sae) + ' features' if extrapolated else ''})")
    print(f"feature_mining_fraction_of_ideal = {fraction:.2f}  (per round {', '.join(f'{x:.2f}' for x in fractions)})")
    print(f"the goal {GOAL_FRACTION} of the ideal leaves {slack:.2f} s beyond it; the dictionary's encode as mining "
          f"calls it takes {t_encode:.2f} s, x @ W_enc alone {t_matmul:.2f} s: the top-k "
          f"{t_encode - t_matmul:.2f} s = {topk_share:.2f} of that slack")
    mid = sorted(o, key=lambda a: a["seconds"])[len(o) // 2]
    print(f"ours split (median round, s): mining {mid['mine_seconds']:.2f} = {mid['parts']}, building the examples "
          f"{mid['examples_seconds']:.2f}")
    print(f"{peer} split (last round, s): {p[-1]['parts']}, {PEERS[peer].rest} "
          f"{p[-1]['seconds'] - sum(p[-1]['parts'].values()):.2f}")
    print(f"examples built per feature: ours {o[0]['examples'] / d_sae:.1f}, {peer} {p[0]['examples'] / F:.1f}")
    print(f"agreement on the {F} shared features: max |max activation diff| {dmax:.1e} (relative {rel:.1e}), "
          f"max |frequency diff| {dfreq:.1e}")
    ours_runs = "/".join(f"+{a['peak_delta_gib']:.3f}" for a in o)
    exact = all(x["peak_exact"] for x in o + p + list(probes.values()))
    peer_runs = "/".join(f"+{b['peak_delta_gib']:.3f}" for b in p)
    print(f"memory, timed runs (peak RSS over the run's start): ours {ours_runs} GiB, {peer} {peer_runs} GiB; all "
          f"codes kept dense would be "
          f"{dense_gib:.3f} GiB{'' if exact else ' (peaks since worker start: clear_refs not allowed)'}")
    if probes:
        lo, hi = (probes[n]["peak_delta_gib"] * 1024 for n in (n_small, N))
        print(f"memory, ours alone with every large allocation mmapped: +{lo:.0f} MiB at {n_small * T} tokens, "
              f"+{hi:.0f} MiB at {n_tok}: grew {growth * 1024:+.1f} MiB where the dense codes grow "
              f"{dense_growth * 1024:.0f} MiB -> {'bounded' if bounded else 'NOT bounded'}")
    else:
        print("memory growth not tested: 64 contexts or fewer (under 3 batches)")
    if rel > 1e-3:
        print(f"the two sides disagree on the features' maxima (relative {rel:.1e} > 1e-3); not recording",
              file=sys.stderr)
        return 1
    if not save:
        print("--no-save / BENCH_NO_SAVE: benchmarks/results.json left unchanged")
        return 0
    from sparse_coding.files import update_json

    update_json(HERE / "results.json", {
        key: round(ratio, 3), f"{key}_spread": spread(ratios),
        "feature_mining_fraction_of_ideal": round(fraction, 3),
        "feature_mining_fraction_of_ideal_spread": spread(fractions),
        "feature_mining_encode_seconds": round(t_encode, 3),
        "feature_mining_encode_matmul_seconds": round(t_matmul, 3), "feature_mining_ideal_seconds": round(t_ideal, 3),
        "feature_mining_topk_share_of_goal_slack": round(topk_share, 3),
        "feature_mining_ours_tokens_per_s": round(n_tok / t_ours),
        f"feature_mining_{PEERS[peer].key}_tokens_per_s": round(n_tok / t_peer),
        f"feature_mining_{PEERS[peer].key}_features_run": F,
        "feature_mining_bench_tokens": n_tok, "feature_mining_bench_d_sae": d_sae,
        "feature_mining_encode_max_abs_diff": info["encode_max_abs_diff"],
        "feature_mining_ours_peak_gib": round(ours_peak, 4),
        f"feature_mining_{PEERS[peer].key}_peak_gib": round(peer_peak, 4),
        "feature_mining_ours_memory_bounded": bounded,
        "feature_mining_ours_peak_mib_by_tokens": {str(n * T): round(r["peak_delta_gib"] * 1024, 1)
                                                   for n, r in probes.items()},
        "mining_bench_load_average": round(load, 2), "mining_bench_threads": threads,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
