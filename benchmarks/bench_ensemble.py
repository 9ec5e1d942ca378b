"""Ensemble training vs separate runs, and vs the machine's own matmul rate.

(a) d=64, 256 toy features, d_sae=256, batch 256: one 16-member ensemble (one toy batch per step, shared) against
    16 separate 1-member runs, each building its own toy sampler and drawing its own batch every step, as separate
    runs would. Reports `ensemble16_vs_sequential` = 16 x median single-run time / median ensemble time
    (target >= 5).
(b) d=256, 1024 toy features, d_sae=1024, batch 1024, 16 members: the ideal step (12·d·n FLOPs per row per member:
    forward 2 matmuls, backward 4, i.e. 3x the forward's 2·d·n·2, at the torch.mm rate measured in this run on the
    five matmul shapes of one member's step) over the median training step (`train_sae`, timed per step from one
    batch request to the next, on a pool of pre-drawn toy batches, the logged first step of each block dropped), in
    3 rounds interleaved with the mm rate. Reports `ensemble16_fraction_of_ideal` (median of the rounds, goal >= 0.80)
    with its spread.
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
from rounds import cpu_model, spread
from sparse_coding.files import update_json
from sparse_coding.paths import repo_root
from sparse_coding.dictionaries import EnsembleSAE, ReLUSAE, make_sae
from sparse_coding.activations import ToyConfig, ToyData
from sparse_coding.dictionaries import train_sae
from train_parts import Blocks

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


class Block(Blocks):
    """One 16-member ensemble trained through `train_sae` in blocks of steps on a pool of pre-drawn toy batches
    (drawing is the sampler's cost, not the step's); the optimizer carries over, so the blocks continue one run."""

    def __init__(self, d: int, n: int, batch: int, autograd: bool = False):
        data = ToyData(ToyConfig(d=d, n_features=n, mean_active=5, seed=0))
        g = data.generator(0)
        sae = make_sae("relu", d_in=d, d_sae=n, l1_coef=[10 ** (-3 + 2 * i / E) for i in range(E)],
                       seed=list(range(E)))
        if autograd:
            sae.__class__ = AutogradReLU
        super().__init__(sae, [data.sample(batch, g)[0] for _ in range(4)], lr=1e-3)


def shape_b() -> tuple[float, list[float], float, float, float, int]:
    """Rounds of: a block of ensemble steps, a block through plain autograd, the mm rate. Each round's fraction is
    the ideal step (12·d·n FLOPs per row per member at that round's fastest mm rate) over the median step."""
    d, n, batch = 256, 1024, 1024
    steps, rounds = max(3, int(6 * SCALE)), 3
    ours, plain = Block(d, n, batch), Block(d, n, batch, autograd=True)
    ours.block(2), plain.block(2)  # warm-up: allocator, kernels, Adam state
    fractions, autograd_fractions, rates, t_ours = [], [], [], []
    for _ in range(rounds):
        t = statistics.median(ours.block(steps))
        t_plain = statistics.median(plain.block(steps))
        rate = max(mm_rate(d, n, batch, repeats=3, inner=4) for _ in range(2))
        ideal = 12 * d * n * batch * E / rate
        fractions.append(ideal / t)
        autograd_fractions.append(ideal / t_plain)
        rates.append(rate)
        t_ours.append(t)
    return (statistics.median(fractions), spread(fractions), statistics.median(autograd_fractions),
            statistics.median(rates), statistics.median(t_ours), steps * rounds)


def main() -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    t_ens, t_seq, steps_a, ratio_spread = shape_a()
    fraction, fraction_spread, fraction_autograd, rate, t_b, steps_b = shape_b()
    ratio = t_seq / t_ens
    rows = [
        ("(a) d=64 n=256 B=256", f"ensemble x16, {steps_a} steps", f"{t_ens:.2f} s", ""),
        ("", f"16 sequential runs, {steps_a} steps", f"{t_seq:.2f} s",
         f"ensemble {ratio:.1f}x faster (spread {ratio_spread}, goal >= 5)"),
        ("", "(medians: 4 ensemble runs, 16 single runs, interleaved)", "", ""),
        ("(b) d=256 n=1024 B=1024", f"ensemble x16, median step of {steps_b}", f"{t_b * 1e3:.0f} ms",
         f"{12 * 256 * 1024 * 1024 * E / t_b / 1e9:.1f} GFLOP/s (12dn ideal)"),
        ("", "same, plain autograd backward", "", f"fraction {fraction_autograd:.2f}"),
        ("", "torch.mm, same shapes (median of rounds)", "", f"{rate / 1e9:.1f} GFLOP/s"),
        ("", "fraction of ideal (median of 3 rounds)", "", f"{fraction:.2f} spread {fraction_spread} (goal >= 0.8)"),
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    update_json(repo_root() / "benchmarks/results.json", {
        "ensemble16_vs_sequential": round(ratio, 2),
        "ensemble16_vs_sequential_spread": ratio_spread,
        "ensemble16_fraction_of_ideal": round(fraction, 3),
        "ensemble16_fraction_of_ideal_spread": fraction_spread,
        "ensemble16_step_seconds": round(t_b, 4),
        "ensemble_bench_cpu": cpu_model(),
        # The machine is shared: record how busy it was, since both ratios move with it.
        "ensemble_bench_load_average": round(os.getloadavg()[0], 2),
        "ensemble_bench_threads": torch.get_num_threads(),
    })


if __name__ == "__main__":
    main()
