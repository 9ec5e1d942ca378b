"""Training-step speed: ours vs SAELens's SAETrainer, vs the matmul ideal, and TopK vs dense L1.

(a) One ReLU-L1 SAE, d=512, 4096 latents, batch 4096, float32 on the CPU, the same in-memory batches for both:
    - ours: the public `train_sae` loop (hand-written ReLU forward/backward, fused Adam, decoder projection and
      renormalisation, firing counters), logging every 50 steps as a notebook would;
    - SAELens: its own `StandardTrainingSAE` driven by its own `SAETrainer`, calling the body of `SAETrainer.fit`'s
      loop ourselves (`maybe_reset_sparsity`, `step(batch)`, step counter) so that nothing is read from disk and
      wandb, evals, checkpoints and the progress bar stay off. `step` is SAELens's whole training step: forward,
      loss, firing statistics, backward, gradient clipping, Adam, LR and coefficient schedulers.
    - the matmul ideal: 12·d·n FLOPs per token (forward 2 matmuls, backward 4) at the `torch.mm` rate measured in
      this run on the five matmul shapes of one step (our step needs only 10·d·n: x needs no gradient).
    Reports `l1_vs_saelens` (their median step time / ours; at most ours/ideal over theirs/ideal) and
    `l1_vs_matmul_ideal` (ideal step time / our median step time, goal >= 0.95).
(b) TopK (k=32) vs dense ReLU-L1, both d=512, 16384 latents, batch 4096, both through `train_sae`. TopK decodes
    through only the k chosen decoder rows (forward and backward) and its gradients reach the encoder through the k
    chosen entries only: its encoder forward alone stays a dense matmul. Reports `topk_vs_dense` (dense step / TopK
    step, goal >= 5), and beside it the floor (`Floor`: the float32 encoder matmul, Adam and the decoder
    constraint, which a step that computes every pre-activation in float32 does): `topk_vs_dense_bound` = dense /
    floor, the most `topk_vs_dense` can be that way, and `topk_floor_fraction` = floor / TopK step (goal >= 0.83:
    the TopK step within 20 % of that floor). Where a bfloat16 matmul measures fast enough (`screening.screens`)
    the TopK step runs its dense pass as a bfloat16 screen instead (the picks stay float32's) and can beat that
    floor; its own floor (the screen, Adam, the constraint) then gives `topk_screen_floor_fraction` = screen floor /
    TopK step. `train_bench_topk_screened` records whether it screened. BatchTopK (k=32) and JumpReLU (its
    thresholds set so that L0 ≈ 32 on these inputs at the start of every block: matched L0) run the same sparse step
    and are timed beside them: `batchtopk_vs_dense`, `jumprelu_vs_dense` (the dense ReLU-L1 step above / the kind's
    step, goal >= 3), each kind's L0 at the end of its last block in `train_bench_l0`. JumpReLU is timed in that
    low-L0 regime: early in training, with most entries above θ − ε/2, it takes the dense maths (`picks.DENSE_SHARE`).
(c) AuxK's cost (Gao et al.): the same TopK SAE stepped with 5 % of its latents held dead (AuxK runs on every step)
    and with none dead. Reports `topk_auxk5_step_ratio` (the first step over the second; 1 would be free).

Method (the machine is shared): blocks of steps alternate between the contenders, repeated; per-step times are
taken inside the loops (ours: from the time the loop asks for each batch to the next request; SAELens: around each
loop body); the first step of every block (warm-up, and our logging step) is dropped; each round gives each
contender's median step time and so each ratio once; a ratio is the median over the rounds, with their [min, max] as
its spread (step times in tokens/s are medians over all rounds' steps); the mm rate is measured between blocks and
the fastest measurement is used (the conservative choice for the ideal).
`BENCH_SCALE` (float, default 1) scales the number of repeats.
"""

from __future__ import annotations

import copy
import os
import statistics
import time
from typing import Callable

import sparse_coding  # noqa: F401  (before torch: its OpenMP settings apply, as in the notebooks)
import torch

from matmul_rate import mm_rate
from rounds import cpu_model, median_and_spread
from sparse_coding.files import update_json
from sparse_coding.paths import repo_root
from sparse_coding.dictionaries import make_sae
from sparse_coding.dictionaries.screening import bf16_screen, screens
from sparse_coding.dictionaries.training import adam

from train_parts import BATCH, D, K, L1, LR, N, N_TOPK, Buffers, MatchedJumpReLU, Ours, data_pool

SCALE = float(os.environ.get("BENCH_SCALE", "1"))


class Floor:
    """What every training step of the TopK SAE must do whatever its sparse parts cost: the dense encoder pass
    (all d_sae pre-activations of every row, from which the top k are chosen: a float32 matmul, or with `screened`
    the bfloat16 screen), the Adam step on every parameter and the decoder's unit-norm constraint (gradient
    projection, renormalisation). Timed on a copy of the TopK SAE (same shapes and memory layouts) with fixed random
    gradients, so the contender's own training is left alone. The dense step does all of the float32 floor too, so
    dense step / float32 floor step bounds `topk_vs_dense` for a step without the screen."""

    def __init__(self, ours: Ours, screened: bool):
        self.sae = copy.deepcopy(ours.sae)
        g = torch.Generator().manual_seed(1)
        for p in self.sae.parameters():
            p.grad = torch.empty_like(p).normal_(std=1e-3, generator=g)  # empty_like keeps the parameter's layout
        self.opt = adam(self.sae, LR, (0.9, 0.999))
        self.pool = ours.pool
        self.screened = screened
        self.workspace = Buffers()

    def block(self, steps: int) -> list[float]:
        sae, times = self.sae, []
        for i in range(steps + 1):
            x = self.pool[i % len(self.pool)]
            t0 = time.perf_counter()
            with torch.no_grad():
                xs = sae.expand(x)
                bias = sae.encoder_bias()
                if self.screened:
                    bf16_screen(xs, sae.encoder_weight(), bias, self.workspace)
                else:
                    pre = self.workspace("pre", xs.shape[0], xs.shape[1], sae.d_sae)
                    torch.baddbmm(bias.unsqueeze(1), xs, sae.encoder_weight(), out=pre)
            sae.project_decoder_grad_()
            self.opt.step()
            sae.normalize_decoder_()
            times.append(time.perf_counter() - t0)
        return times[1:]


class HeldDead:
    """A TopK SAE stepped by hand (forward, backward, decoder constraint, Adam, as train_sae does) with a share of
    its latents held dead before every step, so that AuxK runs on each one: with `share` 0 it is the plain step."""

    def __init__(self, pool: list[torch.Tensor], share: float):
        self.sae = make_sae("topk", d_in=D, d_sae=N_TOPK, seed=0, k=K, dead_window=10_000_000)
        self.opt = adam(self.sae, LR, (0.9, 0.999))
        self.pool, self.dead, self.step = pool, int(share * N_TOPK), 0

    def block(self, steps: int) -> list[float]:
        sae, times = self.sae, []
        for _ in range(steps + 1):
            with torch.no_grad():
                sae.tokens_since_fired[:, :self.dead] = 10**12
                sae.tokens_since_fired[:, self.dead:] = 0
            t0 = time.perf_counter()
            out = sae(self.pool[self.step % len(self.pool)])
            self.opt.zero_grad(set_to_none=True)
            out.loss.sum().backward()
            sae.project_decoder_grad_()
            self.opt.step()
            sae.normalize_decoder_()
            times.append(time.perf_counter() - t0)
            self.step += 1
        return times[1:]


class SAELens:
    """SAELens's StandardTrainingSAE under its own SAETrainer, stepped on our in-memory batches."""

    def __init__(self, pool: list[torch.Tensor]):
        from sae_lens import LoggingConfig, StandardTrainingSAE, StandardTrainingSAEConfig
        from sae_lens.config import SAETrainerConfig
        from sae_lens.training.sae_trainer import SAETrainer

        torch.manual_seed(0)
        cfg = StandardTrainingSAEConfig(d_in=D, d_sae=N, l1_coefficient=L1, dtype="float32", device="cpu",
                                        apply_b_dec_to_input=True, normalize_activations="none")
        sae = StandardTrainingSAE(cfg)
        trainer_cfg = SAETrainerConfig(total_training_samples=10**12, train_batch_size_samples=BATCH, lr=LR, lr_end=LR,
                                       device="cpu", logger=LoggingConfig(log_to_wandb=False))
        self.pool = pool
        self.step = 0
        self.trainer = SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=iter(pool))

    def block(self, steps: int) -> list[float]:
        times = []
        for _ in range(steps + 1):
            t0 = time.perf_counter()
            # The body of SAETrainer.fit's loop, minus wandb logging, evals, checkpoints and the progress bar.
            self.trainer.maybe_reset_sparsity()
            self.trainer.step(self.pool[self.step % len(self.pool)])
            self.trainer.n_training_steps += 1
            times.append(time.perf_counter() - t0)
            self.step += 1
        return times[1:]


def compare(contenders: dict[str, Callable[[int], list[float]]], rounds: int, steps: int,
            rates: list[float] | None = None, shape: tuple[int, int, int] | None = None) -> dict[str, float]:
    """Alternate blocks of `steps` steps between contenders for `rounds` rounds; median step time of each over all
    rounds, and (under `rounds`) each round's median step time, from which a ratio's spread is taken."""
    times: dict[str, list[float]] = {name: [] for name in contenders}
    per_round: dict[str, list[float]] = {name: [] for name in contenders}
    for name, block in contenders.items():
        block(2)  # warm-up: allocator, kernels, Adam state
    for r in range(rounds):
        names = list(contenders) if r % 2 == 0 else list(reversed(contenders))  # neither always goes first
        for name in names:
            block_times = contenders[name](steps)
            times[name] += block_times
            per_round[name].append(statistics.median(block_times))
            if rates is not None and shape is not None:
                rates.append(mm_rate(*shape))
    return {name: statistics.median(t) for name, t in times.items()} | {
        f"{name}_n": len(t) for name, t in times.items()} | {"rounds": per_round}


def main() -> None:
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} threads, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, "
          f"load average {os.getloadavg()[0]:.2f}")
    rounds = max(3, round(4 * SCALE))  # a ratio is a median over >= 3 interleaved rounds, with its spread
    pool = data_pool(D, BATCH)

    # (a) ReLU-L1 at d=512, n=4096: ours vs SAELens vs the matmul ideal.
    rates = [mm_rate(D, N, BATCH)]
    ours, theirs = Ours("relu", N, pool, l1_coef=L1), SAELens(pool)
    a = compare({"ours": ours.block, "saelens": theirs.block}, rounds=rounds, steps=5, rates=rates,
                shape=(D, N, BATCH))
    del ours, theirs
    rate = max(rates)
    ideal_step = 12 * D * N * BATCH / rate
    # Each ratio is the median of its per-round ratios (so it lies within its spread); step times are pooled medians.
    l1_vs_saelens, l1_vs_saelens_spread = median_and_spread(a["rounds"]["saelens"], a["rounds"]["ours"])
    l1_vs_ideal, l1_vs_ideal_spread = median_and_spread([ideal_step] * rounds, a["rounds"]["ours"])

    # (b) TopK k=32 vs dense L1 at d=512, n=16384.
    topk, dense = Ours("topk", N_TOPK, pool, k=K), Ours("relu", N_TOPK, pool, l1_coef=L1)
    screened = screens(pool[0], N_TOPK, K)
    floors = {"floor": Floor(topk, screened=False).block}
    if screened:
        floors["screen_floor"] = Floor(topk, screened=True).block
    batchtopk, jumprelu = Ours("batchtopk", N_TOPK, pool, k=K), MatchedJumpReLU(pool)
    b = compare({"topk": topk.block, "dense": dense.block, "batchtopk": batchtopk.block, "jumprelu": jumprelu.block}
                | floors, rounds=rounds, steps=3)
    l0 = {name: round(o.l0, 1) for name, o in (("dense", dense), ("topk", topk), ("batchtopk", batchtopk),
                                                ("jumprelu", jumprelu))}
    del topk, dense, floors, batchtopk, jumprelu
    batchtopk_vs_dense = median_and_spread(b["rounds"]["dense"], b["rounds"]["batchtopk"])
    jumprelu_vs_dense = median_and_spread(b["rounds"]["dense"], b["rounds"]["jumprelu"])
    topk_vs_dense, topk_vs_dense_spread = median_and_spread(b["rounds"]["dense"], b["rounds"]["topk"])
    topk_bound, topk_bound_spread = median_and_spread(b["rounds"]["dense"], b["rounds"]["floor"])
    topk_floor_fraction, topk_floor_fraction_spread = median_and_spread(b["rounds"]["floor"], b["rounds"]["topk"])
    screen_fraction = median_and_spread(b["rounds"]["screen_floor"], b["rounds"]["topk"]) if screened else None

    # (c) AuxK's cost: the TopK step with 5 % of its latents dead over the same step with none dead.
    c = compare({"none": HeldDead(pool, 0.0).block, "dead5": HeldDead(pool, 0.05).block}, rounds=rounds, steps=3)
    auxk5, auxk5_spread = median_and_spread(c["rounds"]["dead5"], c["rounds"]["none"])
    load = os.getloadavg()[0]

    tok = lambda t: f"{BATCH / t:,.0f} tok/s"  # noqa: E731
    rows = [
        ("(a) ReLU-L1 d=512 n=4096 B=4096", "", "", ""),
        ("", f"ours (train_sae), median of {a['ours_n']} steps", f"{a['ours'] * 1e3:.0f} ms", tok(a["ours"])),
        ("", f"SAELens SAETrainer.step, median of {a['saelens_n']}", f"{a['saelens'] * 1e3:.0f} ms",
         tok(a["saelens"])),
        ("", f"matmul ideal (12dn at {rate / 1e9:.0f} GFLOP/s torch.mm)", f"{ideal_step * 1e3:.0f} ms",
         tok(ideal_step)),
        ("", "ours vs SAELens", f"{l1_vs_saelens:.2f}x  spread {l1_vs_saelens_spread}",
         "bounded by SAELens's fraction of the ideal"),
        ("", "ours / ideal", f"{l1_vs_ideal:.2f}  spread {l1_vs_ideal_spread}",
         f"goal >= 0.95 (SAELens {ideal_step / a['saelens']:.2f})"),
        ("(b) d=512 n=16384 B=4096", "", "", ""),
        ("", f"TopK k=32, median of {b['topk_n']} steps", f"{b['topk'] * 1e3:.0f} ms", tok(b["topk"])),
        ("", f"dense ReLU-L1, median of {b['dense_n']} steps", f"{b['dense'] * 1e3:.0f} ms", tok(b["dense"])),
        ("", f"floor: float32 encoder matmul + Adam + decoder constraint, median of {b['floor_n']}",
         f"{b['floor'] * 1e3:.0f} ms", tok(b["floor"])),
        ("", "TopK vs dense", f"{topk_vs_dense:.2f}x  spread {topk_vs_dense_spread}",
         f"goal >= 5; bound dense/floor {topk_bound:.2f}x spread {topk_bound_spread}"),
        ("", "floor / TopK step", f"{topk_floor_fraction:.2f}  spread {topk_floor_fraction_spread}",
         "goal >= 0.83 (TopK within 20 % of its floor)"),
        ("", f"BatchTopK k=32, median of {b['batchtopk_n']} steps", f"{b['batchtopk'] * 1e3:.0f} ms",
         f"vs dense {batchtopk_vs_dense[0]:.2f}x spread {batchtopk_vs_dense[1]} (goal >= 3)"),
        ("", f"JumpReLU at L0 {l0['jumprelu']:g}, median of {b['jumprelu_n']} steps", f"{b['jumprelu'] * 1e3:.0f} ms",
         f"vs dense {jumprelu_vs_dense[0]:.2f}x spread {jumprelu_vs_dense[1]} (goal >= 3)"),
        ("", "L0 (last logged step)", str(l0), ""),
    ] + ([
        ("", f"screen floor: bfloat16 screen + Adam + decoder constraint, median of {b['screen_floor_n']}",
         f"{b['screen_floor'] * 1e3:.0f} ms", tok(b["screen_floor"])),
        ("", "screen floor / TopK step", f"{screen_fraction[0]:.2f}  spread {screen_fraction[1]}",
         "the TopK step screens (fast bfloat16 matmuls): what its sparse parts still cost"),
    ] if screened else [("", "TopK step does not screen (bfloat16 matmuls not fast enough here)", "", "")]) + [
        ("(c) TopK, AuxK", "", "", ""),
        ("", f"5 % of latents dead / none dead, medians of {c['dead5_n']} steps",
         f"{auxk5:.2f}  spread {auxk5_spread}", f"{c['dead5'] * 1e3:.0f} ms vs {c['none'] * 1e3:.0f} ms"),
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    print(f"mm rates measured (GFLOP/s): {', '.join(f'{r / 1e9:.0f}' for r in rates)}; load average {load:.2f}")
    update_json(repo_root() / "benchmarks/results.json", {
        "l1_vs_saelens": round(l1_vs_saelens, 3),
        "l1_vs_matmul_ideal": round(l1_vs_ideal, 3),
        "topk_vs_dense": round(topk_vs_dense, 3),
        "l1_vs_saelens_spread": l1_vs_saelens_spread,
        "l1_vs_matmul_ideal_spread": l1_vs_ideal_spread,
        "topk_vs_dense_spread": topk_vs_dense_spread,
        "topk_vs_dense_bound": round(topk_bound, 3),
        "topk_vs_dense_bound_spread": topk_bound_spread,
        "topk_floor_fraction": round(topk_floor_fraction, 3),
        "topk_floor_fraction_spread": topk_floor_fraction_spread,
        "train_bench_topk_floor_tokens_per_s": round(BATCH / b["floor"]),
        "train_bench_topk_screened": screened,
        # null where the step does not screen, so that no other machine's figure stays behind
        "topk_screen_floor_fraction": round(screen_fraction[0], 3) if screened else None,
        "topk_screen_floor_fraction_spread": screen_fraction[1] if screened else None,
        "train_bench_topk_screen_floor_tokens_per_s": round(BATCH / b["screen_floor"]) if screened else None,
        "batchtopk_vs_dense": round(batchtopk_vs_dense[0], 3),
        "batchtopk_vs_dense_spread": batchtopk_vs_dense[1],
        "jumprelu_vs_dense": round(jumprelu_vs_dense[0], 3),
        "jumprelu_vs_dense_spread": jumprelu_vs_dense[1],
        "train_bench_l0": l0,
        "train_bench_step_seconds": {name: round(b[name], 4) for name in ("dense", "topk", "batchtopk", "jumprelu")},
        "topk_auxk5_step_ratio": round(auxk5, 3),
        "topk_auxk5_step_ratio_spread": auxk5_spread,
        "train_bench_rounds": rounds,
        "train_bench_ours_tokens_per_s": round(BATCH / a["ours"]),
        "train_bench_saelens_tokens_per_s": round(BATCH / a["saelens"]),
        "train_bench_ideal_tokens_per_s": round(BATCH / ideal_step),
        "train_bench_topk_tokens_per_s": round(BATCH / b["topk"]),
        "train_bench_dense16k_tokens_per_s": round(BATCH / b["dense"]),
        # The machine is shared: record how busy it was, since every ratio moves with it.
        "train_bench_load_average": round(load, 2),
        "train_bench_threads": threads,
        "train_bench_omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "train_bench_cpu": cpu_model(),
    })


if __name__ == "__main__":
    main()
