"""Evaluation: known answers from stand-in SAEs (identity, zero, mean, hand-built codes) and a tiny seeded
HookedTransformer, plus the bad-input errors."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from sparse_coding.analyses import (
    SweepEvaluation, density_histogram, evaluate_sweep, log10_density, sparsity_stats, spliced_loss,
)

HOOK = "blocks.0.hook_resid_post"


class StandIn:
    """Parameter-free SAE with the ensemble interface: member e's codes are fns[e](x) (d_sae = d_in) and the
    decoder is the identity, so the reconstruction of member e is exactly fns[e](x)."""

    kind = "stand-in"

    def __init__(self, d: int, fns, hparams=None):
        self.d_in = self.d_sae = d
        self.fns = list(fns)
        self.n_members = len(self.fns)
        self.hparams = hparams or [{"name": f"m{i}"} for i in range(self.n_members)]

    def encode(self, x):
        return torch.stack([f(x) for f in self.fns])

    def decode(self, codes):
        return codes


IDENTITY = lambda x: x.clone()  # noqa: E731
ZERO = torch.zeros_like


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(one_thread):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(n_layers=2, d_model=32, d_head=8, n_heads=4, d_mlp=64, d_vocab=64, n_ctx=16,
                                  act_fn="gelu", normalization_type="LN", positional_embedding_type="rotary",
                                  rotary_dim=8, parallel_attn_mlp=True, seed=0, device="cpu")
    m = HookedTransformer(cfg)
    # A random model is near-uniform, so clean and ablated losses would barely differ and loss_recovered would be
    # noise. A few Adam steps on counting sequences (next = current + 1) give it a real clean-vs-ablated gap.
    opt = torch.optim.Adam(m.parameters(), lr=3e-2)
    for step in range(15):
        loss = m(counting(16, seed=100 + step), return_type="loss")
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m.eval()


def counting(n, seed, T=12):
    """Rows t, t+1, t+2, ... (mod 64) from random starts, with a few random tokens so the loss is not ~0."""
    g = torch.Generator().manual_seed(seed)
    rows = (torch.randint(0, 64, (n, 1), generator=g) + torch.arange(T)) % 64
    noise = torch.rand(n, T, generator=g) < 0.2
    return torch.where(noise, torch.randint(0, 64, (n, T), generator=g), rows)


@pytest.fixture(scope="module")
def tokens():
    return counting(6, seed=1)


def batches_of(x, size):
    return [x[i: i + size] for i in range(0, len(x), size)]


# ---------------------------------------------------------------- sparsity stats

def test_sparsity_stats_hand_built_codes():
    # 4 tokens x 5 features; feature 4 never fires, feature 0 fires on 3/4 tokens, feature 3 on 1/4.
    x = torch.tensor([[1.0, 0.0, 2.0, 0.0, 0.0],
                      [0.0, -3.0, 0.0, 0.0, 0.0],
                      [4.0, 0.0, 0.0, 0.5, 0.0],
                      [1.0, 0.0, 0.0, 0.0, 0.0]])
    sae = StandIn(5, [IDENTITY, ZERO])
    table, freq = sparsity_stats(sae, batches_of(x, 3), dense_threshold=0.3, progress=False)
    assert list(table.member) == [0, 1] and (table.n_tokens == 4).all()
    ident, zero = table.iloc[0], table.iloc[1]
    assert ident.l0 == pytest.approx(6 / 4)
    assert ident.l1 == pytest.approx((3 + 3 + 4.5 + 1) / 4)
    assert ident.dead_frac == pytest.approx(1 / 5)          # feature 4
    assert ident.dense_frac == pytest.approx(1 / 5)         # only feature 0 (3/4 > 0.3); 1/4 is not above 0.3
    assert ident.fvu == 0 and ident.mse == 0
    torch.testing.assert_close(freq[0], torch.tensor([0.75, 0.25, 0.25, 0.25, 0.0], dtype=torch.float64))
    assert zero.l0 == 0 and zero.l1 == 0 and zero.dead_frac == 1 and zero.dense_frac == 0
    # zero reconstruction: mse = mean ‖x‖², FVU = Σ‖x‖² / Σ‖x − x̄‖²
    sq = x.double().pow(2).sum()
    assert zero.mse == pytest.approx(float(sq) / 4)
    assert zero.fvu == pytest.approx(float(sq / (x.double() - x.double().mean(0)).pow(2).sum()))


def test_fvu_of_mean_prediction_is_one_and_max_tokens_cuts():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(100, 8, generator=g) * 3 + 5
    mean = x[:60].mean(0)
    sae = StandIn(8, [lambda b: mean.expand_as(b).clone(), IDENTITY])
    table, _ = sparsity_stats(sae, batches_of(x, 25), max_tokens=60, progress=False)
    assert table.n_tokens[0] == 60
    assert table.fvu[0] == pytest.approx(1.0, abs=1e-9)
    assert table.fvu[1] == 0


def test_sparsity_stats_with_real_sae_and_input_scale():
    from sparse_coding import dictionaries as sae_mod
    sae = sae_mod.make_sae("relu", d_in=8, d_sae=16, l1_coef=[1e-3, 1e-2])
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    table, freq = sparsity_stats(sae, batches_of(x, 16), progress=False)
    with torch.no_grad():
        out = sae(x)
    torch.testing.assert_close(torch.tensor(table.l0.values, dtype=torch.float32),
                               (out.codes != 0).float().sum(-1).mean(-1))
    torch.testing.assert_close(torch.tensor(table.mse.values, dtype=torch.float32), out.mse, rtol=1e-4, atol=1e-6)
    assert freq.shape == (2, 16)
    # input_scale: the SAE sees 2x and its output is halved, so an identity stand-in stays exact.
    t2, _ = sparsity_stats(StandIn(8, [IDENTITY]), [x], input_scale=2.0, progress=False)
    assert t2.fvu[0] == pytest.approx(0.0, abs=1e-12)


def test_sparsity_stats_bad_inputs():
    sae = StandIn(4, [IDENTITY])
    with pytest.raises(ValueError, match=r"width 5 but the SAE expects d_in=4.*hook"):
        sparsity_stats(sae, [torch.randn(3, 5)], progress=False)
    bad = torch.randn(3, 4)
    bad[1, 2] = float("nan")
    bad[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"batch 1 contains 1 NaN and 1 inf.*float32"):
        sparsity_stats(sae, [torch.randn(2, 4), bad], progress=False)
    with pytest.raises(ValueError, match=r"\[batch, d\].*reshape"):
        sparsity_stats(sae, [torch.randn(2, 3, 4)], progress=False)
    with pytest.raises(ValueError, match="empty"):
        sparsity_stats(sae, iter([]), progress=False)
    with pytest.raises(ValueError, match="ensemble interface"):
        sparsity_stats(object(), [torch.randn(2, 4)], progress=False)


def test_density_histogram():
    freq = torch.tensor([[0.1, 0.01, 0.0, 0.001], [1.0, 0.1, 0.1, 0.0]], dtype=torch.float64)
    edges, counts, dead = density_histogram(freq, bins=3)
    assert list(dead) == [1, 1]
    assert edges[0] == -3 and edges[-1] == 0
    assert counts.tolist() == [[1, 1, 1], [0, 0, 3]]  # bins [-3,-2) [-2,-1) [-1,0]
    assert log10_density(freq, floor=-10)[0, 2] == -10
    assert math.isinf(log10_density(freq)[0, 2])


# ---------------------------------------------------------------- spliced loss

def test_identity_splice_equals_clean(model, tokens):
    sae = StandIn(32, [IDENTITY, ZERO])
    df = spliced_loss(model, tokens, HOOK, sae, batch_size=4, progress=False)
    ident, zero = df.iloc[0], df.iloc[1]
    assert ident.ce_spliced == pytest.approx(ident.ce_clean, abs=1e-5)
    assert ident.kl_to_clean == pytest.approx(0.0, abs=1e-6)
    assert ident.loss_recovered == pytest.approx(1.0, abs=1e-4)
    assert ident.ppl_spliced == pytest.approx(ident.ppl_clean, rel=1e-5)
    assert zero.ce_spliced == pytest.approx(zero.ce_zero, abs=1e-5)
    assert zero.loss_recovered == pytest.approx(0.0, abs=1e-4)
    assert zero.kl_to_clean > 0.1
    assert ident.ce_zero - ident.ce_clean > 0.5  # the ablation really hurts, so the ratios above mean something
    assert ident.n_predictions == 6 * 11
    # KL(clean ‖ zero-ablated), averaged over the 66 predictions, computed by hand
    with torch.no_grad():
        lc = model(tokens)[:, :-1].log_softmax(-1)
        lz = model.run_with_hooks(tokens, fwd_hooks=[(HOOK, lambda a, hook: torch.zeros_like(a))])[:, :-1]
        lz = lz.log_softmax(-1)
    assert zero.kl_to_clean == pytest.approx(float((lc.exp() * (lc - lz)).sum(-1).mean()), rel=1e-4)
    # clean CE agrees with TransformerLens's own loss
    assert ident.ce_clean == pytest.approx(float(model(tokens, return_type="loss").detach()), abs=1e-5)
    assert ident.ppl_clean == pytest.approx(math.exp(ident.ce_clean))


def test_mean_ablation_uses_given_mean(model, tokens):
    given = torch.randn(32, generator=torch.Generator().manual_seed(3))
    sae = StandIn(32, [lambda x: given.expand_as(x).clone()])
    df = spliced_loss(model, tokens, HOOK, sae, mean_act=given, progress=False)
    assert df.ce_spliced[0] == pytest.approx(df.ce_mean[0], abs=1e-5)
    assert df.loss_recovered_mean[0] == pytest.approx(0.0, abs=1e-4)
    # mean_act=None measures the hook's mean over these tokens: a member predicting exactly that matches ce_mean
    acts = model.run_with_cache(tokens, names_filter=HOOK)[1][HOOK]
    true_mean = acts.reshape(-1, 32).double().mean(0).float()
    sae2 = StandIn(32, [lambda x: true_mean.expand_as(x).clone()])
    df2 = spliced_loss(model, tokens, HOOK, sae2, batch_size=4, progress=False)
    assert df2.ce_spliced[0] == pytest.approx(df2.ce_mean[0], abs=1e-5)
    assert df2.ce_mean[0] != pytest.approx(df.ce_mean[0], abs=1e-3)


def test_fast_path_matches_hooked_forward(model, tokens):
    # Restarting at the next layer must give exactly what the full hooked forward gives, also with position 0 kept.
    noisy = lambda x: x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))  # noqa: E731
    sae = StandIn(32, [noisy, ZERO])
    for keep in (False, True):
        a = spliced_loss(model, tokens, HOOK, sae, keep_first_position=keep, fast=True, progress=False)
        b = spliced_loss(model, tokens, HOOK, sae, keep_first_position=keep, fast=False, progress=False)
        pd.testing.assert_frame_equal(a, b, atol=1e-5, rtol=1e-5)
    # keeping position 0 clean changes the zero-ablated loss (position 0 still sees its own clean residual)
    assert a.ce_zero[0] != pytest.approx(
        spliced_loss(model, tokens, HOOK, None, progress=False).ce_zero[0], abs=1e-4)


def test_non_residual_hook_and_no_sae(model, tokens):
    hook = "blocks.1.mlp.hook_post"  # width d_mlp = 64, not a residual hook: the hooked forward is used
    df = spliced_loss(model, tokens, hook, StandIn(64, [IDENTITY]), ablations=("zero",), progress=False)
    assert df.ce_spliced[0] == pytest.approx(df.ce_clean[0], abs=1e-5)
    assert math.isnan(df.ce_mean[0]) and math.isnan(df.loss_recovered_mean[0])
    # a per-head hook [B, T, H, d_head] is flattened to H*d_head = 32 wide rows and reshaped back
    z = "blocks.0.attn.hook_z"
    dz = spliced_loss(model, tokens, z, StandIn(32, [IDENTITY]), progress=False)
    zmean = model.run_with_cache(tokens, names_filter=z)[1][z].reshape(-1, 32).double().mean(0).float()
    dz2 = spliced_loss(model, tokens, z, None, mean_act=zmean, progress=False)
    assert dz.ce_spliced[0] == pytest.approx(dz.ce_clean[0], abs=1e-5)
    assert dz.ce_mean[0] == pytest.approx(dz2.ce_mean[0], abs=1e-5)
    base = spliced_loss(model, tokens, HOOK, None, progress=False)
    assert list(base.member) == [-1] and "ce_spliced" not in base


def test_spliced_loss_bad_inputs(model, tokens):
    with pytest.raises(ValueError, match=r"not a hook of this model.*blocks\.0\.hook_resid_post"):
        spliced_loss(model, tokens, "blocks.0.hook_resid_postt", StandIn(32, [IDENTITY]), progress=False)
    with pytest.raises(ValueError, match=r"d_in=16 but hook 'blocks.0.hook_resid_post' has width 32"):
        spliced_loss(model, tokens, HOOK, StandIn(16, [IDENTITY]), progress=False)
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        spliced_loss(model, tokens + 100, HOOK, None, progress=False)
    with pytest.raises(ValueError, match="integer"):
        spliced_loss(model, tokens.float(), HOOK, None, progress=False)
    with pytest.raises(ValueError, match="n_ctx=16"):
        spliced_loss(model, torch.zeros(2, 20, dtype=torch.long), HOOK, None, progress=False)
    with pytest.raises(ValueError, match="unknown ablation"):
        spliced_loss(model, tokens, HOOK, None, ablations=("resample",), progress=False)
    with pytest.raises(ValueError, match="mean_act has 5 values"):
        spliced_loss(model, tokens, HOOK, None, mean_act=torch.zeros(5), progress=False)
    with pytest.raises(ValueError, match="members must be indices"):
        spliced_loss(model, tokens, HOOK, StandIn(32, [IDENTITY]), members=[3], progress=False)


def test_nan_activation_at_hook_is_reported(model, tokens):
    h = model.hook_dict[HOOK].add_hook(lambda act, hook: act * float("nan"))
    try:
        with pytest.raises(ValueError, match="NaN"):
            spliced_loss(model, tokens, "blocks.1.hook_resid_post", None, ablations=(), progress=False)
    finally:
        model.reset_hooks()


# ---------------------------------------------------------------- the sweep table

def test_evaluate_sweep_table_and_save(model, tokens, tmp_path):
    acts = model.run_with_cache(tokens, names_filter=HOOK)[1][HOOK].reshape(-1, 32)
    sae = StandIn(32, [IDENTITY, ZERO], hparams=[{"l1_coef": 1e-3, "seed": 0}, {"l1_coef": 1e-2, "seed": 1}])
    ev = evaluate_sweep(model, sae, batches_of(acts, 20), tokens, HOOK, progress=False)
    t = ev.table
    assert len(t) == 2 and list(t.member) == [0, 1]
    for col in ("hook_name", "kind", "d_in", "d_sae", "l1_coef", "seed", "fvu", "mse", "l0", "l1", "dead_frac",
                "dense_frac", "ce_clean", "ce_spliced", "ce_zero", "ce_mean", "loss_recovered", "kl_to_clean",
                "ppl_clean", "ppl_spliced"):
        assert col in t, col
    assert t.fvu[0] == 0 and t.fvu[1] == pytest.approx(
        float(acts.double().pow(2).sum() / (acts.double() - acts.double().mean(0)).pow(2).sum()))
    assert t.loss_recovered[0] == pytest.approx(1.0, abs=1e-4)
    csv, _ = ev.save(tmp_path)
    back = SweepEvaluation.load(tmp_path)
    pd.testing.assert_frame_equal(back.table, t, check_dtype=False)
    torch.testing.assert_close(back.feature_freq, ev.feature_freq)


def test_evaluate_sweep_with_real_sae(model, tokens):
    from sparse_coding import dictionaries as sae_mod
    sae = sae_mod.make_sae("relu", d_in=32, d_sae=64, l1_coef=[1e-3, 1e-2])
    acts = model.run_with_cache(tokens, names_filter=HOOK)[1][HOOK].reshape(-1, 32)
    ev = evaluate_sweep(model, sae, [acts], tokens[:2], HOOK, progress=False)
    assert list(ev.table.l1_coef) == [1e-3, 1e-2] and (ev.table.kind == "relu").all()
    assert ev.feature_freq.shape == (2, 64)
    assert ev.table.kl_to_clean.notna().all() and (ev.table.kl_to_clean >= 0).all()


def test_transformer_bridge_identity(tmp_path):
    """The same identity check through a TransformerBridge (what lm.load_model returns), built offline from a tiny
    random GPT-NeoX; the clean loss must equal the transformers model's own loss."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast

    cfg = GPTNeoXConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=16, rotary_pct=0.25, use_parallel_residual=True)
    torch.manual_seed(0)
    hf = GPTNeoXForCausalLM(cfg).eval()
    hf.config._attn_implementation = "eager"
    tk = Tokenizer(models.WordLevel(vocab={f"t{i}": i for i in range(64)}, unk_token="t0"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="t0", eos_token="t1", unk_token="t0",
                            pad_token="t1").save_pretrained(tmp_path)
    hf.save_pretrained(tmp_path)
    tok = PreTrainedTokenizerFast.from_pretrained(tmp_path)
    bridge = TransformerBridge.boot_transformers(str(tmp_path), hf_model=hf, tokenizer=tok, device="cpu")
    tokens = counting(4, seed=2)
    df = spliced_loss(bridge, tokens, HOOK, StandIn(32, [IDENTITY, ZERO]), progress=False)
    with torch.no_grad():
        hf_loss = float(hf(tokens, labels=tokens).loss)
    assert df.ce_clean[0] == pytest.approx(hf_loss, abs=1e-5)
    assert df.ce_spliced[0] == pytest.approx(df.ce_clean[0], abs=1e-5) and df.kl_to_clean[0] == pytest.approx(0, abs=1e-6)
    assert df.ce_spliced[1] == pytest.approx(df.ce_zero[1], abs=1e-5)
