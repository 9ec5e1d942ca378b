"""Bad inputs and stale caches around mining and harvesting, each once a silent wrong result or an obscure error:
token ids outside the vocabulary (every hook reader checks them), a negative window, a mining cache shared by two
dictionaries of the same weights but another k or by a model changed in place, examples recomputed at another hook
or without the mining's exclusion, a harvest folder reused for another text, a repeated hook, an Exclusion built
with values its manifest reader refuses."""

from __future__ import annotations

import pytest
import torch

from sparse_coding import activations as A
from sparse_coding import lm
from sparse_coding.activations import Exclusion
from sparse_coding.analyses.features import examples_at, mine_dictionary
from sparse_coding.dictionaries import make_sae

pytestmark = pytest.mark.usefixtures("one_thread")
HOOK = "blocks.0.hook_resid_post"


@pytest.fixture(scope="module")
def setup(tiny_model):
    model, tokens, folder = tiny_model
    return model, tokens[:24], folder


@pytest.mark.parametrize("fast", [True, False])
def test_every_hook_reader_checks_token_ids(setup, fast):
    model, tokens, folder = setup
    read = lm.hook_reader(model, [HOOK], fast=fast)
    V = int(model.cfg.d_vocab)
    for bad, match in ((tokens.clone().fill_(V), rf"\[0, {V}\).*\[{V}, {V}\]"), (tokens - 1000, "another tokenizer"),
                       (tokens.float(), "integer token ids"), (tokens[0], "integer token ids")):
        with pytest.raises(ValueError, match=match):
            read(bad)
    assert torch.equal(read(tokens[:2].to(torch.int32))[HOOK], read(tokens[:2])[HOOK])
    with pytest.raises(ValueError, match="token ids must lie in"):
        mine_dictionary(model, make_sae("relu", 32, 16), HOOK, tokens.clone().fill_(V), progress=False)


def test_negative_window_and_quantile_arguments(setup):
    model, tokens, folder = setup
    sae = make_sae("topk", 32, 16, k=3, seed=0)
    with pytest.raises(ValueError, match="window's tokens before must be an int >= 0"):
        mine_dictionary(model, sae, HOOK, tokens, window=(-2, 4), progress=False)
    mined = mine_dictionary(model, sae, HOOK, tokens, progress=False)
    f = int(mined.count.argmax())
    for kw, name in (({"n_bins": 0}, "n_bins"), ({"per_bin": 0}, "per_bin"), ({"n_bins": -3}, "n_bins")):
        with pytest.raises(ValueError, match=f"{name} must be an int >= 1"):
            mined.quantile_locations(f, **kw)


def test_mining_cache_holds_the_dictionary_kind_and_the_model_weights(setup, tmp_path):
    model, tokens, folder = setup
    k1, k6 = make_sae("topk", 32, 16, k=1, seed=0), make_sae("topk", 32, 16, k=6, seed=0)
    one = mine_dictionary(model, k1, HOOK, tokens, folder=tmp_path, progress=False)
    six = mine_dictionary(model, k6, HOOK, tokens, folder=tmp_path, progress=False)  # same weights, another k
    assert int(one.count.sum()) <= tokens.numel() < int(six.count.sum())
    assert len(list(tmp_path.glob("mining-*"))) == 2
    changed = lm.load_model(folder)  # the same source and revision, then changed in place
    with torch.no_grad():
        for p in changed.parameters():
            p.mul_(0.5)
    again = mine_dictionary(changed, k6, HOOK, tokens, folder=tmp_path, progress=False)
    assert not torch.equal(again.power_sums, six.power_sums) and len(list(tmp_path.glob("mining-*"))) == 3
    assert torch.equal(mine_dictionary(model, k6, HOOK, tokens, folder=tmp_path, progress=False).count, six.count)


def test_examples_at_follows_what_was_mined(setup):
    model, tokens, folder = setup
    sae = make_sae("relu", 32, 16, seed=1)
    ex = Exclusion(positions=(0, 2, 4, 6))
    mined = mine_dictionary(model, sae, HOOK, tokens, window=None, exclude=ex, progress=False)
    f = int(mined.count.argmax())
    top = mined.top_examples(f)[0]
    again = examples_at(model, sae, HOOK, mined, f, [(top.context, top.position, top.value)])[0]
    assert again.acts == pytest.approx(top.acts, rel=1e-5, abs=1e-6)
    assert all(again.acts[p] == 0 for p in ex.positions)  # excluded positions read 0, as in the mining
    with pytest.raises(ValueError, match="hook='blocks.1.hook_resid_post' but these features were mined with"):
        examples_at(model, sae, "blocks.1.hook_resid_post", mined, f, [(top.context, top.position, 1.0)])
    for loc in ((top.context, -1, 1.0), (-1, 3, 1.0), (len(tokens), 0, 1.0), (0, tokens.shape[1], 1.0)):
        with pytest.raises(ValueError, match="locations must be"):
            examples_at(model, sae, HOOK, mined, f, [loc])


def test_harvest_refuses_another_text_in_its_folder_and_a_repeated_hook(setup, tmp_path):
    model, tokens, folder = setup
    A.harvest(model, tokens[:4], [HOOK], 64, tmp_path, "tiny", progress=False, exclude=None)
    A.harvest(model, tokens[:4], [HOOK], 64, tmp_path, "tiny", progress=False, exclude=None)  # the same: reused
    with pytest.raises(ValueError, match="tokens_sha1"):
        A.harvest(model, tokens[8:12], [HOOK], 64, tmp_path, "tiny", progress=False, exclude=None)
    with pytest.raises(ValueError, match="more than once"):
        A.harvest(model, tokens[:4], [HOOK, HOOK], 64, tmp_path / "b", "tiny", progress=False, exclude=None)


def test_exclusion_built_directly_follows_the_manifest_rules():
    assert Exclusion(positions=[3, 0, 0]) == Exclusion.from_json({"positions": [0, 3]})
    assert Exclusion(positions=[0]).same_as(Exclusion.from_json({"positions": [0], "token_ids": []}))
    for bad, match in ((dict(norm_ratio=0.5), "norm_ratio must be a number over 1"),
                       (dict(positions=(-1,)), "positions must be ints >= 0"),
                       (dict(token_ids=(-4,)), "token_ids must be ints >= 0"),
                       (dict(max_norm=(("h", -1.0),)), "max_norm must be")):
        with pytest.raises(ValueError, match=match):
            Exclusion(**bad)


@pytest.mark.parametrize("make", ["sae_encoder", "sae_picks_encoder"])
def test_encoders_leave_the_sae_in_the_mode_it_was_in(make):
    # before: building an encoder switched the SAE to eval mode for good (a BatchTopK SAE in training then encoded
    # with its inference threshold)
    from sparse_coding.analyses import features

    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    sae = make_sae("batchtopk", 32, 64, k=4)
    encode = getattr(features, make)(sae)
    assert sae.training
    codes = encode(x)
    assert sae.training and all(m.training for m in sae.modules())
    sae.eval()
    torch.testing.assert_close(codes, sae.encode(x)[0])  # what it gave is the eval-mode encoding
    encode(x)
    assert not sae.training
