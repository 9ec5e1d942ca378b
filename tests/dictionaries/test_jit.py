"""The compiled kernels (dictionaries.jit) give what the torch passes they replace give: exactly, on every input
kind the callers meet (ties, -inf fills, NaN, signed zeros, ensembles), and the torch passes still run without them."""

import os
import subprocess
import sys

import pytest
import torch

from sparse_coding.dictionaries import jit, screening
from sparse_coding.dictionaries.kernels import topk_rows

pytestmark = pytest.mark.skipif(jit.numba is None, reason="numba is not installed: the torch passes run")


@pytest.fixture
def both(monkeypatch):
    """Run f with the kernels on, then off: (on, off)."""
    def run(f):
        monkeypatch.setattr(jit, "ENABLED", True)
        on = f()
        monkeypatch.setattr(jit, "ENABLED", False)
        return on, f()
    return run


def test_keys_order_every_bfloat16_as_its_float():
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    vals = bits.view(torch.bfloat16).float()
    ok = ~torch.isnan(vals)
    bits, vals = bits[ok], vals[ok]
    keys = jit.keys_of(bits).long()
    order = torch.argsort(keys)
    assert bool((vals[order].diff() >= 0).all())  # keys sort the floats
    # equal floats (only -0 and +0) have equal keys, different floats different keys
    assert len(torch.unique(keys)) == len(torch.unique(vals))
    back = jit.bits_of(keys.to(torch.int16)).float()
    assert torch.equal(back, vals)  # -0 comes back as +0, an equal float


@pytest.mark.parametrize("shape,k", [((2, 300, 512), 32), ((1000, 1024), 8), ((64, 96), 12), ((5, 4096), 64)])
def test_topk_rows_is_torch_topk(shape, k, both):
    pre = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    (v1, i1), (v0, i0) = both(lambda: topk_rows(pre, k, sorted=True))
    ref = pre.topk(k, dim=-1, sorted=True)
    assert torch.equal(v1, ref.values) and torch.equal(i1, ref.indices)  # no ties: one answer
    assert torch.equal(v0, ref.values) and torch.equal(i0, ref.indices)


@pytest.mark.parametrize("case", ["ties", "neg_inf", "few_finite", "signed_zeros", "all_equal", "pos_inf",
                                  "neg_inf_groups"])
def test_topk_rows_on_ties_and_fills(case, both):
    g = torch.Generator().manual_seed(1)
    pre = torch.randn(200, 512, generator=g)
    if case == "ties":
        pre = torch.randint(0, 5, (200, 512), generator=g).float()
    elif case == "neg_inf":  # masked latents (AuxK's dead-only choice)
        pre[:, 100:] = float("-inf")
    elif case == "few_finite":  # fewer finite values than k: -inf fills the rest, as torch.topk gives
        pre[:, 20:] = float("-inf")
    elif case == "signed_zeros":
        pre = torch.zeros(200, 512)
        pre[:, ::2] = -0.0
    elif case == "all_equal":
        pre = torch.full((200, 512), 0.5)
    elif case == "pos_inf":
        pre[::2, 7], pre[::3, 300] = float("inf"), float("inf")
    elif case == "neg_inf_groups":  # whole strided groups of -inf (AuxK's padded columns)
        pre[:, 0::64] = float("-inf")
        pre[:, 5::64] = float("-inf")
    (v1, i1), _ = both(lambda: topk_rows(pre, 32, sorted=True))
    ref = pre.topk(32, dim=-1, sorted=True)
    assert torch.equal(v1, ref.values)
    assert torch.equal(torch.signbit(v1), torch.signbit(pre.gather(-1, i1)))  # a -0.0 picked stays -0.0
    assert torch.equal(pre.gather(-1, i1), v1)  # the indices hold the values
    assert bool((i1.sort(-1).values.diff(dim=-1) > 0).all())  # distinct latents
    if case in ("ties", "all_equal"):  # among equal values, the lower index first
        same = v1[:, 1:] == v1[:, :-1]
        assert bool((i1[:, 1:] > i1[:, :-1])[same].all())


def test_topk_rows_with_nan_falls_back_to_torch(both):
    pre = torch.randn(50, 512, generator=torch.Generator().manual_seed(2))
    pre[3, 7] = float("nan")
    (v1, i1), _ = both(lambda: topk_rows(pre, 32, sorted=True))
    ref = pre.topk(32, dim=-1, sorted=True)
    assert torch.equal(i1, ref.indices) and torch.allclose(v1, ref.values, equal_nan=True)
    assert bool(torch.isnan(v1[3]).any())  # the NaN is picked, as torch.topk picks it (mining then refuses it)


def test_topk_rows_leaves_autograd_and_other_dtypes_to_torch():
    pre = torch.randn(8, 512, requires_grad=True)
    values, _ = topk_rows(pre, 8, sorted=True)
    assert values.requires_grad
    assert topk_rows(pre.detach().double(), 8, sorted=True)[0].dtype == torch.float64


@pytest.mark.parametrize("E,B,d,n,k,bias", [(1, 512, 256, 16384, 32, 0.0), (2, 300, 256, 8192, 16, 3.0),
                                             (3, 64, 128, 8192, 64, -2.0), (1, 200, 96, 2048, 8, 0.5)])
def test_screen_kernels_give_the_torch_passes_candidates(E, B, d, n, k, bias, both, monkeypatch):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, B, d, generator=g).expand(E, B, d)  # an ensemble's shared input, as training passes it
    W = (torch.randn(E, n, d, generator=g) / d ** 0.5).mT  # column-major, as the SAEs keep W_enc
    b = bias * torch.randn(E, n, generator=g)
    seen = []
    rescore = screening._rescore_top
    monkeypatch.setattr(screening, "_rescore_top", lambda *a: seen.append((a[3], a[4])) or rescore(*a))
    (v1, i1), (v0, i0) = both(lambda: screening.screened_topk(x, W, b, k, sorted=True))
    assert len(seen) == 2
    assert torch.equal(seen[0][0], seen[1][0]) and torch.equal(seen[0][1], seen[1][1])  # same candidates, order
    assert torch.equal(v1, v0) and torch.equal(i1, i0)


def test_screen_with_non_finite_inputs_takes_the_dense_path(both):
    g = torch.Generator().manual_seed(4)
    x, W, b = torch.randn(1, 64, 64, generator=g), torch.randn(1, 64, 4096, generator=g), torch.zeros(1, 4096)
    x[0, 5, 3] = float("inf")
    (v1, i1), (v0, i0) = both(lambda: screening.screened_topk(x, W, b, 8, sorted=True))
    assert torch.equal(i1, i0) and torch.allclose(v1, v0, equal_nan=True)


def test_the_environment_switch_turns_the_kernels_off():
    code = "from sparse_coding.dictionaries import jit; print(jit.ENABLED)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "SPARSE_CODING_JIT": "0"}).stdout.strip()
    assert out == "False"


@pytest.mark.parametrize("n,k", [(100, 4), (999, 8), (770, 32), (4096, 1)])
def test_topk_rows_on_widths_without_power_of_two_groups(n, k, both):
    pre = torch.randn(30, n, generator=torch.Generator().manual_seed(6))
    (v1, i1), _ = both(lambda: topk_rows(pre, k, sorted=True))
    ref = pre.topk(k, dim=-1, sorted=True)
    assert torch.equal(v1, ref.values) and torch.equal(i1, ref.indices)


@pytest.mark.parametrize("case", ["random", "ties"])
def test_unsorted_topk_rows_holds_the_same_set(case, both):
    g = torch.Generator().manual_seed(7)
    pre = torch.randn(300, 1024, generator=g) if case == "random" else torch.randint(0, 9, (300, 1024), generator=g).float()
    (v1, i1), _ = both(lambda: topk_rows(pre, 16, sorted=False))
    ref = pre.topk(16, dim=-1, sorted=True)
    assert torch.equal(v1.sort(-1, descending=True).values, ref.values)
    assert torch.equal(pre.gather(-1, i1), v1) and bool((i1.sort(-1).values.diff(dim=-1) > 0).all())
    if case == "random":
        assert torch.equal(i1.sort(-1).values, ref.indices.sort(-1).values)


@pytest.mark.parametrize("where", ["first_groups", "most_groups", "column"])
def test_topk_rows_with_nan_among_the_group_maxima(where, both):
    """A NaN in the first g values seeds a group maximum: it must be seen before any selection (the row falls back
    to torch.topk, NaN first), whether in one row, in most groups of a row, or in one column of every row."""
    pre = torch.randn(40, 512, generator=torch.Generator().manual_seed(8))
    if where == "first_groups":
        pre[3, 1] = float("nan")
    elif where == "most_groups":
        pre[5, 1:60] = float("nan")
    else:
        pre[:, 9] = float("nan")
    for sort in (True, False):
        (v1, i1), _ = both(lambda: topk_rows(pre, 32, sorted=sort))
        ref = pre.topk(32, dim=-1, sorted=sort)
        assert torch.equal(i1, ref.indices) and torch.allclose(v1, ref.values, equal_nan=True)


def test_the_kernels_compile_without_a_writable_cache(tmp_path):
    """Where numba finds no writable cache location its decorator raises: the kernels then compile per process."""
    code = ("import numba.core.caching as c\n"
            "def refuse(*a, **k): raise RuntimeError('cannot cache function: no locator available')\n"
            "c.Cache.__init__ = refuse\n"
            "from sparse_coding.dictionaries import jit\n"
            "import torch\n"
            "from sparse_coding.dictionaries.kernels import topk_rows\n"
            "x = torch.randn(64, 512)\n"
            "assert not jit.CACHE and jit.ENABLED\n"
            "assert torch.equal(topk_rows(x, 8, sorted=True)[0], x.topk(8, dim=-1).values)\n"
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.stdout.strip() == "ok", out.stderr[-2000:]


@pytest.mark.parametrize("sort", [True, False])
@pytest.mark.parametrize("case", ["plain", "ties", "neg_inf"])
def test_topk_rows_with_bias_and_relu_is_the_definition(sort, case, both):
    """bias [E, n] per member and relu: relu(top-k of pre + bias), the kernel adding the bias as it reads a row."""
    g = torch.Generator().manual_seed(3)
    pre = torch.randn(3, 100, 512, generator=g)
    bias = torch.randn(3, 512, generator=g)
    if case == "ties":
        pre, bias = torch.randint(-3, 3, (3, 100, 512), generator=g).float(), torch.zeros(3, 512)
    elif case == "neg_inf":
        pre[:, :, 40:] = float("-inf")
    full = pre + bias[:, None]
    ref = full.topk(32, dim=-1, sorted=True)
    for v, i in both(lambda: topk_rows(pre, 32, sorted=sort, bias=bias, relu=True)):
        picked = full.gather(-1, i)
        assert torch.equal(v, picked.relu())
        if not sort:  # in some order: the same values (ties: any of the tied latents)
            picked = picked.sort(dim=-1, descending=True).values
        assert torch.equal(picked, ref.values)
        assert bool((i.sort(-1).values.diff(dim=-1) > 0).all())  # distinct latents


@pytest.mark.parametrize("case", ["plain", "tie_inside", "tie_at_cut"])
def test_unsorted_topk_rows_keep_their_order(case, both):
    """Unsorted: the values above the k-th largest in index order, then those equal to it (the order a TopK step's
    sparse decode sums in, so training stays bit-identical to the earlier kernel)."""
    g = torch.Generator().manual_seed(5)
    pre = torch.randn(64, 512, generator=g)
    order = pre.argsort(dim=-1, descending=True)
    k = 16
    if case == "tie_inside":  # the (k-1)-th and k-th largest equal, the (k+1)-th below: an exact cut exists
        pre.scatter_(-1, order[:, k - 1:k], pre.gather(-1, order[:, k - 2:k - 1]))
    elif case == "tie_at_cut":  # the k-th and (k+1)-th largest equal: no exact cut, the lower index goes in
        pre.scatter_(-1, order[:, k:k + 1], pre.gather(-1, order[:, k - 1:k]))
    for v, i in both(lambda: topk_rows(pre, k, sorted=False)):
        vk = pre.topk(k, dim=-1).values[:, -1:]
        for r in range(len(pre)):
            above = (pre[r] > vk[r]).nonzero().squeeze(1)
            equal = (pre[r] == vk[r]).nonzero().squeeze(1)[:k - len(above)]
            want = torch.cat([above, equal])
            if not jit.ENABLED:  # torch.topk: its own order and tie rule, only the values are given
                want, got = pre[r, want].sort().values, pre[r, i[r]].sort().values
            else:
                got = i[r]
            assert torch.equal(got, want), (case, r)
            assert torch.equal(v[r], pre[r, i[r]])
