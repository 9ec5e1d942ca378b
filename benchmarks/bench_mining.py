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

Method (the machine may be shared): each side lives in its own worker process (imports, model, warm-up once); the
timed runs alternate between the two (>= 3 repetitions, the first side swapping each round), each ratio is the
median of the per-round ratios, and `<key>_spread` is [min, max] over rounds. Peak memory: each worker resets its
peak-RSS mark (/proc/self/clear_refs) before a run and reports VmHWM minus the RSS it started the run with (these
vary by tens of MiB between runs: glibc keeps freed memory or not). For the verdict, ours also runs once on all the
tokens and once on 1/8 of them (at least 2 batches), each in a fresh worker with MALLOC_MMAP_THRESHOLD_=65536 (every
large allocation mmapped and returned on free, so the peak is what was live, repeatable to ~1 MiB); it counts as
bounded when its peak grows by at most a quarter of what the dense code matrix [tokens x d_sae] grows by (a
keep-everything miner grows by all of it) + 4 MiB.
`feature_mining_fraction_of_ideal`: our time against the lean forward to the hook plus `x @ W_enc` alone over the
same batches, measured in our worker right after each of our runs.

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
import gc
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

from rounds import spread

HOOK = "blocks.2.hook_resid_post"
BATCH = 32        # contexts per forward pass, both sides
N_TOP = 20        # top examples per feature
N_QUANT = 10      # equal-width activation intervals
PER_QUANT = 5     # examples per interval
K, RATIO, FIT_STEPS = 32, 4, 30
SCALE = float(os.environ.get("BENCH_SCALE", "1"))
MARK = "@@"       # worker replies on stdout start with this; anything else a library prints is ignored
HERE = Path(__file__).resolve().parent
WORK = HERE.parent / "build" / "bench-mining"


# ------------------------------------------------------------------------------------------------ memory

def _status(key: str) -> float:
    """GiB of a /proc/self/status field (VmRSS, VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not allowed (peak is then since start)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ------------------------------------------------------------------------------------------------ preparation

def get_model_dir():
    """(model folder, data dir, label): the default offline model if notebook 00 has run, else a 20-step model of
    the default shape (the same one bench_harvest.py trains; throughput does not depend on how well it is trained)."""
    from sparse_coding import lm
    from sparse_coding.paths import repo_root

    default_data = repo_root() / "data"
    if (lm.offline_dir(default_data) / "final" / "config.json").exists():
        return lm.offline_dir(default_data), default_data, "offline"
    data = repo_root() / "build" / "bench-harvest" / "data"
    if not (lm.offline_dir(data) / "final" / "config.json").exists():
        print(f"no trained model in {lm.offline_dir(default_data)}; training a 20-step model of the default shape "
              f"into {data}", flush=True)
    lm.train_offline_model(data, lm.LMConfig(steps=20, eval_every=1000), progress=False)
    return lm.offline_dir(data), data, "offline-20step"


def prepare(n_tokens: int) -> dict:
    """Tokens and the dictionary folder under build/bench-mining; the two loaders' encodings compared."""
    import torch

    from sparse_coding import dictionaries, lm
    from sparse_coding.files import save_json, save_tensors

    model_dir, data_dir, which = get_model_dir()
    model = lm.load_model(model_dir)
    lm.check_hooks(model, [HOOK])
    tokens = lm.held_out_contexts(model, "offline", n_tokens, data_dir=data_dir)
    # Fit the dictionary on the model's training text (never the held-out text mined below).
    train = lm.validation_contexts(model_dir, split="train")[:256]
    read = lm.hook_reader(model, [HOOK])
    acts = torch.cat([read(train[i:i + BATCH])[HOOK].reshape(-1, int(model.cfg.d_model))
                      for i in range(0, len(train), BATCH)])
    sae = dictionaries.make_sae("topk", int(model.cfg.d_model), ratio=RATIO, k=K, seed=0)
    log = dictionaries.train_sae(sae, acts, steps=FIT_STEPS, batch_size=1024, progress=False, log_every=FIT_STEPS)
    WORK.mkdir(parents=True, exist_ok=True)
    folder = WORK / "sae"
    dictionaries.save_sae(sae, folder, metadata={"model_name": which, "hook_name": HOOK, "context_size":
                                                 int(tokens.shape[1]), "prepend_bos": False}, overwrite=True)
    save_tensors(WORK / "tokens.safetensors", {"tokens": tokens})

    ours = dictionaries.load_sae(folder)
    with torch.no_grad():
        a = ours.encode(acts[:4096])[0]
        try:
            from sae_lens import SAE

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                theirs = SAE.load_from_disk(str(folder), device="cpu")
            b = theirs.encode(acts[:4096])
            diff = float((a - b).abs().max())
        except ImportError as e:  # SAELens is a dev dependency; without it only the plain loop can run
            print(f"sae_lens not importable ({type(e).__name__}: {e}); encodings not cross-checked")
            diff = float("nan")
    last = log.iloc[-1]
    info = {"model_dir": str(model_dir), "which": which, "n_layers": int(model.cfg.n_layers),
            "d_model": int(model.cfg.d_model), "d_sae": int(ours.d_sae), "n_contexts": int(tokens.shape[0]),
            "ctx_len": int(tokens.shape[1]), "encode_max_abs_diff": diff, "fit_fvu": float(last["fvu"]),
            "fit_l0": float(last["l0"]), "fit_dead_frac": float(last["dead_frac"])}
    save_json(WORK / "prep.json", info)
    return info


# ------------------------------------------------------------------------------------------------ the two sides

class Ours:
    """mine_dictionary + every feature's top examples and quantile examples (locations with their token windows)."""

    def __init__(self, info: dict, tokens):
        from sparse_coding import dictionaries, lm

        self.model = lm.load_model(info["model_dir"])
        self.sae = dictionaries.load_sae(WORK / "sae")
        self.tokens = tokens

    def run(self, tokens) -> tuple[dict, object]:
        from sparse_coding.analyses.features import mine_dictionary

        t0 = time.perf_counter()
        mined = mine_dictionary(self.model, self.sae, HOOK, tokens, batch_size=BATCH, n_top=N_TOP, n_random=5,
                                per_bin=4, window=None, seed=0, progress=False)
        t1 = time.perf_counter()
        built = 0
        for f in range(mined.n_directions):
            built += len(mined.top_examples(f))
            for _, _, exs in mined.quantile_examples(f, N_QUANT, PER_QUANT, seed=0):
                built += sum(len(e.tokens) > 0 for e in exs)
        t2 = time.perf_counter()
        out = {"seconds": t2 - t0, "mine_seconds": t1 - t0, "examples_seconds": t2 - t1, "examples": built,
               "parts": {k: round(v, 3) for k, v in mined.meta.items() if k.endswith("_seconds")},
               "max": mined.max.tolist(), "freq": mined.frequency().tolist()}
        return out, mined

    def ideal(self, tokens) -> float:
        """Seconds for the lean forward to the hook plus x @ W_enc over the same batches, nothing else."""
        import torch

        from sparse_coding import lm

        read = lm.hook_reader(self.model, [HOOK])
        W = self.sae.encoder_weight().detach()[0]
        t0 = time.perf_counter()
        with torch.inference_mode():
            for c0 in range(0, len(tokens), BATCH):
                x = read(tokens[c0:c0 + BATCH])[HOOK]
                x.reshape(-1, x.shape[-1]) @ W
        return time.perf_counter() - t0

    def quantile_acts(self, mined, n_sample: int = 16) -> dict:
        """Per-token activations of the quantile examples' windows through `examples_at` (one forward over the
        examples' contexts per feature), timed on a seeded sample of live features, extrapolated to all live ones."""
        import torch

        from sparse_coding.analyses.features import examples_at

        live = (mined.count > 0).nonzero().squeeze(1)
        g = torch.Generator().manual_seed(0)
        sample = live[torch.randperm(len(live), generator=g)[:n_sample]].tolist()
        t0 = time.perf_counter()
        for f in sample:
            locs = [loc for _, _, ls in mined.quantile_locations(f, N_QUANT, PER_QUANT, seed=0) for loc in ls]
            examples_at(self.model, self.sae, HOOK, mined, f, locs)
        dt = time.perf_counter() - t0
        per = dt / max(1, len(sample))
        return {"sampled": len(sample), "per_feature_seconds": per, "all_seconds": per * len(live),
                "n_live": len(live)}


class Dashboard:
    """SAEDashboard's SaeVisRunner on the SAELens-loaded dictionary, all requested features in one feature batch."""

    label = "SAEDashboard SaeVisRunner.run"
    key = "saedashboard"
    rest = "other (histograms, logit tables, correlation tables, packing)"

    def __init__(self, info: dict, tokens):
        import sae_dashboard.feature_data_generator as fdg
        import sae_dashboard.sequence_data_generator as sdg
        import sae_dashboard.utils_fns as uf
        from sae_lens import SAE

        from sparse_coding import lm

        self.model = lm.load_model(info["model_dir"])
        self.sae = SAE.load_from_disk(str(WORK / "sae"), device="cpu")
        # run() folds decoder norms into the encoder in place; that refuses a TopK SAE without decoder-norm
        # rescaling and would change the activations otherwise. Our SAE is used as saved, so must be theirs.
        self.sae.fold_W_dec_norm = lambda: None
        self.clock: dict[str, float] = {}
        self._wrap(fdg.FeatureDataGenerator, "get_model_acts", "forward")
        self._wrap(self.sae, "encode", "encode")
        self._wrap(sdg.SequenceDataGenerator, "get_sequences_data", "example groups")
        self._wrap(uf.FeatureStatistics, "create", "statistics")

    def _wrap(self, owner, name: str, key: str) -> None:
        f = getattr(owner, name)
        clock = self.clock

        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return f(*a, **k)
            finally:
                clock[key] = clock.get(key, 0.0) + time.perf_counter() - t0

        setattr(owner, name, timed)

    def config(self, features: list[int]):
        from sae_dashboard.components_config import (ActsHistogramConfig, FeatureTablesConfig, LogitsHistogramConfig,
                                                     LogitsTableConfig, SequencesConfig)
        from sae_dashboard.layout import Column, SaeVisLayoutConfig
        from sae_dashboard.sae_vis_data import SaeVisConfig

        # All five components are required by run(); buffer=None = whole contexts, any position (as ours).
        layout = SaeVisLayoutConfig(columns=[Column(
            SequencesConfig(buffer=None, n_quantiles=N_QUANT, top_acts_group_size=N_TOP, quantile_group_size=PER_QUANT),
            ActsHistogramConfig(), LogitsHistogramConfig(), LogitsTableConfig(), FeatureTablesConfig())])
        return SaeVisConfig(hook_point=HOOK, features=features, minibatch_size_tokens=BATCH,
                            minibatch_size_features=len(features), feature_centric_layout=layout, device="cpu",
                            dtype="float32", seed=0, verbose=False)

    def run(self, tokens, features: list[int]) -> tuple[dict, object]:
        from sae_dashboard.sae_vis_runner import SaeVisRunner

        self.clock.clear()
        t0 = time.perf_counter()
        data = SaeVisRunner(self.config(features)).run(encoder=self.sae, model=self.model, tokens=tokens)
        dt = time.perf_counter() - t0
        built = sum(len(g.seq_data) for f in features for g in data.feature_data_dict[f].sequence_data.seq_group_data)
        parts = dict(self.clock)
        out = {"seconds": dt, "fixed_seconds": parts.get("forward", 0.0) + parts.get("encode", 0.0),
               "parts": {k: round(v, 3) for k, v in parts.items()}, "examples": built,
               "max": list(data.feature_stats.max), "freq": list(data.feature_stats.frac_nonzero)}
        return out, data


class PlainLoop:
    """What a researcher would write without a miner: encode every token and keep all codes [N, T, d_sae], then per
    feature sort the context maxima for the top examples and draw each interval's examples from a mask over all
    tokens. Same forward (lean reader) and encoder as ours, so only the mining strategy differs."""

    label = "plain loop (keep all codes, sort)"
    key = "plain_loop"
    rest = "per-feature sorting, masks and examples"

    def __init__(self, info: dict, tokens):
        from sparse_coding import dictionaries, lm

        self.model = lm.load_model(info["model_dir"])
        self.sae = dictionaries.load_sae(WORK / "sae")

    def run(self, tokens, features: list[int]) -> tuple[dict, object]:
        import torch

        from sparse_coding import lm
        from sparse_coding.analyses.features import sae_encoder

        read, enc = lm.hook_reader(self.model, [HOOK]), sae_encoder(self.sae)
        N, T = tokens.shape
        t0 = time.perf_counter()
        with torch.inference_mode():
            codes = torch.empty(N, T, int(self.sae.d_sae))
            for c0 in range(0, N, BATCH):
                x = read(tokens[c0:c0 + BATCH])[HOOK]
                codes[c0:c0 + len(x)] = enc(x.reshape(-1, x.shape[-1])).reshape(len(x), T, -1)
            t1 = time.perf_counter()
            g = torch.Generator().manual_seed(0)
            maxima, freq, built, result = [], [], 0, {}
            for f in features:
                a = codes[:, :, f].contiguous()  # [N, T]
                cmax, carg = a.max(dim=1)
                order = torch.argsort(cmax, descending=True)[:N_TOP]
                top = [(c, int(carg[c]), float(cmax[c]), tokens[c].tolist(), a[c].tolist())
                       for c in order.tolist() if cmax[c] > 0]
                flat = a.flatten()
                mx = float(flat.max())
                fired = flat > 0
                stats = [float(fired.sum())] + [float((flat.double() ** i).sum()) for i in range(1, 5)]
                groups = []
                for j in range(N_QUANT):
                    lo, hi = mx * j / N_QUANT, mx * (j + 1) / N_QUANT
                    idx = ((flat > lo) & (flat <= hi)).nonzero().squeeze(1)
                    pick = idx[torch.randperm(len(idx), generator=g)[:PER_QUANT]].tolist()
                    groups.append([(i // T, i % T, float(flat[i]), tokens[i // T].tolist(), a[i // T].tolist())
                                   for i in pick])
                result[f] = (top, groups, stats)
                built += len(top) + sum(len(gr) for gr in groups)
                maxima.append(max(mx, 0.0))
                freq.append(stats[0] / flat.numel())
        dt = time.perf_counter() - t0
        return {"seconds": dt, "fixed_seconds": t1 - t0, "parts": {"forward + encode, keep all": round(t1 - t0, 3)},
                "examples": built, "max": maxima, "freq": freq}, (codes, result)


PEERS = {"saedashboard": Dashboard, "plain": PlainLoop}


# ------------------------------------------------------------------------------------------------ worker process

def worker(side: str, n_contexts: int, n_features: int) -> None:
    """Load once, warm up, then answer `run` / `quantile_acts` / `quit` lines on stdin with MARK + JSON lines."""
    import torch

    from sparse_coding.files import load_json, load_tensors

    warnings.simplefilter("ignore")
    info = load_json(WORK / "prep.json")
    tokens = load_tensors(WORK / "tokens.safetensors")["tokens"].long()[:n_contexts]
    features = list(range(n_features))

    def reply(obj) -> None:
        sys.stdout.write(MARK + json.dumps(obj) + "\n")
        sys.stdout.flush()

    if side == "ours":
        impl = Ours(info, tokens)
        impl.run(tokens[: 2 * BATCH])  # warm-up: lazy imports, first-call allocations
        impl.ideal(tokens[:BATCH])
    else:
        impl = PEERS[side](info, tokens)
        impl.run(tokens[: 2 * BATCH], features[:8])
    last = None
    reply({"ready": True, "threads": torch.get_num_threads()})
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "quit":
            break
        if cmd in ("run", "run+ideal"):
            last = None
            gc.collect()
            exact = _reset_peak()
            start = _status("VmRSS")
            out, last = impl.run(tokens) if side == "ours" else impl.run(tokens, features)
            out["peak_gib"] = _status("VmHWM")
            out["start_gib"] = start
            out["peak_delta_gib"] = out["peak_gib"] - start
            out["peak_exact"] = exact
            out["load"] = os.getloadavg()[0]
            if cmd == "run+ideal":
                out["ideal_seconds"] = impl.ideal(tokens)
            if side != "ours":
                last = None  # the peer's results are not needed again; free them before the next round
            reply(out)
        elif cmd == "quantile_acts":
            reply(impl.quantile_acts(last))
        else:
            reply({"error": f"unknown command {cmd!r}"})


class Worker:
    """A worker subprocess for one side; its stderr goes to a log file shown when it fails."""

    def __init__(self, side: str, n_contexts: int, n_features: int, tag: str, env: dict | None = None):
        self.side = side
        self.log_path = WORK / f"worker-{tag}.log"
        self.log = open(self.log_path, "w")
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                   **(env or {}))
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--worker", side, "--contexts", str(n_contexts),
             "--features", str(n_features)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
            text=True, env=env)

    def read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(MARK):
                return json.loads(line[len(MARK):])
        self.log.flush()
        tail = self.log_path.read_text()[-3000:]
        raise RuntimeError(f"{self.side} worker exited (code {self.proc.wait()}); its stderr ends with:\n{tail}")

    def ask(self, cmd: str) -> dict:
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        out = self.read()
        if "error" in out:
            raise RuntimeError(out["error"])
        return out

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
        self.log.close()


# ------------------------------------------------------------------------------------------------ main

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
    ours_w, peer_w = Worker("ours", N, d_sae, "ours"), Worker(peer, N, F, peer)
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
