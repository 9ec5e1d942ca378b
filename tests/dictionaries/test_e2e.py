"""End-to-end SAE training (Braun et al. 2024, arXiv 2405.12241) on the tiny offline model: known answers for the
loss (an exact reconstruction costs 0 and pulls nowhere; the KL and the downstream terms equal hooked forwards
computed by hand), gradients reach the SAE and never the model, the model's weights stay byte for byte, a killed
e2e run resumes bit-identical, a sweep trains several e2e SAEs in one data pass, and the downstream evaluation."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from sparse_coding import analyses, dictionaries, lm
from sparse_coding.dictionaries import make_sae, train_sae
from sparse_coding.dictionaries.training import state as ckpt
from sparse_coding.dictionaries.training.e2e import SplicedObjective

HOOK = "blocks.0.hook_resid_post"
LATER = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def model(tiny_lm):
    return lm.load_model(tiny_lm[2])


@pytest.fixture(scope="module")
def contexts(model):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, int(model.cfg.d_vocab), (24, 16), generator=g)


def identity_sae(d: int):
    """ReLU SAE with d_sae = 2d whose codes are (x)+ and (−x)+ and decoder rows ±e_i: x̂ = x exactly."""
    sae = make_sae("relu", d, 2 * d, l1_coef=0.0)
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1).unsqueeze(0))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0).unsqueeze(0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def hooked(model, tokens, replace=None):
    """(logits, activation at LATER) of a forward with the activation at HOOK replaced by `replace`."""
    seen = {}
    hooks = [(LATER, lambda a, hook: seen.__setitem__("later", a.detach().clone()))]
    if replace is not None:
        hooks.insert(0, (HOOK, lambda a, hook: replace))
    with torch.no_grad():
        logits = model.run_with_hooks(tokens, return_type="logits", fwd_hooks=hooks)
    return logits, seen["later"]


def test_exact_reconstruction_costs_nothing_and_pulls_nowhere(model, contexts):
    d = int(model.cfg.d_model)
    sae = identity_sae(d)
    obj = SplicedObjective(model, HOOK, contexts, 64, 0, "e2e+ds")
    x = obj(0)
    out = sae(x)
    torch.testing.assert_close(out.x_hat, x.unsqueeze(0), atol=1e-6, rtol=0)
    terms = obj.terms(out.x_hat, 1.0)
    assert abs(float(terms["kl"].detach())) < 1e-6 and float(terms["downstream_mse"].detach()) < 1e-10
    (terms["kl"] + terms["downstream_mse"]).sum().backward()
    for name, p in sae.named_parameters():
        assert p.grad is None or float(p.grad.abs().max()) < 1e-5, name


def test_kl_and_downstream_terms_equal_hooked_forwards_by_hand(model, contexts):
    d = int(model.cfg.d_model)
    sae = make_sae("relu", d, 3 * d, l1_coef=[0.5, 2.0], seed=[1, 2])
    obj = SplicedObjective(model, HOOK, contexts, 48, 3, "e2e+ds")
    x = obj(5)
    tokens = obj.contexts(5)
    out = sae(x)
    terms = obj.terms(out.x_hat, 1.7)
    clean_logits, clean_later = hooked(model, tokens)
    for m in range(2):
        new = out.x_hat[m].detach().reshape(*tokens.shape, d)
        logits, later = hooked(model, tokens, new)
        kl = F.kl_div(logits.log_softmax(-1).flatten(0, 1), clean_logits.log_softmax(-1).flatten(0, 1),
                      log_target=True, reduction="batchmean")  # the paper's KL(clean ‖ spliced), per position
        assert math.isclose(float(terms["kl"][m].detach()), float(kl), rel_tol=1e-4, abs_tol=1e-6)
        mse = F.mse_loss(later * 1.7, clean_later * 1.7)
        assert math.isclose(float(terms["downstream_mse"][m].detach()), float(mse), rel_tol=1e-4)
    # the layers above the hook ran alone (`lm.upper`, checked against the full pass), and the full hooked pass
    # (its fallback) gives the same terms and gradients
    assert obj.upper is not None and obj.upper.ok and obj.upper.ready(obj._clean["tokens"])
    grads = torch.autograd.grad((terms["kl"] + terms["downstream_mse"]).sum(), sae.W_dec, retain_graph=True)[0]
    obj.upper = None
    out = sae(x)
    full = obj.terms(out.x_hat, 1.7)
    torch.testing.assert_close(full["kl"], terms["kl"], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(full["downstream_mse"], terms["downstream_mse"], rtol=1e-4, atol=1e-7)
    full_grads = torch.autograd.grad((full["kl"] + full["downstream_mse"]).sum(), sae.W_dec)[0]
    torch.testing.assert_close(full_grads, grads, rtol=1e-3, atol=1e-6)


def test_gradients_reach_the_sae_only_and_the_model_never_changes(model, contexts):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    d = int(model.cfg.d_model)
    sae = make_sae("relu", d, 2 * d, l1_coef=[0.1, 1.0], seed=[0, 1])
    obj = SplicedObjective(model, HOOK, contexts, 64, 0, "e2e")
    out = sae(obj(0))
    loss, _ = obj.loss(out, sae, 1.0, 0.0)
    loss.sum().backward()
    assert all(p.grad is None for p in model.parameters())
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in sae.parameters())
    log = train_sae(sae, contexts, steps=6, batch_size=64, lr=1e-2, loss="e2e+ds", model=model, hook_name=HOOK,
                    progress=False, log_every=1)
    assert {"kl", "downstream_mse", "mse", "l1"} <= set(log.columns) and log["kl"].notna().all()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [p.requires_grad for p in model.parameters()] == flags
    # the upper layers run the transformers model's own blocks: their parameters got no gradient either
    hf = model.__dict__.get("original_model")
    assert hf is None or all(p.grad is None for p in hf.parameters())
    model.train()
    train_sae(sae, contexts, steps=1, batch_size=64, loss="e2e", model=model, hook_name=HOOK, progress=False)
    assert model.training  # the mode it was in is restored
    model.eval()


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("loss", ["e2e", "e2e+ds"])
def test_killed_e2e_run_resumes_bit_identical(model, contexts, tmp_path, loss):
    d = int(model.cfg.d_model)
    build = lambda: make_sae("relu", d, 2 * d, l1_coef=[0.3, 1.0], seed=[4, 5])  # noqa: E731
    kw = dict(steps=12, batch_size=32, lr=1e-2, loss=loss, model=model, hook_name=HOOK, progress=False,
              log_every=2, state_every=4, warmup_steps=3, decay="linear", seed=7)
    ref = build()
    ref_log = train_sae(ref, contexts, state_dir=tmp_path / "ref", **kw)

    def stop(step, _sae):
        if step == 10:
            raise Interrupt

    with pytest.raises(Interrupt):
        train_sae(build(), contexts, state_dir=tmp_path / "run", callback=stop, **kw)
    assert ckpt.load_state(tmp_path / "run")[1]["step"] == 8
    sae = build()
    log = train_sae(sae, contexts, state_dir=tmp_path / "run", **kw)
    for name, t in ref.state_dict().items():
        assert torch.equal(sae.state_dict()[name], t), name
    assert log.equals(ref_log)


def test_a_sweep_trains_several_e2e_saes_in_one_data_pass(model, contexts, tmp_path, monkeypatch):
    calls = []
    original = SplicedObjective.__call__

    def counting(self, step):
        calls.append(step)
        return original(self, step)

    monkeypatch.setattr(SplicedObjective, "__call__", counting)
    run = dictionaries.train_e2e_sweep(model, contexts, HOOK, "relu", 2, {"l1_coef": [0.2, 0.5, 1.0]},
                                       model_name="tiny", data_dir=tmp_path, n_tokens=160, batch_size=32, lr=1e-2,
                                       loss="e2e", input_scale=1.0, progress=False)
    # 160 tokens of 32 per step (two 16-token contexts): 5 steps, each step's contexts read once for all 3 members
    assert run.sae.n_members == 3 and sorted(set(calls)) == list(range(5))
    assert len(calls) == 5 + 1  # the extra call reads the width before training
    cfg = (run.folder / "member-000" / "cfg.json").read_text()
    assert '"loss": "e2e"' in cfg
    # each member trained as it would alone (members never interact)
    alone = dictionaries.train_e2e_sweep(model, contexts, HOOK, "relu", 2, {"l1_coef": [0.5]}, model_name="tiny",
                                         data_dir=tmp_path / "alone", n_tokens=160, batch_size=32, lr=1e-2,
                                         loss="e2e", input_scale=1.0, progress=False)
    torch.testing.assert_close(alone.sae.W_dec[0], run.sae.W_dec[1], atol=1e-4, rtol=1e-3)
    again = dictionaries.train_e2e_sweep(model, contexts, HOOK, "relu", 2, {"l1_coef": [0.2, 0.5, 1.0]},
                                         model_name="tiny", data_dir=tmp_path, n_tokens=160, batch_size=32,
                                         lr=1e-2, loss="e2e", input_scale=1.0, progress=False)
    assert again.reused and torch.equal(again.sae.W_dec, run.sae.W_dec)


def test_bad_e2e_inputs_are_refused_by_name(model, contexts):
    sae = make_sae("relu", int(model.cfg.d_model), 64)
    with pytest.raises(ValueError, match="token contexts"):
        train_sae(sae, contexts.float(), steps=2, loss="e2e", model=model, hook_name=HOOK, progress=False)
    with pytest.raises(ValueError, match="needs model"):
        train_sae(sae, contexts, steps=2, loss="e2e", hook_name=HOOK, progress=False)
    with pytest.raises(ValueError, match="loss='local'"):
        train_sae(sae, torch.randn(64, int(model.cfg.d_model)), steps=2, model=model, progress=False)
    with pytest.raises(ValueError, match="no layers after|needs layers after"):
        train_sae(sae, contexts, steps=2, loss="e2e+ds", model=model, hook_name="blocks.1.hook_resid_post",
                  progress=False)
    with pytest.raises(ValueError, match="less than one context"):
        train_sae(sae, contexts, steps=2, batch_size=8, loss="e2e", model=model, hook_name=HOOK, progress=False)
    with pytest.raises(ValueError, match="loss"):
        dictionaries.TrainSettings(loss="global")


def test_downstream_loss_known_answers(model, contexts):
    d = int(model.cfg.d_model)
    exact = analyses.downstream_loss(model, contexts[:8], HOOK, identity_sae(d), progress=False)
    row = exact.iloc[0]
    assert abs(row["ce_increase"]) < 1e-5 and abs(row["kl"]) < 1e-6 and row["mse_at_hook"] < 1e-10
    assert row[f"mse:{LATER}"] < 1e-10
    sae = make_sae("relu", d, 2 * d, l1_coef=[0.1, 1.0], seed=[0, 1])
    table = analyses.downstream_loss(model, contexts[:8], HOOK, sae, batch_size=3, progress=False)
    ref = analyses.spliced_loss(model, contexts[:8], HOOK, sae, ablations=(), progress=False)
    torch.testing.assert_close(torch.tensor(table["ce_spliced"].values), torch.tensor(ref["ce_spliced"].values),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.tensor(table["ce_clean"].values), torch.tensor(ref["ce_clean"].values))


def test_frontier_interpolation_and_similarity_known_answers():
    front = pd.DataFrame({"ce_increase": [0.1, 0.4, 1.6], "l0": [80.0, 40.0, 10.0]})
    assert analyses.at_ce_increase(front, 0.2, "l0") == pytest.approx(60.0)  # halfway in log CE
    assert math.isnan(analyses.at_ce_increase(front, 2.0, "l0"))
    other = pd.DataFrame({"ce_increase": [0.05, 0.4], "l0": [9.0, 3.0]})
    assert analyses.matched_ce_increase({"a": front, "b": other}) == pytest.approx(math.sqrt(0.1 * 0.4))
    assert math.isnan(analyses.matched_ce_increase({"a": front, "b": pd.DataFrame({"ce_increase": [2.0, 3.0]})}))
    A = torch.eye(4)
    B = torch.stack([torch.eye(4)[0], torch.eye(4)[0], torch.eye(4)[2], torch.eye(4)[3]])
    sim = analyses.dictionary_similarity(A, B)
    assert sim["mmcs"] == pytest.approx(0.75) and sim["matched"] == pytest.approx(0.75)
    # the max cosine double counts: both of B's copies of e0 match A's e0 best
    sim_ba = analyses.dictionary_similarity(B, A)
    assert sim_ba["mmcs"] == pytest.approx(1.0) and sim_ba["matched"] == pytest.approx(0.75)


def test_local_settings_keep_their_resume_key():
    """Saved local sweeps and states compare TrainSettings.resume_key(): the e2e fields stay out of a local run's."""
    local = dictionaries.TrainSettings().resume_key()
    assert not {"loss", "kl_coef", "downstream_coef"} & set(local)
    e2e = dictionaries.TrainSettings(loss="e2e+ds", kl_coef=0.5).resume_key()
    assert e2e["loss"] == "e2e+ds" and e2e["kl_coef"] == 0.5 and e2e["downstream_coef"] == 2.5
    assert dictionaries.TrainSettings.from_json(dictionaries.TrainSettings(loss="e2e").to_json()).loss == "e2e"


def test_kl_from_logits_matches_autograd_in_float64():
    from sparse_coding.dictionaries.training.e2e import KLFromLogits, kl_clean_spliced

    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 2, 5, 7, generator=g, dtype=torch.float64, requires_grad=True)
    logp = torch.randn(2, 5, 7, generator=g, dtype=torch.float64).log_softmax(-1)
    p = logp.exp()
    ne = (p * logp).sum(-1)
    assert torch.autograd.gradcheck(lambda t: KLFromLogits.apply(t, p, ne), (z,))
    torch.testing.assert_close(KLFromLogits.apply(z, p, ne), kl_clean_spliced(logp, z.log_softmax(-1)))


def test_the_loss_adds_its_terms_in_the_documented_units(model, contexts):
    """loss = d_in · (kl_coef · KL + downstream_coef · downstream MSE) + the kind's L1 (no local MSE)."""
    d = int(model.cfg.d_model)
    sae = make_sae("relu", d, 2 * d, l1_coef=[0.5, 2.0], seed=[1, 2])
    obj = SplicedObjective(model, HOOK, contexts, 32, 0, "e2e+ds")
    out = sae(obj(2))
    loss, terms = obj.loss(out, sae, 0.7, 3.0)
    expect = d * (0.7 * terms["kl"] + 3.0 * terms["downstream_mse"]) + out.losses["l1"]
    torch.testing.assert_close(loss, expect)


def test_two_later_layers_are_averaged_and_excluded_positions_stay_clean(model, contexts):
    """From blocks.0.hook_resid_pre both blocks' outputs are later layers (the full hooked pass: no upper path for
    a resid_pre hook); with position 0 excluded it keeps its clean activation and every term leaves it out."""
    from sparse_coding.activations import Exclusion

    pre = "blocks.0.hook_resid_pre"
    hooks = ["blocks.0.hook_resid_post", LATER]
    d = int(model.cfg.d_model)
    sae = make_sae("relu", d, 2 * d, l1_coef=[0.5], seed=3)
    obj = SplicedObjective(model, pre, contexts, 48, 1, "e2e+ds", exclude=Exclusion(positions=(0,)))
    assert obj.later == hooks and obj.upper is None
    x = obj(0)
    tokens = obj._clean["tokens"]
    assert x.shape[0] == tokens.shape[0] * (tokens.shape[1] - 1)
    out = sae(x)
    terms = obj.terms(out.x_hat, 1.3)

    def run(replace=None):
        seen = {}
        fwd = [(h, (lambda name: lambda a, hook: seen.__setitem__(name, a.detach().clone()))(h)) for h in hooks]
        if replace is not None:
            fwd.insert(0, (pre, lambda a, hook: replace))
        else:
            fwd.insert(0, (pre, lambda a, hook: seen.__setitem__("act", a.detach().clone())))
        with torch.no_grad():
            return model.run_with_hooks(tokens, return_type="logits", fwd_hooks=fwd), seen

    clean_logits, clean = run()
    new = clean["act"].clone()
    new[:, 1:] = out.x_hat[0].detach().reshape(tokens.shape[0], tokens.shape[1] - 1, d)
    logits, spliced = run(new)
    kl = F.kl_div(logits[:, 1:].log_softmax(-1).flatten(0, 1), clean_logits[:, 1:].log_softmax(-1).flatten(0, 1),
                  log_target=True, reduction="batchmean")
    assert math.isclose(float(terms["kl"][0].detach()), float(kl), rel_tol=1e-4, abs_tol=1e-6)
    mse = sum(F.mse_loss(spliced[h][:, 1:] * 1.3, clean[h][:, 1:] * 1.3) for h in hooks) / 2
    assert math.isclose(float(terms["downstream_mse"][0].detach()), float(mse), rel_tol=1e-4)


def test_downstream_loss_of_a_zero_reconstruction(model, contexts):
    """x̂ = 0: MSE at the hook is E‖x‖², normalised by the variance; no latent fires; excluded positions leave
    the numbers they should."""
    from sparse_coding.activations import Exclusion

    d = int(model.cfg.d_model)
    sae = make_sae("relu", d, 2 * d, l1_coef=0.0)
    with torch.no_grad():
        for p in sae.parameters():
            p.zero_()
        sae.b_enc.fill_(-1.0)
    tokens = contexts[:6]
    seen = {}
    with torch.no_grad():
        model.run_with_hooks(tokens, fwd_hooks=[(HOOK, lambda a, hook: seen.__setitem__("a", a.clone()))])
    x = seen["a"][:, 1:].reshape(-1, d).double()
    row = analyses.downstream_loss(model, tokens, HOOK, sae, exclude=Exclusion(positions=(0,)),
                                   progress=False).iloc[0]
    assert row["l0"] == 0 and row["alive"] == 0 and row["n_positions"] == x.shape[0]
    assert row["n_predictions"] == tokens.shape[0] * (tokens.shape[1] - 2)
    assert math.isclose(row["mse_at_hook"], float(x.pow(2).sum(1).mean()), rel_tol=1e-5)
    var = float((x - x.mean(0)).pow(2).sum(1).mean())
    assert math.isclose(row["nmse_at_hook"], float(x.pow(2).sum(1).mean()) / var, rel_tol=1e-5)


@pytest.mark.parametrize("kind, hp", [("topk", {"k": 4}), ("batchtopk", {"k": 4}), ("jumprelu", {"l0_coef": 0.1})])
def test_every_kind_trains_end_to_end(model, contexts, kind, hp):
    """Any kind works with any loss: TopK's k fixes L0 and only the loss changes; the KL falls from its start."""
    d = int(model.cfg.d_model)
    sae = make_sae(kind, d, 2 * d, seed=0, **hp)
    log = train_sae(sae, contexts, steps=30, batch_size=64, lr=1e-2, loss="e2e", model=model, hook_name=HOOK,
                    progress=False, log_every=1, input_scale=1.0)
    assert log["kl"].notna().all() and log["loss"].map(math.isfinite).all()
    assert log["kl"].iloc[-5:].mean() < log["kl"].iloc[:3].mean()
    if kind == "topk":
        assert (log["l0"] == 4).all()
