"""Feature mining does not depend on the order tokens arrive in (`analyses.mining`, issue #22): the histogram grid
is fixed in activation units (a known-answer test of its bins), the sample keys are hashes of (seed, context,
position, direction), so any batch size gives the identical result and a permutation of the contexts the identical
histogram, top values and covered quantile bins; the saved results carry a format, and a cache from the old code
(grid anchored at the first batch's max) is never reused."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import sparse_coding.analyses.features as features_module
from sparse_coding import lm
from sparse_coding.analyses.features import load_mined, mine_dictionary, save_mined
from sparse_coding.analyses.mining import BINS_PER_OCTAVE, FORMAT, N_BINS, mine
from sparse_coding.analyses.sketch_keys import hash_states, keys_of, sketch_keys as _keys
from sparse_coding.dictionaries import make_sae

pytestmark = pytest.mark.usefixtures("one_thread")

N, T, D = 37, 9, 6  # 37 contexts: no batch size below divides them, so the last batch is short
FIELDS = [f for f in features_module._FIELDS if f != "power_sums"] + ["tokens"]  # power sums: summation order


def activations(seed: int = 0) -> torch.Tensor:
    """[N, T, D] non-negative, sparse, spread over ~20 octaves; direction 3 is one constant value wherever it fires
    (every context's max ties: the top examples must break ties alike) and direction 5 never fires."""
    g = torch.Generator().manual_seed(seed)
    a = torch.exp(torch.randn(N, T, D, generator=g) * 3.0) * (torch.rand(N, T, D, generator=g) < 0.4)
    a[..., 3] = 0.75 * (torch.rand(N, T, generator=g) < 0.3)
    a[..., 5] = 0.0
    return a


def mine_values(values: torch.Tensor, order: torch.Tensor | None = None, *, batch_size: int, per_bin: int = 2,
                window=(2, 1), seed: int = 0):
    """Mine `values` [N, T, D] read exactly (tokens hold their own flat index, the encoder is the identity), the
    contexts in `order` (default: as given)."""
    tokens = torch.arange(values.shape[0] * values.shape[1]).reshape(values.shape[:2])
    tokens = tokens if order is None else tokens[order]
    flat = values.reshape(-1, values.shape[-1])
    read = lambda tb: {"h": flat[tb]}  # noqa: E731
    return mine(read, {"x": ("h", lambda x: x)}, tokens, batch_size=batch_size, n_top=4, n_random=3,
                per_bin=per_bin, window=window, seed=seed, progress=False)["x"]


def examples(ex_list) -> list[tuple]:
    """Examples as comparable tuples (NaN windows compared as NaN)."""
    return [(e.context, e.position, e.value, tuple(e.tokens), e.target, tuple(np.nan_to_num(e.acts, nan=-7.0)))
            for e in ex_list]


def quantiles(mined, d: int, **kw) -> list[tuple]:
    return [(lo, hi, examples(exs)) for lo, hi, exs in mined.quantile_examples(d, **kw)]


def test_grid_known_answer():
    """v lands in bin floor(log2(v) · BINS_PER_OCTAVE) + N_BINS / 2, clamped: 2^-16 .. 2^16 in 4 bins per octave,
    everything below in bin 0 and above in the last; the edges are 2^((i - 64) / 4) for every direction."""
    assert (BINS_PER_OCTAVE, N_BINS) == (4, 128)
    ks = torch.arange(-60, 60, 7)
    mid = torch.pow(2.0, (ks + 0.5) / 4)  # the middle of bin k + 64 (geometric)
    exact = torch.pow(2.0, torch.arange(-15, 16, 5).double())  # powers of two sit on their bin's lower edge
    outside = torch.tensor([2.0 ** -16, 1e-7, 3e-30, 2.0 ** 16, 1e6, 3e30])
    v = torch.cat([mid, exact, outside]).float()
    expected = torch.cat([ks + 64, torch.arange(-15, 16, 5) * 4 + 64, torch.tensor([0, 0, 0, 127, 127, 127])])
    assert torch.equal(expected, (torch.floor(torch.log2(v.double()) * 4) + 64).clamp(0, 127).long())
    values = torch.zeros(len(v), 3, 1)
    values[:, 1, 0] = v
    mined = mine_values(values, batch_size=5)
    assert torch.equal(mined.hist[0], torch.bincount(expected, minlength=N_BINS))
    edges = mined.bin_edges(0)
    assert edges.dtype == torch.float64 and edges.shape == (N_BINS + 1,)
    assert float(edges[0]) == 2.0 ** -16 and float(edges[64]) == 1.0 and float(edges[-1]) == 2.0 ** 16
    torch.testing.assert_close(edges, torch.pow(2.0, (torch.arange(129).double() - 64) / 4), rtol=1e-15, atol=0)
    for i in range(1, 127):  # every value inside the grid lies within its bin's edges
        inside = (expected == i).nonzero().squeeze(1)
        assert bool(((v[inside].double() >= edges[i]) & (v[inside].double() < edges[i + 1])).all())
    other = mine_values(activations(), batch_size=7)  # other data, other directions: the same edges
    assert all(torch.equal(other.bin_edges(d), edges) for d in range(D))
    with pytest.raises(ValueError, match="latent"):
        mined.bin_edges(1)


@pytest.mark.parametrize("window", [(2, 1), None])
def test_batch_size_changes_nothing(window):
    """Batch sizes 1, 4, 10 and all contexts at once: identical count, histogram, edges, every kept tensor, top,
    random and quantile examples; moments equal to float rounding (the power sums are summed in another order)."""
    values = activations()
    runs = [mine_values(values, batch_size=b, window=window) for b in (N, 1, 4, 10)]
    ref = runs[0]
    assert int((ref.count > 0).sum()) == D - 1 and int(ref.count[3]) > 4  # live directions; the tied one fires
    assert int((ref.hist > 0).sum(1).max()) >= 40  # many octaves: a grid anchored on a first batch would clip them
    for run in runs[1:]:
        for name in FIELDS:
            x, y = getattr(ref, name), getattr(run, name)
            assert x.dtype == y.dtype and x.shape == y.shape, name
            torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True, msg=name)
        for key, m in ref.moments().items():
            torch.testing.assert_close(run.moments()[key], m, rtol=1e-12, atol=1e-300, equal_nan=True)
        for d in range(D):
            assert torch.equal(run.bin_edges(d), ref.bin_edges(d))
            assert examples(run.top_examples(d)) == examples(ref.top_examples(d))
            assert examples(run.random_examples(d)) == examples(ref.random_examples(d))
            assert quantiles(run, d) == quantiles(ref, d)
            assert quantiles(run, d, n_bins=7, per_bin=3, seed=4) == quantiles(ref, d, n_bins=7, per_bin=3, seed=4)
    # Ties (direction 3 is 0.75 wherever it fires) go to the lowest context indices, whatever the batch size.
    firing = (values[..., 3] > 0).any(1).nonzero().squeeze(1)
    assert ref.top_context[3].tolist() == firing[:4].tolist()
    assert mine_values(values, batch_size=4, seed=1).random_context.ne(ref.random_context).any()  # seeded


def covered(mined, d: int, n_bins: int = 10, per_bin: int = 5) -> list[int]:
    return [j for j, (_, _, locs) in enumerate(mined.quantile_locations(d, n_bins, per_bin)) if locs]


def test_permuted_contexts_give_the_same_histogram_and_coverage():
    """The contexts in another order: identical counts, histogram, edges and top values, moments to float rounding;
    with every firing token kept (per_bin large) the covered quantile bins and their values are identical, and with a
    small per_bin each quantile bin holding a whole non-empty histogram bin is covered in both orders."""
    values = activations(seed=1)
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(9))
    for per_bin in (2, N * T):
        a = mine_values(values, batch_size=5, per_bin=per_bin)
        b = mine_values(values, perm, batch_size=8, per_bin=per_bin)
        assert torch.equal(a.count, b.count) and torch.equal(a.hist, b.hist)
        assert torch.equal(a.top_value, b.top_value)
        for key, m in a.moments().items():
            torch.testing.assert_close(b.moments()[key], m, rtol=1e-12, atol=1e-300, equal_nan=True)
        for d in range(D):
            assert torch.equal(a.bin_edges(d), b.bin_edges(d))
            # the same contexts by content (the permuted run indexes its own token rows)
            for ea, eb in zip(a.top_examples(d), b.top_examples(d)):
                assert ea.value == eb.value
                if d != 3:  # no ties in the continuous directions
                    assert torch.equal(a.tokens[ea.context], b.tokens[eb.context])
            if per_bin == N * T:
                assert covered(a, d) == covered(b, d)
                for (_, _, la), (_, _, lb) in zip(a.quantile_locations(d, 10, 10 ** 6),
                                                  b.quantile_locations(d, 10, 10 ** 6)):
                    assert sorted(v for *_, v in la) == sorted(v for *_, v in lb)
                continue
            if d == 5:  # dead: nothing to cover
                assert covered(a, d) == covered(b, d) == []
                continue
            edges, top = a.bin_edges(d).numpy(), float(a.max[d])
            whole = set() if d != 3 else {9}  # direction 3's one value is its max: the last quantile bin
            for i in np.flatnonzero(a.hist[d].numpy())[:-1]:  # the max's own bin may reach past the max
                lo_j = math.floor(edges[i] / top * 10)  # the quantile bin (lo, hi] just above the hist bin's floor
                if 0 < i < N_BINS - 1 and lo_j < 10 and edges[i + 1] <= top * (lo_j + 1) / 10:
                    whole.add(lo_j)
            assert whole and whole <= set(covered(a, d)) and whole <= set(covered(b, d)), d
            fired = {min(int(x / top * 10 - 1e-9), 9) for x in values[..., d][values[..., d] > 0].tolist()}
            assert set(covered(a, d)) <= fired and set(covered(b, d)) <= fired


def test_keys_are_uniform_float64_without_ties_or_overflow():
    """The keys: float64 in [0, 1), deterministic, from int64 hashes that never overflow (inputs up to 2^32 - 1
    included), with no tie among 2^20 (context, position) pairs, and about uniform."""
    c, p = torch.meshgrid(torch.arange(1024), torch.arange(1024), indexing="ij")
    k = _keys(0, 0, 0, c, p, 3)
    assert k.dtype == torch.float64 and bool(((k >= 0) & (k < 1)).all())
    assert torch.equal(k, _keys(0, 0, 0, c, p, 3)) and not torch.equal(k, _keys(0, 1, 0, c, p, 3))
    assert len(torch.unique(k)) == k.numel()
    assert abs(float(k.mean()) - 0.5) < 2e-3 and abs(float((k < 0.1).double().mean()) - 0.1) < 2e-3
    big = _keys(0, 2 ** 32 - 1, 2 ** 32 - 1, torch.tensor([2 ** 32 - 1, 2 ** 31]), 2 ** 32 - 1, 2 ** 32 - 1)
    assert bool(((big >= 0) & (big < 1)).all())


def test_hash_states_continue_the_keys_exactly():
    """The miner hashes a token's (seed, context, position) once and only the direction per firing pair, and rules
    pairs out on the first hash state alone: both must give exactly sketch_keys' keys and never rule out a key
    below the threshold (key in [h1 / 2^32, (h1 + 1) / 2^32))."""
    g = torch.Generator().manual_seed(0)
    c, p, f = (torch.randint(0, 2 ** 32, (4096,), generator=g) for _ in range(3))
    ref = _keys(0, 7, 2 ** 32 - 1, c, p, f)
    token = hash_states(c, p, states=hash_states(0, 7, 2 ** 32 - 1))
    assert torch.equal(keys_of(hash_states(f, states=token)), ref)
    (h1,) = hash_states(f, states=token[:1])
    lo = h1.double() * 2.0 ** -32
    assert bool(((lo <= ref) & (ref < lo + 2.0 ** -32)).all())


# ---------------------------------------------------------------------------------------------- the cache format

@pytest.fixture(scope="module")
def setup(tiny_lm, one_thread):
    _, _, folder = tiny_lm
    model = lm.load_model(folder)
    sae = make_sae("relu", d_in=model.cfg.d_model, d_sae=6, seed=2, pre_bias=False)
    return model, sae, lm.validation_contexts(folder, split="train")[:40]


def test_cache_key_and_file_carry_the_format(setup, tmp_path, monkeypatch):
    """mine_dictionary's saved result records FORMAT; a folder mined by the old code (no format, an anchor tensor)
    is refused by load_mined, and a cache made under another format is never reused; another batch size reuses it."""
    model, sae, tokens = setup
    kw = dict(folder=tmp_path, batch_size=7, n_top=3, n_random=2, window=(2, 1), progress=False)
    first = mine_dictionary(model, sae, "blocks.1.hook_resid_post", tokens, **kw)
    (cache,) = tmp_path.glob("mining-*")
    assert json.loads((cache / "mined.json").read_text())["format"] == FORMAT == first.meta["format"]

    def refuse(*a, **k):
        raise AssertionError("mine was called although the result is cached")

    monkeypatch.setattr(features_module, "mine", refuse)
    again = mine_dictionary(model, sae, "blocks.1.hook_resid_post", tokens, **{**kw, "batch_size": 13})
    assert torch.equal(again.hist, first.hist)
    monkeypatch.setattr(features_module, "FORMAT", FORMAT + 1)  # as if the cache had been written by other code
    with pytest.raises(AssertionError, match="cached"):
        mine_dictionary(model, sae, "blocks.1.hook_resid_post", tokens, **kw)
    monkeypatch.undo()
    old = tmp_path / "old"
    save_mined(first, old)
    meta = json.loads((old / "mined.json").read_text())
    del meta["format"]
    (old / "mined.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=rf"format 1, this code reads format {FORMAT}.*delete the folder"):
        load_mined(old)


def test_quantile_draws_are_torch_multinomial():
    """`mining._draw` replaces torch.multinomial without replacement by the same exponential draws: the same picks,
    in the same order, and the generator left in the same state, for ties, one pick and many."""
    from sparse_coding.analyses.mining import _draw

    for seed in range(40):
        for L, n in ((2, 1), (7, 3), (40, 5), (200, 5)):
            w = torch.rand(L, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 99)) + 0.01
            if seed % 2:
                w[::2] = 1.0  # equal weights
            g1, g2 = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
            assert _draw(w.numpy(), n, g1) == torch.multinomial(w, n, replacement=False, generator=g2).tolist()
            assert torch.equal(torch.rand(3, generator=g1), torch.rand(3, generator=g2))



def test_mining_without_numba_takes_the_torch_passes(tmp_path):
    """Where numba cannot be imported, mining (dense codes and a TopK SAE's picks) runs on the torch passes."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['numba'] = None\n"
            "import torch\n"
            "from sparse_coding.analyses.mining import mine\n"
            "from sparse_coding.dictionaries import jit, make_sae\n"
            "from sparse_coding.analyses.features import sae_picks_encoder\n"
            "assert not jit.ENABLED\n"
            "x = torch.rand(70, 16)\n"
            "tokens = torch.arange(70).reshape(10, 7)\n"
            "read = lambda tb: {'h': x[tb.reshape(-1)].reshape(*tb.shape, 16)}\n"
            "sae = make_sae('topk', d_in=16, d_sae=64, k=4, seed=0)\n"
            "out = mine(read, {'d': ('h', lambda a: a), 't': ('h', sae_picks_encoder(sae))}, tokens, batch_size=3,"
            " progress=False)\n"
            "assert int(out['d'].count.sum()) == 70 * 16 and int(out['t'].count.sum()) <= 70 * 4\n"
            "print('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert done.stdout.strip() == "ok", done.stderr[-2000:]
