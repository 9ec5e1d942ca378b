"""The training benchmark's shared parts (benchmarks/bench_train.py, bench_screen.py): planted data, one SAE trained
in timed blocks through `train_sae`, the matched-L0 JumpReLU, kept buffers."""

from __future__ import annotations

import time

import sparse_coding  # noqa: F401  (before torch: its OpenMP settings apply, as in the notebooks)
import torch

from sparse_coding.dictionaries import make_sae
from sparse_coding.dictionaries.training import adam, train_sae

D, N, N_TOPK, K, BATCH, L1 = 512, 4096, 16384, 32, 4096, 1e-3
LR = 3e-4


def data_pool(d: int, batch: int, n_batches: int = 4, seed: int = 0) -> list[torch.Tensor]:
    """Sparse planted data (2048 unit features, ~20 active per row): realistic sparsity for the ReLU codes."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(2048, d, generator=g)
    feats /= feats.norm(dim=1, keepdim=True)
    out = []
    for _ in range(n_batches):
        fire = torch.rand(batch, 2048, generator=g) < 20 / 2048
        out.append((fire * torch.rand(batch, 2048, generator=g)) @ feats * (d / 20 * 3) ** 0.5)
    return out


class Blocks:
    """An SAE trained through `train_sae` in timed blocks of steps on a pool of batches; the optimizer is carried
    over, so the blocks continue one run. `block(steps)` returns per-step seconds (from one batch request to the
    next), the block's first (logged) step dropped; `l0` is the last logged step's."""

    def __init__(self, sae, pool: list[torch.Tensor], lr: float):
        self.sae, self.pool, self.lr = sae, pool, lr
        self.opt = adam(sae, lr, (0.9, 0.999))
        self.step = 0
        self.l0 = float("nan")

    def block(self, steps: int) -> list[float]:
        stamps: list[float] = []

        def batch(s: int) -> torch.Tensor:
            stamps.append(time.perf_counter())
            self.step += 1
            return self.pool[self.step % len(self.pool)]

        # Two extra steps: the first (logged) is dropped, the last one's request closes the timing of the one before.
        # input_scale given: "auto" would draw 16 batches first to estimate it, and time those draws as steps.
        log = train_sae(self.sae, batch, steps=steps + 2, lr=self.lr, progress=False, log_every=50,
                        optimizer=self.opt, input_scale=1.0)
        self.l0 = float(log["l0"].iloc[-1])
        return [b - a for a, b in zip(stamps, stamps[1:])][1:]


class Ours(Blocks):
    """One SAE of `kind` at d_in D, trained in timed blocks at LR (see `Blocks`)."""

    def __init__(self, kind: str, d_sae: int, pool: list[torch.Tensor], **hp):
        # Each block is a short train_sae run; its default dead window (a tenth of the run, at least one batch) would
        # count every latent silent in the last batch as dead and make AuxK search nearly all of them. The steady
        # state of a long run is what is timed, with Gao et al.'s 10M-token window (the earlier default).
        super().__init__(make_sae(kind, d_in=D, d_sae=d_sae, seed=0, dead_window=10_000_000, **hp), pool, LR)


class MatchedJumpReLU(Ours):
    """A JumpReLU SAE whose thresholds (one value for every latent) are set before every block to keep K·BATCH
    entries of the first batch: L0 ≈ K, as TopK's, at every timed step (Adam's first steps move the encoder enough
    to halve the L0 within a few blocks otherwise)."""

    def __init__(self, pool: list[torch.Tensor]):
        super().__init__("jumprelu", N_TOPK, pool, l0_coef=1.0)

    def block(self, steps: int) -> list[float]:
        with torch.no_grad():
            pre = self.sae.pre_activations(self.pool[0])
            theta = pre.flatten().topk(K * BATCH).values.min()
            del pre
            self.sae.log_threshold.fill_(float(theta.log()))
        return super().block(steps)


class Buffers:
    """Buffers kept from call to call, as a training step keeps them (fresh large ones cost page faults on every
    call): the `workspace(name, *shape, dtype=)` that dictionaries.screening takes."""

    def __init__(self):
        self.kept: dict = {}

    def __call__(self, name: str, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        key = (name, shape, dtype)
        if key not in self.kept:
            self.kept[key] = torch.empty(*shape, dtype=dtype)
        return self.kept[key]
