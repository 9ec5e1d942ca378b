"""Synthetic data with known features (Sharkey et al. 2022, "Taking features out of superposition").

A fixed set of `n_features` random unit directions in `d` dimensions (the ground truth). Each sample switches on
a few of them: feature i fires with probability p_i ∝ decay**i, scaled so that on average `mean_active` are active, with a
magnitude drawn uniform on [0, 1). The sample is the magnitude-weighted sum of the active directions, plus optional
Gaussian noise. Optionally the firing is correlated: a Gaussian copula keeps every p_i exactly but couples the
features through a random correlation matrix Σ — feature i fires when z_i < Φ⁻¹(p_i) with z ~ N(0, Σ).

Because the truth is known, a learned dictionary can be scored directly (see `analyses.recovery`).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass
from typing import Iterator

import torch

from ..arguments import checked
from ..checks import check_int, check_seed



@checked
@dataclass
class ToyConfig:
    """Defaults are Sharkey et al.'s toy setting: 512 features in 256 dimensions, 5 active on average, firing
    probabilities decaying by 0.99 per feature, correlated.

    corr_rank: Σ is the correlation matrix of W Wᵀ + I with W a [n_features, corr_rank] Gaussian matrix, a random
    PSD matrix whose typical off-diagonal |ρ| is about 1/√corr_rank. None (default) = n_features: a full-rank random
    covariance as in Sharkey et al., where the correlations are weak (|ρ| ≈ 0.04 at 512 features) but many. A small
    corr_rank (a few shared factors) gives strong co-firing, a harder problem for every method.
    """

    d: int = 256
    n_features: int = 512
    mean_active: float = 5.0
    decay: float = 0.99
    correlated: bool = True
    noise: float = 0.0
    seed: int = 0
    corr_rank: int | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if not isinstance(self.d, numbers.Integral) or self.d < 1:
            raise ValueError(f"d must be an integer >= 1 (the data dimension), got {self.d!r}")
        if not isinstance(self.n_features, numbers.Integral) or self.n_features < 1:
            raise ValueError(f"n_features must be an integer >= 1, got {self.n_features!r}")
        if not (isinstance(self.mean_active, (int, float)) and 0 < self.mean_active <= self.n_features):
            raise ValueError(f"mean_active (mean number of active features) must be in (0, n_features={self.n_features}], "
                             f"got {self.mean_active!r}; lower mean_active or raise n_features")
        if not (isinstance(self.decay, (int, float)) and 0 < self.decay <= 1):
            raise ValueError(f"decay must be in (0, 1] (1 = every feature equally likely), got {self.decay!r}")
        if not (isinstance(self.noise, (int, float)) and self.noise >= 0 and math.isfinite(self.noise)):
            raise ValueError(f"noise (std of additive Gaussian noise) must be >= 0, got {self.noise!r}")
        if self.corr_rank is not None and (not isinstance(self.corr_rank, numbers.Integral) or self.corr_rank < 1):
            raise ValueError(f"corr_rank must be an integer >= 1, got {self.corr_rank!r}")
        if not isinstance(self.seed, numbers.Integral):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")

    def to_dict(self) -> dict:
        return asdict(self)


@checked
def firing_probabilities(n_features: int, mean_active: float, decay: float) -> torch.Tensor:
    """p_i ∝ decay**i with Σ p_i = mean_active and every p_i ≤ 1 (float64).

    Scaling decay**i to sum mean_active can push the first few past 1 (e.g. mean_active close to n_features, or a steep decay). Those
    are clipped to 1 and the rest rescaled to make up the difference, repeated until nothing exceeds 1, so the
    expected number of active features is still exactly mean_active. A decay steep enough that decay**i underflows
    to 0 for every feature left unclipped is rescaled in log space, so no p_i is NaN."""
    base = decay ** torch.arange(n_features, dtype=torch.float64)
    p = base * (mean_active / base.sum())
    for _ in range(n_features):  # each pass clips at least one more feature, so this ends
        over = p > 1
        if not over.any():
            break
        p = p.clamp(max=1.0)
        free = p < 1
        remaining = mean_active - (~free).sum()
        scale = remaining / base[free].sum()
        if bool(torch.isfinite(scale)):
            p[free] = base[free] * scale
        else:  # every free decay**i underflowed (0/0, or x/subnormal = inf): the same ratios, from their logs
            logs = torch.arange(n_features, dtype=torch.float64)[free] * math.log(decay)
            p[free] = remaining * torch.softmax(logs, dim=0)
    return p.clamp(max=1.0)


@checked
class ToyData:
    """Sampler for one ToyConfig. Ground truth (features, probabilities, correlation factors) is fixed by cfg.seed;
    the samples themselves come from the generator passed to `sample` or the seed given to `batches`."""

    def __init__(self, cfg: ToyConfig, device: str | torch.device = "cpu"):
        if not isinstance(cfg, ToyConfig):
            raise ValueError(f"cfg must be a ToyConfig, got {type(cfg).__name__}")
        cfg.validate()
        self.cfg = cfg
        self.device = torch.device(device)
        g = torch.Generator().manual_seed(cfg.seed)  # ground truth drawn on CPU: identical on every device
        feats = torch.randn(cfg.n_features, cfg.d, generator=g)
        self.features = (feats / feats.norm(dim=1, keepdim=True)).to(self.device)
        self.probabilities = firing_probabilities(cfg.n_features, cfg.mean_active, cfg.decay).float().to(self.device)
        # Fire when z_i < Φ⁻¹(p_i): the same event as Φ(z_i) < p_i, without a CDF per sample. p_i = 1 gives +inf.
        self.thresholds = torch.special.ndtri(self.probabilities.double()).float()
        self._factors = None
        if cfg.correlated:
            w = torch.randn(cfg.n_features, cfg.corr_rank or cfg.n_features, generator=g)
            # z = (W e + u) / sqrt(diag(W Wᵀ) + 1), e ~ N(0, I_r), u ~ N(0, I_F): unit-variance marginals with
            # correlation exactly corr(W Wᵀ + I), at the cost of a [B, r] x [r, F] product per batch.
            self._scale = (w.pow(2).sum(dim=1) + 1).rsqrt().to(self.device)
            self._factors = w.T.contiguous().to(self.device)  # [r, F]
        self._generator = torch.Generator(device=self.device).manual_seed(cfg.seed + 1)

    @property
    def correlation(self) -> torch.Tensor | None:
        """The latent correlation matrix Σ [F, F] of the copula (None when firing is independent)."""
        if self._factors is None:
            return None
        cov = self._factors.T @ self._factors + torch.eye(self.cfg.n_features, device=self.device)
        return cov * self._scale[:, None] * self._scale[None, :]

    def generator(self, seed: int) -> torch.Generator:
        """A generator on this sampler's device, for reproducible `sample` calls. Raises ValueError for a seed that
        is not an int in [0, 2**63) (1.5 would silently be seed 1)."""
        return torch.Generator(device=self.device).manual_seed(check_seed(seed))

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, d] float32 and the true codes [B, F] (magnitude where a feature fires, 0 elsewhere). Raises
        ValueError for a batch_size that is not an int >= 1 (a bool included)."""
        check_int(batch_size, "batch_size", 1, hint=" (samples per batch)")
        g = self._generator if generator is None else generator
        B, F = batch_size, self.cfg.n_features
        if self._factors is None:
            fires = torch.rand(B, F, generator=g, device=self.device) < self.probabilities
        else:
            e = torch.randn(B, self._factors.shape[0], generator=g, device=self.device)
            z = torch.randn(B, F, generator=g, device=self.device).addmm_(e, self._factors).mul_(self._scale)
            fires = z < self.thresholds
        # Only ~mean_active of F entries per row fire, so draw magnitudes and sum directions for those alone: a dense
        # [B, F] x [F, d] product would be most of the cost of a batch.
        rows, cols = fires.nonzero(as_tuple=True)
        mags = torch.rand(rows.shape[0], generator=g, device=self.device)
        codes = torch.zeros(B, F, device=self.device)
        codes[rows, cols] = mags
        x = torch.zeros(B, self.cfg.d, device=self.device).index_add_(0, rows, self.features[cols] * mags[:, None])
        if self.cfg.noise > 0:
            x.add_(torch.randn(B, self.cfg.d, generator=g, device=self.device), alpha=self.cfg.noise)
        return x, codes

    def batches(self, batch_size: int, steps: int, seed: int = 0) -> Iterator[torch.Tensor]:
        """`steps` batches of x, the same ones for the same seed (each call starts a fresh generator). Raises
        ValueError when called (not at the first batch) for a batch_size >= 1, steps >= 0 or seed that is not an
        int (True would mean one step)."""
        check_int(batch_size, "batch_size", 1, hint=" (samples per batch)")
        check_int(steps, "steps", 0)
        return self._batches(batch_size, steps, self.generator(seed))

    def _batches(self, batch_size: int, steps: int, g: torch.Generator) -> Iterator[torch.Tensor]:
        for _ in range(steps):
            yield self.sample(batch_size, generator=g)[0]

    def __repr__(self) -> str:
        return f"ToyData({self.cfg}, device={self.device})"


@checked
def standard_basis_data(n_samples: int, d: int = 10, active: int = 3, seed: int = 0
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """The original team's small K-SVD setting: x [n_samples, d] with exactly `active` of the d standard-basis
    features on in every sample (chosen uniformly), magnitudes uniform on [0, 1); and the truth, the identity [d, d]."""
    if not isinstance(d, numbers.Integral) or d < 1:
        raise ValueError(f"d must be an integer >= 1, got {d!r}")
    if not isinstance(active, numbers.Integral) or not 1 <= active <= d:
        raise ValueError(f"active must be an integer in [1, d={d}], got {active!r}")
    if not isinstance(n_samples, numbers.Integral) or n_samples < 1:
        raise ValueError(f"n_samples must be an integer >= 1, got {n_samples!r}")
    g = torch.Generator().manual_seed(seed)
    on = torch.rand(n_samples, d, generator=g).argsort(dim=1)[:, :active]
    x = torch.zeros(n_samples, d).scatter_(1, on, torch.rand(n_samples, active, generator=g))
    return x, torch.eye(d)
