"""Logit lens (`analyses.logit_lens`): equal to a hand computation through the transformers model's own final-norm
scale and unembedding, for a bridge and for HookedTransformers with and without a learned final scale; known answers
against the model itself (adding c·1 to the final residual of a LayerNorm model moves neither its logits nor the lens;
a small step along a direction moves the logits by the lens over the norm's scale, for LayerNorm and RMSNorm); the same
lens after TransformerLens folds the norm into W_U; `top_tokens` leaves out rare tokens."""

from __future__ import annotations

import pytest
import torch

from sparse_coding import lm
from sparse_coding.analyses.logit_lens import logit_lens, top_tokens, unembedding

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(tiny_lm, one_thread):
    return lm.load_model(tiny_lm[2])


def test_bridge_logit_lens_equals_hf_weights(model):
    """((d − mean d) ⊙ final_layer_norm.weight) @ lm_head.weightᵀ with the transformers model's own parameters
    (GPT-NeoX's final norm is a LayerNorm: it centres its input)."""
    w = lm.loaded(model).weights
    gamma = w["gpt_neox.final_layer_norm.weight"].detach()
    head = next(w[k] for k in ("embed_out.weight", "lm_head.weight") if k in w).detach()  # [d_vocab, d_model]
    assert not torch.allclose(gamma, torch.ones_like(gamma))  # a trained scale, so leaving it out would show
    g_ours, W_U = unembedding(model)
    torch.testing.assert_close(g_ours, gamma)
    torch.testing.assert_close(W_U, head.T)
    directions = torch.randn(3, model.cfg.d_model, generator=torch.Generator().manual_seed(0))
    for d in directions:
        got = logit_lens(model, d)
        assert got.shape == (model.cfg.d_vocab,)
        torch.testing.assert_close(got, ((d - d.mean()) * gamma) @ head.T, rtol=1e-5, atol=1e-6)
    # A constant vector is what LayerNorm's centring removes: the model's logits do not move, nor does the lens.
    assert logit_lens(model, torch.full((model.cfg.d_model,), 3.0)).abs().max() < 1e-5


def hooked(normalization_type):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(n_layers=1, d_model=8, d_head=4, n_heads=2, d_mlp=16, d_vocab=20, n_ctx=8,
                                  act_fn="gelu", normalization_type=normalization_type, device="cpu", seed=0)
    return HookedTransformer(cfg)


def test_hooked_transformer_scales():
    """A HookedTransformer's ln_final.w scales the direction; without a learned scale (LNPre, none) γ = 1."""
    m = hooked("LN")
    with torch.no_grad():
        m.ln_final.w.copy_(torch.linspace(0.5, 2.0, 8))
    d = torch.randn(8, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(logit_lens(m, d), ((d - d.mean()) * torch.linspace(0.5, 2.0, 8)) @ m.W_U.detach())
    for nt, centre in (("LNPre", True), (None, False)):
        m = hooked(nt)
        gamma, W_U = unembedding(m)
        assert torch.equal(gamma, torch.ones(8))
        torch.testing.assert_close(logit_lens(m, d), ((d - d.mean()) if centre else d) @ m.W_U.detach())


def test_rmsnorm_model_is_scaled_not_centred(tmp_path):
    """A Llama (RMSNorm: scale only, no centring), loaded from a GGUF file: (d ⊙ γ) W_U, constant vectors included."""
    from tiny_gguf import write_tiny_llama_gguf

    path = write_tiny_llama_gguf(tmp_path / "tiny.gguf", seed=0)
    m = lm.load_model(lm.model_source(str(path), tmp_path / "data"))
    gamma, W_U = unembedding(m)
    for d in (torch.randn(m.cfg.d_model, generator=torch.Generator().manual_seed(2)), torch.ones(m.cfg.d_model)):
        torch.testing.assert_close(logit_lens(m, d), (d * gamma) @ W_U)
    assert logit_lens(m, torch.ones(m.cfg.d_model)).abs().max() > 0


def response(model, d: torch.Tensor, centred: bool, step: float = 1e-2) -> tuple[torch.Tensor, torch.Tensor]:
    """(the logits' change per unit ε at the last position of a context when ±ε·d is added to the final residual
    there (a central difference), the lens of d over the final norm's scale σ at that position), d first made
    orthogonal to the residual there (and, for a LayerNorm, to the all-ones vector): σ then moves by the same amount
    for +ε and −ε, and the central difference leaves the lens over σ, to O(ε²)."""
    hook = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    tokens = torch.randint(1, model.cfg.d_vocab, (1, 8), generator=torch.Generator().manual_seed(3))
    x = lm.hook_reader(model, [hook])(tokens)[hook][0, -1].double()
    basis = [torch.ones_like(x), x - x.mean()] if centred else [x]
    d = d.double()
    for b in basis:
        d = d - (d @ b) / (b @ b) * b
    d = d / d.norm()
    sigma = ((x - x.mean()).pow(2).mean() if centred else x.pow(2).mean()).add(model.cfg.eps).sqrt()
    eps = step * float(x.norm())

    def moved(sign):
        def add(resid, hook):
            resid[0, -1] += sign * eps * d.to(resid)
            return resid
        with torch.no_grad():
            return model.run_with_hooks(tokens, fwd_hooks=[(hook, add)])[0, -1].double()

    return (moved(1) - moved(-1)) / (2 * eps), logit_lens(model, d.float()).double() / sigma


def test_layernorm_model_known_answers(model):
    """The offline model (GPT-NeoX, final LayerNorm): the lens of the all-ones vector is 0, as the model's logits
    do not move when c·1 is added to its final residual; a small step along a direction moves the logits by the lens
    over the norm's scale."""
    ones = torch.ones(model.cfg.d_model)
    assert float(logit_lens(model, ones).norm()) < 1e-5
    hook = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    tokens = torch.randint(1, model.cfg.d_vocab, (1, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        clean = model(tokens)
        shifted = model.run_with_hooks(tokens, fwd_hooks=[(hook, lambda r, hook: r + 5.0)])
    assert float((shifted - clean).abs().max()) < 1e-4 < float(clean.abs().max())
    got, lens = response(model, torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(4)), True)
    assert float(lens.norm()) > 0.1
    torch.testing.assert_close(got, lens, rtol=0, atol=2e-3 * float(lens.abs().max()))


def test_rmsnorm_model_known_answers(tmp_path):
    """A Llama from a GGUF file (final RMSNorm: no centring): the all-ones vector moves the logits, and a small step
    along a direction moves them by the lens over the norm's scale."""
    from tiny_gguf import write_tiny_llama_gguf

    path = write_tiny_llama_gguf(tmp_path / "tiny.gguf", seed=0)
    m = lm.load_model(lm.model_source(str(path), tmp_path / "data"))
    gamma, W_U = unembedding(m)
    ones = torch.ones(m.cfg.d_model)
    torch.testing.assert_close(logit_lens(m, ones), gamma @ W_U)
    assert float(logit_lens(m, ones).norm()) > 1e-2
    got, lens = response(m, torch.randn(m.cfg.d_model, generator=torch.Generator().manual_seed(4)), False)
    assert float(lens.norm()) > 1e-3
    torch.testing.assert_close(got, lens, rtol=0, atol=2e-3 * float(lens.abs().max()))


@pytest.mark.parametrize("normalization_type", ["LN", "RMS"])
def test_lens_survives_folding_the_norm(normalization_type):
    """TransformerLens's fold_ln (the scale into W_U: "LNPre"/"RMSPre") and center_unembed change the lens by one
    constant over the vocabulary only; the all-ones vector stays 0 under LayerNorm and does not under RMSNorm."""
    m = hooked(normalization_type)
    with torch.no_grad():
        m.ln_final.w.copy_(torch.linspace(0.5, 2.0, 8))
    d = torch.randn(8, generator=torch.Generator().manual_seed(1))
    before, ones_before = logit_lens(m, d), logit_lens(m, torch.ones(8))
    m.process_weights_(fold_ln=True, center_writing_weights=True, center_unembed=True)
    assert m.cfg.normalization_type == normalization_type + "Pre"
    torch.testing.assert_close(logit_lens(m, d), before - before.mean(), rtol=1e-5, atol=1e-5)
    ones_after = logit_lens(m, torch.ones(8))
    torch.testing.assert_close(ones_after, ones_before - ones_before.mean(), rtol=1e-5, atol=1e-5)
    assert (float(ones_after.abs().max()) < 1e-5) == (normalization_type == "LN")


def test_top_tokens_leaves_out_rare_tokens():
    """With token counts and min_count, tokens seen too rarely (or not counted at all) never appear."""
    logits = torch.tensor([0.5, 3.0, -2.0, 1.0, -4.0, 2.0, 0.0, 5.0])
    up, down = top_tokens(logits, k=3)
    assert up == [(7, 5.0), (1, 3.0), (5, 2.0)] and down == [(4, -4.0), (2, -2.0), (6, 0.0)]
    counts = torch.tensor([10, 1, 10, 10, 2, 10, 10])  # token 7 is past the counts: never seen
    up, down = top_tokens(logits, k=3, token_counts=counts, min_count=5)
    assert up == [(5, 2.0), (3, 1.0), (0, 0.5)] and down == [(2, -2.0), (6, 0.0), (0, 0.5)]
    assert top_tokens(logits, k=3, token_counts=counts, min_count=0) == top_tokens(logits, k=3)
    longer = torch.cat([counts, torch.tensor([9, 50, 50])])  # counted past the logits: token 7 seen 9 times
    assert top_tokens(logits, k=1, token_counts=longer, min_count=5)[0] == [(7, 5.0)]
    up, down = top_tokens(logits, k=10, token_counts=counts, min_count=10)  # k past what is left: all of it
    assert [i for i, _ in up] == [5, 3, 0, 6, 2] and [i for i, _ in down] == [2, 6, 0, 3, 5]


def test_logit_lens_bad_input(model):
    """A direction of the wrong width or shape, or k < 1, is refused with the reason."""
    with pytest.raises(ValueError, match="width 33 but the model's residual stream is 32 wide"):
        logit_lens(model, torch.ones(33))
    with pytest.raises(ValueError, match="direction"):
        logit_lens(model, torch.ones(2, 32))
    with pytest.raises(ValueError, match="direction"):
        logit_lens(model, torch.full((32,), float("nan")))
    with pytest.raises(ValueError, match="k must be an int"):
        top_tokens(torch.zeros(5), k=0)



def test_logit_lens_matrix_rows_match_the_single_lens(model):
    from sparse_coding.analyses.logit_lens import logit_lens, logit_lens_matrix
    g = torch.Generator().manual_seed(0)
    D = torch.randn(5, model.cfg.d_model, generator=g)
    M = logit_lens_matrix(model, D)
    for i in range(5):
        assert torch.allclose(M[i], logit_lens(model, D[i]).float().cpu(), atol=1e-5)
    assert M[:, :].abs().sum() > 0 and logit_lens_matrix(model, torch.ones(2, model.cfg.d_model)).abs().max() < 1e-4
    counts = torch.zeros(M.shape[1], dtype=torch.long)
    counts[:3] = 10
    rare = logit_lens_matrix(model, D, counts, min_count=5)
    assert torch.equal(rare[:, :3], M[:, :3]) and rare[:, 3:].abs().sum() == 0
    with pytest.raises(ValueError, match="width"):
        logit_lens_matrix(model, torch.ones(2, model.cfg.d_model + 1))
