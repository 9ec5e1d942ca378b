"""Defaults a newcomer can trust: `make_sae(kind, d, ratio=...)` and `train_sae(sae, x)` with every other argument
left at its default recover a planted dictionary on raw data, whatever the data's scale (inputs are normalised by
default, coefficients are set for normalised inputs, the dead window is sized to the run)."""

import os

import pytest
import torch

from sparse_coding.analyses import expected_random_mmcs
from sparse_coding.analyses.recovery import mmcs_to_truth
from sparse_coding.dictionaries import make_sae
from sparse_coding.dictionaries.training import train_sae


def planted(d: int, n: int, active: float, rows: int, scale: float, seed: int = 0):
    """x [rows, d] = scale · Σ (a random `active`/n share of n unit features, magnitudes uniform [0, 1))."""
    g = torch.Generator().manual_seed(seed)
    D = torch.randn(n, d, generator=g)
    D /= D.norm(dim=1, keepdim=True)
    fire = torch.rand(rows, n, generator=g) < active / n
    return scale * (fire * torch.rand(rows, n, generator=g)) @ D, D


def _kw(kind: str, active: int) -> dict:
    # k is the one setting TopK and BatchTopK cannot default: it is the sparsity asked for (here the data's own).
    return {"k": active} if kind in ("topk", "batchtopk") else {}


@pytest.mark.parametrize("scale", [0.02, 50.0])
@pytest.mark.parametrize("kind", ["relu", "topk", "batchtopk", "jumprelu"])
def test_defaults_recover_a_planted_dictionary_at_any_scale(kind, scale):
    x, D = planted(32, 64, 3, 100_000, scale)
    sae = make_sae(kind, 32, ratio=4, **_kw(kind, 3))
    hist = train_sae(sae, x, progress=False)
    score = float(mmcs_to_truth(sae.decoder_directions()[0], D))
    assert score >= 0.9, (kind, scale, score, hist.tail(1).to_dict("records"))
    assert score > expected_random_mmcs(32, 64) + 0.4
    # the input scale was found from the data: the same SAE sees the same normalised inputs at every scale
    assert sae.input_scale * scale == pytest.approx(float(32 / (x / scale).pow(2).sum(1).mean()) ** 0.5, rel=0.05)


def test_topk_default_dead_window_lets_auxk_revive_latents():
    # Gao et al.'s 10M-token window never closes in a short run (AuxK would never see a dead latent); the default
    # is a tenth of the run, and few latents are dead at the end.
    x, D = planted(32, 64, 3, 100_000, 1.0)
    sae = make_sae("topk", 32, ratio=4, k=3)
    windows = []
    hist = train_sae(sae, x, progress=False, callback=lambda step, s: windows.append(s.dead_window))
    assert set(windows) == {2000 * 4096 // 10}
    assert hist["dead_frac"].iloc[-1] < 0.1
    # The window belongs to the run: a short run's default does not carry over into the next run of the same SAE
    # (it did: a 4-step warm-up left a one-batch window, and AuxK then searched nearly every latent each step).
    assert sae.dead_window is None
    train_sae(sae, x, steps=4, progress=False)
    windows.clear()
    train_sae(sae, x, steps=100, progress=False, callback=lambda step, s: windows.append(s.dead_window))
    assert set(windows) == {100 * 4096 // 10}
    # A window set by the user stays.
    mine = make_sae("topk", 32, ratio=4, k=3, dead_window=12345)
    train_sae(mine, x, steps=2, progress=False)
    assert mine.dead_window == 12345


class _ForSAELens(torch.nn.Module):
    """Member 0 of an ensemble SAE as SAELens's synthetic evaluation reads one: W_dec, encode, decode."""

    def __init__(self, sae):
        super().__init__()
        self.sae = sae

    @property
    def W_dec(self):
        return self.sae.W_dec.detach()[0]

    def encode(self, x):
        return self.sae.encode(x)[0]

    def decode(self, codes):
        return self.sae.decode(codes.unsqueeze(0))[0]


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("SC_FULL_DEFAULTS"), reason="SAELens's synthetic benchmark at full size (3-7 "
                    "minutes per kind on 2 cores); run with SC_FULL_DEFAULTS=1")
@pytest.mark.parametrize("kind", ["relu", "topk", "batchtopk", "jumprelu"])
def test_defaults_on_saelens_synthetic_benchmark(kind):
    # SAELens's own synthetic data and scorer: 512 true features in 256 dimensions, Zipfian firing (max 0.3, min
    # 0.006: 4.8 active per sample), unit magnitudes, a bias of norm 1; 1M samples; 1024 latents; MCC by
    # `eval_sae_on_synthetic_data` (Hungarian matching of decoder rows to the true features). Nothing is given but
    # TopK's and BatchTopK's k.
    synthetic = pytest.importorskip("sae_lens.synthetic")
    model = synthetic.SyntheticModel(synthetic.SyntheticModelConfig(
        num_features=512, hidden_dim=256, seed=0,
        firing_probability=synthetic.ZipfianFiringProbabilityConfig(min_prob=0.006)))
    torch.manual_seed(0)
    x = model.sample(1_000_000)
    sae = make_sae(kind, 256, 1024, **_kw(kind, 5))
    train_sae(sae, x, progress=False)
    with torch.no_grad():
        result = synthetic.eval_sae_on_synthetic_data(_ForSAELens(sae), model.feature_dict, model.activation_generator,
                                                      num_samples=100_000, batch_size=10_000)
    print(kind, result.to_dict())
    assert 4.5 < result.true_l0 < 5.1
    assert result.mcc >= 0.95, (kind, result.mcc, result.sae_l0)
