"""Ensemble training vs separate runs, and vs the machine's own matmul rate.

(a) d=64, 256 toy features, d_sae=256, batch 256: one 16-member ensemble (one toy batch per step, shared) against
    16 separate 1-member runs, each building its own toy sampler and drawing its own batch every step, as separate
    runs would. Reports `ensemble16_vs_sequential` = 16 x median single-run time / median ensemble time
    (target >= 5).
(b) d=256, 1024 toy features, d_sae=1024, batch 1024, 16 members: achieved FLOP rate / torch.mm rate, where the
    achieved rate counts the ideal 12·d·n FLOPs per row per member (forward 2 matmuls, backward 4, i.e. 3x the
    forward's 2·d·n·2) and the mm rate is measured in this run on the five matmul shapes of one member's step.
    Reports `ensemble16_fraction_of_ideal` (target >= 0.80). The loop timed here includes drawing toy data.
    The ratio can exceed 1: the step needs only 10·d·n (x needs no gradient, so the encoder's input-gradient
    matmul is skipped), and on a shared machine the mm rate itself moves between measurements. For comparison
    the same ensemble also runs through plain autograd (the generic `EnsembleSAE._forward`) instead of the ReLU
    kind's hand-written backward.

Both use the ReLU + L1 SAE through the public `train_sae`, logging every 50 steps as a notebook would.
`BENCH_SCALE` (float, default 1) scales the step counts for a quick look.
"""

from __future__ import annotations

import os
import statistics
import time

import sparse_coding  # noqa: F401  (before torch: its OpenMP settings apply, as in the notebooks)
import torch

from matmul_rate import mm_rate
from rounds import spread
from sparse_coding.files import update_json
from sparse_coding.paths import repo_root
from sparse_coding.dictionaries import EnsembleSAE, ReLUSAE, make_sae
from sparse_coding.activations import ToyConfig, ToyData
from sparse_coding.dictionaries import train_sae

E = 16
SCALE = float(os.environ.get("BENCH_SCALE", "1"))


class AutogradReLU(ReLUSAE):
    """The same ReLU SAE through the generic autograd forward (the reference the hand backward is tested against)."""

    _forward = EnsembleSAE._forward


def run(d: int, n: int, batch: int, members: list[int], steps: int, data_seed: int, autograd: bool = False
        ) -> float:
    """Seconds for one whole run: sampler, SAE, `steps` training steps on fresh toy batches."""
    t0 = time.perf_counter()
    data = ToyData(ToyConfig(d=d, n_features=n, mean_active=5, seed=0))
    g = data.generator(data_seed)
    sae = make_sae("relu", d_in=d, d_sae=n, l1_coef=[10 ** (-3 + 2 * i / E) for i in members], seed=members)
    if autograd:
        sae.__class__ = AutogradReLU
    train_sae(sae, lambda s: data.sample(batch, g)[0], steps=steps, lr=1e-3, progress=False, log_every=50,
              input_scale=1.0)  # "auto" would first draw 16 extra batches to estimate it
    return time.perf_counter() - t0


def shape_a() -> tuple[float, float, int]:
    d, n, batch, steps = 64, 256, 256, max(10, int(200 * SCALE))
    run(d, n, batch, list(range(E)), 5, data_seed=0)  # warm-up: allocator, kernels, imports
    # Interleaved, and medians on both sides, so that a burst of load from other processes hits both alike.
    t_ens, t_single = [], []
    for m in range(E):
        if m % 4 == 0:
            t_ens.append(run(d, n, batch, list(range(E)), steps, data_seed=0))
        t_single.append(run(d, n, batch, [m], steps, data_seed=m))
    # Each round (one ensemble run and the 4 single runs after it) gives a ratio; min and max are the spread.
    rounds = [E * statistics.median(t_single[4 * i:4 * i + 4]) / t for i, t in enumerate(t_ens)]
    return statistics.median(t_ens), E * statistics.median(t_single), steps, spread(rounds)


def shape_b() -> tuple[float, float, float, float, int]:
    d, n, batch, steps = 256, 1024, 1024, max(3, int(12 * SCALE))
    rates = [mm_rate(d, n, batch, repeats=3, inner=4)]
    run(d, n, batch, list(range(E)), 2, data_seed=0)  # warm-up
    t_ens = run(d, n, batch, list(range(E)), steps, data_seed=0)
    rates.append(mm_rate(d, n, batch, repeats=3, inner=4))
    t_autograd = run(d, n, batch, list(range(E)), steps, data_seed=0, autograd=True)
    rates.append(mm_rate(d, n, batch, repeats=3, inner=4))
    # The machine is shared: compare with the fastest mm measured around the runs (the conservative choice).
    rate = max(rates)
    ideal = 12 * d * n * batch * E * steps
    return ideal / t_ens, ideal / t_autograd, rate, t_ens, steps


def main() -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    t_ens, t_seq, steps_a, ratio_spread = shape_a()
    achieved, achieved_autograd, rate, t_b, steps_b = shape_b()
    ratio = t_seq / t_ens
    fraction = achieved / rate
    rows = [
        ("(a) d=64 n=256 B=256", f"ensemble x16, {steps_a} steps", f"{t_ens:.2f} s", ""),
        ("", f"16 sequential runs, {steps_a} steps", f"{t_seq:.2f} s",
         f"ensemble {ratio:.1f}x faster (spread {ratio_spread}, goal >= 5)"),
        ("", "(medians: 4 ensemble runs, 16 single runs, interleaved)", "", ""),
        ("(b) d=256 n=1024 B=1024", f"ensemble x16, {steps_b} steps", f"{t_b:.2f} s",
         f"{achieved / 1e9:.1f} GFLOP/s (12dn ideal)"),
        ("", "same, plain autograd backward", "", f"{achieved_autograd / 1e9:.1f} GFLOP/s "
         f"(fraction {achieved_autograd / rate:.2f})"),
        ("", "torch.mm, same shapes", "", f"{rate / 1e9:.1f} GFLOP/s"),
        ("", "fraction of ideal", "", f"{fraction:.2f}"),
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    update_json(repo_root() / "benchmarks/results.json", {
        "ensemble16_vs_sequential": round(ratio, 2),
        "ensemble16_vs_sequential_spread": ratio_spread,
        "ensemble16_fraction_of_ideal": round(fraction, 3),
        # The machine is shared: record how busy it was, since both ratios move with it.
        "ensemble_bench_load_average": round(os.getloadavg()[0], 2),
        "ensemble_bench_threads": torch.get_num_threads(),
    })


if __name__ == "__main__":
    main()
