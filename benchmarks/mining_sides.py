"""The sides that benchmarks/bench_mining.py times, and their preparation: this project's miner (`Ours`),
SAEDashboard's runner (`Dashboard`) and the plain loop a researcher would write (`PlainLoop`), with the settings both
sides share. The method and what is compared are in bench_mining.py's docstring."""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path

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

    def encode_parts(self, tokens) -> dict:
        """Seconds of the dictionary's own encode as mining calls it (`sae_picks_encoder`: matmul, bias, the per-row
        top-k, its values and latents) and of x @ W_enc alone, each summed over the same batches (the forward runs
        untimed): what the top-k adds beyond the ideal's matmul."""
        import torch

        from sparse_coding import lm
        from sparse_coding.analyses.features import sae_picks_encoder

        read, encode = lm.hook_reader(self.model, [HOOK]), sae_picks_encoder(self.sae)
        W = self.sae.encoder_weight().detach()[0]
        clock = {"encode_seconds": 0.0, "matmul_seconds": 0.0}
        with torch.inference_mode():
            for c0 in range(0, len(tokens), BATCH):
                x = read(tokens[c0:c0 + BATCH])[HOOK]
                x = x.reshape(-1, x.shape[-1])
                for key, f in (("matmul_seconds", lambda: x @ W), ("encode_seconds", lambda: encode(x))):
                    t0 = time.perf_counter()
                    f()
                    clock[key] += time.perf_counter() - t0
        return clock

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
