"""Dead-latent resampling (Anthropic, "Towards Monosemanticity", 2023): every so many steps, latents that have not
fired since the last resample get a new direction: an input drawn with probability ∝ (its squared reconstruction
error)² from the current batch, normalised, as the decoder row; the same vector times 0.2 × the mean alive encoder
norm as the encoder column; b_enc = 0; their Adam moments zeroed. Each member draws from its own generator (seeded by
the training seed and the member's seed), so a member resamples the same way in any ensemble and on any rank."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ..base import EnsembleSAE
from .optim import param_state


def member_generators(sae: EnsembleSAE, seed: int) -> list[torch.Generator]:
    """One CPU generator per member from (training seed, member seed): a member's resampling draws do not depend
    on which other members share its ensemble (or its rank)."""
    gens = []
    for h in sae.hparams:
        s = int(np.random.SeedSequence([seed, int(h["seed"]) & 0xFFFFFFFF, 0x5E5A]).generate_state(1)[0])
        gens.append(torch.Generator(device="cpu").manual_seed(s))
    return gens


@torch.no_grad()
def resample_dead_(sae: EnsembleSAE, opt: torch.optim.Optimizer, x: torch.Tensor, dead: torch.Tensor,
                   generators: Sequence[torch.Generator], encoder_scale: float = 0.2) -> list[int]:
    """Re-initialise the latents marked in `dead` [E, d_sae] towards badly reconstructed rows of raw `x` [B, d_in]
    (Towards Monosemanticity): rows drawn ∝ loss², loss = ||x - x̂||² per member; decoder row = the row (as the
    encoder sees it, i.e. minus b_dec with pre_bias) normalised; encoder column = the same × encoder_scale × the
    mean norm of the member's alive encoder columns; b_enc = 0; their Adam moments and firing counters reset.
    Returns the number resampled per member."""
    counts = dead.sum(-1).tolist()
    if not any(counts):
        return counts
    x = sae.scale_in(x)  # the SAE's own units: b_dec and the new directions live there
    was_training = sae.training
    sae.eval()  # plain reconstruction: no auxiliary losses
    x_hat = sae._decode(sae.activation(sae._pre(x)))
    sae.train(was_training)
    err = (x_hat - x).pow(2).sum(-1)  # [E, B]
    W_enc = sae.encoder_weight()
    enc_norm = W_enc.norm(dim=1)  # [E, d_sae]: the norm of each latent's encoder column
    for m, n in enumerate(counts):
        if n == 0:
            continue
        p = err[m].double().cpu().pow(2)
        if not bool(torch.isfinite(p).all()) or float(p.sum()) <= 0:
            p = torch.ones_like(p)
        # Distinct rows while there are enough: two dead latents on one input would compete for it.
        replace = n > int((p > 0).sum())
        rows = torch.multinomial(p, n, replacement=replace, generator=generators[m]).to(x.device)
        v = x[rows].to(sae.dtype)
        if sae.pre_bias:
            v = v - sae.b_dec[m]
        v = v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        alive = ~dead[m]
        avg = enc_norm[m][alive].mean() if bool(alive.any()) else enc_norm.new_tensor(1.0)
        j = dead[m].nonzero().squeeze(1)
        sae.W_dec[m, j] = v
        if not sae.tied:
            sae.W_enc[m][:, j] = v.T * (avg * encoder_scale)
        sae.b_enc[m, j] = 0
        sae.tokens_since_fired[m, j] = 0
        for name, param in sae.named_parameters():
            st = param_state(opt, param)
            for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                if key in st:
                    buf = st[key][m]
                    if name == "W_enc":
                        buf[:, j] = 0
                    elif name == "W_dec" or tuple(param.shape[1:]) == (sae.d_sae,):  # b_enc, a kind's thresholds
                        buf[j] = 0
    return counts
