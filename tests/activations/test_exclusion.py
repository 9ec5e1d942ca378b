"""Positions left out of a dictionary's inputs (massive first-position activations, arXiv 2402.17762): detected,
recorded in the manifest, hidden by the store from every reader, and out of the spliced loss's metrics."""

from __future__ import annotations

import pytest
import torch

from sparse_coding import activations as A
from sparse_coding import analyses, dictionaries, lm
from sparse_coding.activations.exclusion import Exclusion, resolve_exclusion
from tiny_gguf import write_tiny_llama_gguf

pytestmark = pytest.mark.usefixtures("one_thread")
T, D = 8, 16


def test_keep_mask_known_answer():
    toks = torch.tensor([[5, 0, 7, 2], [1, 9, 9, 0]])
    keep = Exclusion((0,), (0, 2)).keep(toks)
    assert keep.tolist() == [[False, False, True, False], [False, True, True, False]]
    assert Exclusion().keep(toks).all() and not Exclusion()
    assert Exclusion.from_json(Exclusion((0,), (1,)).to_json()) == Exclusion((0,), (1,))
    with pytest.raises(ValueError, match="exclude"):
        Exclusion.from_json({"positions": [0], "tokens": [1]})
    with pytest.raises(ValueError, match="exclude"):
        resolve_exclusion("sometimes", None, toks, None)


class _Tok:
    all_special_ids = [2, 0, 1]


def _reader(massive: bool):
    def read(tokens):
        x = torch.randn(*tokens.shape, D, generator=torch.Generator().manual_seed(0))
        if massive:
            x[:, 0] *= 100.0
        return {"blocks.0.hook_resid_post": x}
    return read


def test_detection_of_massive_first_position_activations():
    toks = torch.zeros(8, T, dtype=torch.long)
    full = Exclusion((0,), (0, 1, 2), A.NORM_RATIO)
    assert A.detect_exclusion(_reader(True), toks, _Tok()) == full
    assert A.detect_exclusion(_reader(False), toks, _Tok()) == Exclusion()
    assert resolve_exclusion("auto", _reader(True), toks, _Tok()) == full
    assert resolve_exclusion(True, _reader(False), toks, _Tok()) == full
    assert resolve_exclusion(None, _reader(True), toks, _Tok()) == Exclusion()


def _planted(tmp_path, exclude):
    """A store of 64 contexts of T tokens whose position 0 and token id 1 rows are 1000x the others."""
    g = torch.Generator().manual_seed(0)
    acts = torch.randn(64 * T, D, generator=g)
    toks = torch.randint(3, 50, (64 * T,), generator=g)
    toks[5::T] = 1
    huge = (torch.arange(64 * T) % T == 0) | (toks == 1)
    acts[huge] *= 1000.0
    return A.write_store(tmp_path / str(bool(exclude)), acts, toks, ctx_len=T, exclude=exclude), acts, huge


def test_planted_huge_first_position_never_reaches_the_sae(tmp_path):
    store, acts, huge = _planted(tmp_path, Exclusion((0,), (1,)))
    assert store.n_rows == 64 * T and store.n_tokens == int((~huge).sum())
    assert store.manifest["exclude"] == {"positions": [0], "token_ids": [1]}
    torch.testing.assert_close(store.all(), acts[~huge])
    seen = torch.cat(list(store.batches(100, seed=3)))
    assert seen.norm(dim=1).max() < 50 and seen.shape[0] == store.n_tokens
    assert (store.tokens != 1).all()
    ctx, pos = store.context_of(0)  # the first kept row: position 1 of context 0, its context whole
    assert pos == 1 and ctx.shape == (T,)
    # The input scale is the kept rows' (a planted row would shrink it ~1000x).
    plain = A.write_store(tmp_path / "plain", acts[~huge].contiguous(), ctx_len=int((~huge).sum()))
    s_excl, s_plain = dictionaries.default_input_scale(store, 0), dictionaries.default_input_scale(plain, 0)
    assert s_excl == pytest.approx(s_plain, rel=0.05)
    unexcluded, _, _ = _planted(tmp_path, None)
    assert dictionaries.default_input_scale(unexcluded, 0) < s_excl / 10
    # Training reads the same kept rows: its batches never hold a planted row.
    sae = dictionaries.make_sae("topk", D, 32, k=4, seed=0)
    hist = dictionaries.train_sae(sae, store, steps=5, batch_size=64, progress=False, input_scale=s_excl)
    assert torch.isfinite(torch.tensor(hist["loss"].to_numpy())).all()


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("excl")
    path = write_tiny_llama_gguf(root / "tiny.gguf", seed=0)
    return lm.load_model(lm.model_source(str(path), root / "data")), root


def test_harvest_records_the_exclusion_and_the_store_honours_it(tiny_llama, tmp_path):
    tl, _ = tiny_llama
    ctx = torch.randint(3, 500, (8, T), generator=torch.Generator().manual_seed(1))
    ctx[:, 3] = 2  # an EOS inside every context
    hook = "blocks.0.hook_resid_post"
    folder = A.harvest(tl, ctx, [hook], 8 * T, tmp_path, "tiny", progress=False, exclude=True)[hook]
    store = A.ActivationStore(folder)
    specials = tuple(sorted(set(tl.tokenizer.all_special_ids)))
    # The norm limit at the hook is measured on the harvest's first 8 contexts: 10x the kept positions' median.
    norms = lm.hook_reader(tl, [hook])(ctx)[hook].float().norm(dim=-1)
    by_token = Exclusion((0,), specials).keep(ctx)
    limit = A.NORM_RATIO * float(norms[by_token].median())
    assert store.exclusion.positions == (0,) and store.exclusion.token_ids == specials
    assert store.exclusion.norm_ratio == A.NORM_RATIO
    assert store.exclusion.limit(hook) == pytest.approx(limit, rel=1e-4)
    assert store.manifest["exclude"]["max_norm"] == {hook: pytest.approx(limit, rel=1e-4)}
    assert store.n_rows == 8 * T and store.n_tokens == 8 * (T - 2) and store.n_norm_excluded == 0
    # The same harvest again is accepted (the limit measured again matches), even with another revision's limit
    # passed in: a harvest measures its own.
    again = A.harvest(tl, ctx, [hook], 8 * T, tmp_path, "tiny", progress=False,
                      exclude=store.exclusion.with_limits({hook: 1e9}))[hook]
    assert A.ActivationStore(again).n_tokens == store.n_tokens
    assert not torch.isin(store.tokens, torch.tensor([0, 1, 2])).any()
    # A harvest with another exclusion into the same folder is refused, naming the setting.
    with pytest.raises(ValueError, match="exclude"):
        A.harvest(tl, ctx, [hook], 8 * T, tmp_path, "tiny", progress=False, exclude=None)


def test_spliced_loss_keeps_excluded_positions_clean_and_out_of_the_metrics(tiny_llama):
    tl, _ = tiny_llama
    toks = torch.randint(3, 500, (4, T), generator=torch.Generator().manual_seed(2))
    hook = "blocks.0.hook_resid_post"
    sae = dictionaries.make_sae("relu", tl.cfg.d_model, 2 * tl.cfg.d_model, seed=0)
    ex = Exclusion((0,), ())
    row = analyses.spliced_loss(tl, toks, hook, sae, exclude=ex, progress=False).iloc[0]
    assert row["n_predictions"] == 4 * (T - 2)  # T-1 predictions per context, the one made at position 0 left out
    full = analyses.spliced_loss(tl, toks, hook, sae, progress=False).iloc[0]
    assert full["n_predictions"] == 4 * (T - 1)
    # An exclusion of every position leaves nothing to score: refused, not a division by zero...
    everything = Exclusion(tuple(range(T)), ())
    with pytest.raises(ValueError, match="no prediction"):
        analyses.spliced_loss(tl, toks, hook, sae, exclude=everything, progress=False)
    # ...and excluding position 0 only keeps its clean activation: the prediction there matches the clean one.
    keep0 = analyses.spliced_loss(tl, toks[:, :2], hook, sae, keep_first_position=True, progress=False).iloc[0]
    assert keep0["ce_spliced"] == pytest.approx(keep0["ce_clean"], abs=1e-6)


def test_upper_layers_splice_equals_the_full_hooked_pass(tiny_llama):
    """On a bridge over a Llama, spliced runs start above the hook (`lm.upper`): same numbers as the full pass,
    with and without an exclusion, and the layers below the hook run once per batch."""
    from sparse_coding.analyses.splicing import Splicer

    tl, _ = tiny_llama
    hook = "blocks.0.hook_resid_post"
    toks = torch.randint(3, 500, (6, T), generator=torch.Generator().manual_seed(4))
    sae = dictionaries.make_sae("topk", tl.cfg.d_model, 2 * tl.cfg.d_model, k=4, seed=0)
    for ex in (None, Exclusion((0,), (2,))):
        fast = analyses.spliced_loss(tl, toks, hook, sae, exclude=ex, batch_size=4, progress=False)
        slow = analyses.spliced_loss(tl, toks, hook, sae, exclude=ex, batch_size=4, fast=False, progress=False)
        for col in ("ce_clean", "ce_spliced", "ce_zero", "ce_mean", "kl_to_clean"):
            assert fast[col].iloc[0] == pytest.approx(slow[col].iloc[0], rel=1e-5, abs=1e-6), col
    splicer = Splicer(tl, hook)
    assert splicer.upper is not None
    calls = {"n": 0}
    handle = tl.original_model.model.layers[0].register_forward_pre_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
    try:
        logits, act = splicer.clean(toks)
        assert calls["n"] == 1  # the hook sees the bridge's own passes
        calls["n"] = 0
        patched = splicer.patched(toks, act)
    finally:
        handle.remove()
    assert splicer.upper.ok and calls["n"] == 0  # block 0 (below the hook) did not run again
    torch.testing.assert_close(patched, logits, rtol=1e-4, atol=1e-4)
    assert Splicer(tl, hook, fast=False).upper is None


def test_mining_never_takes_an_excluded_position_as_an_example():
    from sparse_coding.analyses.mining import mine

    toks = torch.randint(3, 50, (6, T), generator=torch.Generator().manual_seed(5))
    toks[:, 4] = 1
    read = _reader(True)  # position 0 is 100x the rest
    enc = {"relu": ("blocks.0.hook_resid_post", torch.relu)}
    mined = mine(read, enc, toks, batch_size=4, n_top=3, n_random=2, window=None, progress=False,
                 exclude=Exclusion((0,), (1,)))["relu"]
    plain = mine(read, enc, toks, batch_size=4, n_top=3, n_random=2, window=None, progress=False)["relu"]
    x = torch.relu(torch.cat([read(toks[i:i + 4])["blocks.0.hook_resid_post"] for i in (0, 4)]))  # as mined
    x[:, 0], x[:, 4] = 0, 0
    torch.testing.assert_close(mined.max, x.amax(dim=(0, 1)))
    assert (plain.max > mined.max).all()  # without the exclusion position 0 holds every maximum
    # Frequencies are over the kept tokens: 6 contexts of T less positions 0 and 4.
    assert mined.n_tokens == 6 * (T - 2) and plain.n_tokens == 6 * T
    torch.testing.assert_close(mined.frequency(), (x > 0).sum(dim=(0, 1)).double() / (6 * (T - 2)))
    for d in range(D):
        assert all(e.position not in (0, 4) for e in mined.top_examples(d) + mined.random_examples(d))


def test_feature_ablation_never_edits_an_excluded_position(tiny_llama):
    from sparse_coding.analyses.ablation import feature_ablation

    tl, _ = tiny_llama
    hook = "blocks.0.hook_resid_post"
    toks = torch.randint(3, 500, (3, T), generator=torch.Generator().manual_seed(6))
    sae = dictionaries.make_sae("relu", tl.cfg.d_model, 2 * tl.cfg.d_model, seed=0)
    f = int(sae.encode(torch.randn(64, tl.cfg.d_model))[0].gt(0).sum(0).argmax())  # a feature that fires
    plain = feature_ablation(tl, sae, hook, toks, f, mode="clamp", value=5.0, where="all")
    ex = feature_ablation(tl, sae, hook, toks, f, mode="clamp", value=5.0, where="all", exclude=Exclusion((0,), ()))
    assert plain.n_positions == 3 * (T - 1) and ex.n_positions == 3 * (T - 2)
    first = feature_ablation(tl, sae, hook, toks, f, mode="clamp", value=5.0, where="all",
                             exclude=Exclusion(tuple(range(1, T)), ()))  # only position 0 kept, edited, scored
    assert first.n_positions == 3
    with pytest.raises(ValueError, match="no prediction"):
        feature_ablation(tl, sae, hook, toks, f, mode="zero", exclude=Exclusion(tuple(range(T - 1)), ()))


def test_norm_outliers_finds_massive_rows_the_exclusion_missed(tmp_path):
    g = torch.Generator().manual_seed(7)
    acts = torch.randn(16 * T, D, generator=g)
    acts[2::T * 4] *= 100.0  # position 2 of every fourth context: past position 0, not a special token
    store = A.write_store(tmp_path / "s", acts, torch.randint(3, 50, (16 * T,), generator=g), ctx_len=T,
                          exclude=Exclusion((0,), ()))
    out = A.norm_outliers(store, norm_ratio=10.0, rows_per_read=7)
    assert out["n_rows"] == 4 and out["positions"] == {2: 4}
    kept = acts[torch.arange(16 * T) % T != 0]
    sq = kept.double().pow(2).sum(1)
    assert out["share_of_sum_squares"] == pytest.approx(float(sq[sq > 100 * sq.median()].sum() / sq.sum()), rel=1e-5)


def _massive_past_zero(tmp_path, name="s"):
    """16 contexts of T whose position 2 in every fourth context is 100x the rest (not position 0, not special)."""
    g = torch.Generator().manual_seed(7)
    acts = torch.randn(16 * T, D, generator=g)
    acts[2::T * 4] *= 100.0
    toks = torch.randint(3, 50, (16 * T,), generator=g)
    return acts, toks


def test_norm_rule_leaves_out_massive_rows_past_position_zero(tmp_path):
    acts, toks = _massive_past_zero(tmp_path)
    store = A.write_store(tmp_path / "s", acts, toks, ctx_len=T, exclude=Exclusion((0,), (), A.NORM_RATIO))
    by_pos = torch.arange(16 * T) % T != 0
    limit = A.NORM_RATIO * float(acts.norm(dim=1)[by_pos].median())
    assert store.exclusion.limit("activations") == pytest.approx(limit, rel=1e-5)
    assert store.n_norm_excluded == 4 and store.n_tokens == int(by_pos.sum()) - 4
    massive = torch.zeros(16 * T, dtype=torch.bool)
    massive[2::T * 4] = True
    torch.testing.assert_close(store.all(), acts[by_pos & ~massive])
    assert A.norm_outliers(store)["n_rows"] == 0
    assert all(store.context_of(r)[1] != 0 for r in range(store.n_tokens))
    # The same rule, applied to activations by a model-in-the-loop reader, gives the store's mask.
    keep = store.exclusion.keep(toks.reshape(16, T), acts.reshape(16, T, D), "activations")
    assert keep.reshape(-1).tolist() == (by_pos & ~massive).tolist()
    with pytest.raises(ValueError, match="acts"):
        store.exclusion.keep(toks.reshape(16, T), hook="activations")


def test_exclusion_json_round_trip_merge_and_tolerance():
    ex = Exclusion((0,), (1, 2), 10.0, (("a", 3.5),))
    assert Exclusion.from_json(ex.to_json()) == ex
    assert ex.for_hook("b") == Exclusion((0,), (1, 2), 10.0) and ex.for_hook("a") == ex
    both = Exclusion.merged([ex, Exclusion((0,), (1, 2), 10.0, (("b", 7.0),))])
    assert both.limit("a") == 3.5 and both.limit("b") == 7.0
    with pytest.raises(ValueError, match="different rows"):
        Exclusion.merged([ex, Exclusion((0,), (), 10.0)])
    assert ex.same_as(ex.with_limits({"a": 3.5 * (1 + 1e-5)})) and not ex.same_as(ex.with_limits({"a": 4.0}))
    for bad in ({"positions": [0], "norm_ratio": 0.5}, {"positions": [0], "max_norm": {"a": -1}},
                {"positions": [0], "max_norm": [1.0]}):
        with pytest.raises(ValueError, match="exclude"):
            Exclusion.from_json(bad)


def test_model_in_the_loop_readers_apply_the_norm_limit(tiny_llama):
    """The spliced loss, feature ablation and mining leave out the rows over the limit at the SAE's hook, exactly
    those the activations there put over it (here a limit at the median, so about half)."""
    from sparse_coding.analyses.ablation import feature_ablation
    from sparse_coding.analyses.mining import mine

    tl, _ = tiny_llama
    hook = "blocks.0.hook_resid_post"
    toks = torch.randint(3, 500, (4, T), generator=torch.Generator().manual_seed(8))
    x = lm.hook_reader(tl, [hook])(toks)[hook]
    norms = x.float().norm(dim=-1)
    ex = Exclusion((0,), (), None, ((hook, float(norms[:, 1:].median())),))
    keep = (norms <= ex.limit(hook)) & (torch.arange(T) != 0)
    assert 0 < int(keep.sum()) < 4 * (T - 1)
    sae = dictionaries.make_sae("relu", tl.cfg.d_model, 2 * tl.cfg.d_model, seed=0)
    row = analyses.spliced_loss(tl, toks, hook, sae, exclude=ex, progress=False).iloc[0]
    assert row["n_predictions"] == int(keep[:, :-1].sum())
    eff = feature_ablation(tl, sae, hook, toks, 0, mode="clamp", value=5.0, where="all", exclude=ex)
    assert eff.n_positions == int(keep[:, :-1].sum())
    mined = mine(lm.hook_reader(tl, [hook]), {"relu": (hook, torch.relu)}, toks, batch_size=4, n_top=3,
                 n_random=2, window=None, progress=False, exclude=ex)["relu"]
    torch.testing.assert_close(mined.max, (torch.relu(x.float()) * keep[..., None]).amax(dim=(0, 1)))
