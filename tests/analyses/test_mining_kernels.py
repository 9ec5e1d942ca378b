"""Mining through the compiled kernels (`analyses.mining_kernels`) keeps exactly what the torch passes keep, field
for field: dense codes and picks, windows and whole contexts, no quantile samples, exclusion, context maxima, ties,
values over many octaves (bin edges and powers of two included), batch sizes from one context to all."""

from __future__ import annotations

import math

import pytest
import torch

from sparse_coding.activations import Exclusion
from sparse_coding.analyses import mining_kernels, mining_stream, mining_windows
from sparse_coding.analyses.mining import mine
from sparse_coding.dictionaries import jit

from test_mining_picks import FIELDS, as_picks, codes

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(jit.numba is None, reason="numba is not installed: the torch passes run")]

N, T, D, W = 23, 7, 40, 6


def mine_with(a: torch.Tensor, compiled: bool, monkeypatch, picks: bool, **kw):
    monkeypatch.setattr(jit, "ENABLED", compiled)
    tokens = torch.arange(N * T).reshape(N, T)
    flat = a.reshape(-1, D)
    encode = (lambda x: as_picks(x, W)) if picks else (lambda x: x)
    kw = {"n_top": 4, "n_random": 3, "per_bin": 2, "progress": False, **kw}
    return mine(lambda tb: {"h": flat[tb]}, {"e": ("h", encode)}, tokens, **kw)["e"]


def assert_same(x, y):
    for name in FIELDS:
        torch.testing.assert_close(getattr(x, name), getattr(y, name), rtol=0, atol=0, equal_nan=True, msg=name)
    assert x.n_tokens == y.n_tokens
    assert (x.context_max is None) == (y.context_max is None)
    if x.context_max is not None:
        assert torch.equal(x.context_max, y.context_max)


@pytest.mark.parametrize("picks", [False, True])
@pytest.mark.parametrize("window", [(2, 1), None])
@pytest.mark.parametrize("batch_size", [1, 5, N])
def test_compiled_mining_keeps_what_the_torch_passes_keep(picks, window, batch_size, monkeypatch):
    assert mining_kernels.available() or not jit.ENABLED
    a = codes()
    kw = {"window": window, "batch_size": batch_size, "keep_context_max": True}
    assert_same(mine_with(a, True, monkeypatch, picks, **kw), mine_with(a, False, monkeypatch, picks, **kw))


@pytest.mark.parametrize("per_bin,n_top,n_random", [(0, 2, 1), (4, 7, 5)])
def test_compiled_mining_with_other_table_sizes(per_bin, n_top, n_random, monkeypatch):
    a = codes(3)
    kw = {"per_bin": per_bin, "n_top": n_top, "n_random": n_random, "batch_size": 3, "seed": 2 ** 40 + 7}
    assert_same(mine_with(a, True, monkeypatch, True, **kw), mine_with(a, False, monkeypatch, True, **kw))


def test_compiled_mining_on_bin_edges_ties_and_exclusion(monkeypatch):
    """Values exactly on the grid's edges (powers of two, 2^(j/4) rounded) and one float32 step either side, many
    equal values (every context's max ties), and excluded tokens."""
    g = torch.Generator().manual_seed(5)
    edges = torch.pow(2.0, torch.arange(-70, 70, dtype=torch.float64) / 4).float()
    pool = torch.cat([edges, torch.nextafter(edges, torch.tensor(0.0)), torch.nextafter(edges, torch.tensor(1e30)),
                      torch.full((50,), 0.5)])
    a = codes(4)
    fire = a > 0
    a[fire] = pool[torch.randint(len(pool), (int(fire.sum()),), generator=g)]
    excl = Exclusion(token_ids=[3, 17, 40])  # token ids are positions here: tokens = arange

    def run(compiled):
        return mine_with(a, compiled, monkeypatch, True, batch_size=4, exclude=excl, keep_context_max=True)

    assert_same(run(True), run(False))
    m = run(True)
    assert int(m.hist.sum()) == int(m.count.sum()) > 0


def test_the_bins_are_the_torch_formula_everywhere():
    """The compiled pass bins with math.log2; torch with its own log2: the same bin for every float32 power of two,
    its neighbours and values around every edge of the grid (where one ulp of log2 could matter)."""
    pw = torch.pow(2.0, torch.arange(-149, 128, dtype=torch.float64)).float()
    edges = torch.pow(2.0, torch.arange(-70, 70, dtype=torch.float64) / 4).float()
    v = torch.cat([pw, edges, *(torch.nextafter(t, torch.tensor(s)) for t in (pw, edges) for s in (0.0, 1e38))])
    v = v[(v > 0) & torch.isfinite(v)]
    n = len(v)
    f = torch.zeros(n, dtype=torch.long)
    rows = torch.arange(n)
    hist = torch.zeros(mining_stream.N_BINS, dtype=torch.long)
    out = [torch.zeros(n, dtype=torch.long), torch.zeros(1, n), torch.zeros(1, n, dtype=torch.long)]
    for i in range(n):  # one pair per call: the bin of each value alone
        hist.zero_()
        mining_kernels.pairs_pass(rows[i:i + 1] * 0, f[i:i + 1], v[i:i + 1], 0, 1, mining_stream.BINS_PER_OCTAVE,
                                  mining_stream._OFFSET, mining_stream.N_BINS, out[0][:1].clone(),
                                  torch.zeros(4, 1, dtype=torch.float64), hist, torch.zeros(1, 1),
                                  torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, dtype=torch.long),
                                  torch.zeros(1, dtype=torch.long), torch.zeros(0, dtype=torch.float64))
        out[0][i] = int(hist.nonzero()[0])
    vd = v.double()
    ref = (vd.log2() * mining_stream.BINS_PER_OCTAVE).floor().clamp_(
        -mining_stream._OFFSET, mining_stream.N_BINS - 1 - mining_stream._OFFSET).long() + mining_stream._OFFSET
    assert torch.equal(out[0], ref)
    assert not math.isnan(float(v.sum()))


def test_compiled_columns_are_the_codes():
    a = codes(6)
    flat = a.reshape(-1, D)
    picks = as_picks(flat, W)
    cols = mining_windows.PickColumns(picks.values.view(N, T, W), picks.latents.view(N, T, W), D)
    for m in (0, 1, 5, 3000):  # repeats of one (context, direction) among them
        b = torch.randint(N, (m,), generator=torch.Generator().manual_seed(0))
        ff = torch.randint(D, (m,), generator=torch.Generator().manual_seed(1))
        assert torch.equal(cols.columns(b, ff), a[b, :, ff])


@pytest.mark.parametrize("picks", [False, True])
@pytest.mark.parametrize("window", [None, (2, 1)])
def test_compiled_mining_on_two_threads_keeps_the_same(picks, window, monkeypatch):
    """The pairs pass splits each batch's contexts into two halves, one per thread, each with its own sums: on two
    threads (the halves at once) every field is still the torch passes' (no race, the same float64 sums)."""
    torch.set_num_threads(2)  # the one_thread fixture restores the count afterwards
    a = codes(8)
    kw = {"window": window, "batch_size": 6, "keep_context_max": True}
    assert_same(mine_with(a, True, monkeypatch, picks, **kw), mine_with(a, False, monkeypatch, picks, **kw))


def test_first_of_is_numpy_unique_in_order_of_appearance():
    buffers: dict = {}
    g = torch.Generator().manual_seed(4)
    for m, size in ((0, 60), (1, 60), (7, 60), (500, 60), (300, 20), (900, 200)):  # smaller after larger, growth
        key = torch.randint(0, size, (m,), generator=g)
        first, inverse = mining_windows.first_of(key, size, buffers)
        assert torch.equal(key[first][inverse], key)  # every key is its representative's
        assert len(first) == len(torch.unique(key)) and bool((first.diff() > 0).all())  # once each, in order
        assert all(int(f) == int((key == key[f]).nonzero()[0]) for f in first)  # the first appearance
        assert bool((torch.from_numpy(buffers["first_of"]) == -1).all())  # the table is left clean
