"""Feature mining: one streaming pass of a model over held-out text that keeps, for every direction of one or more
encoders (an SAE's latents, neurons, PCA/ICA components, ...), what case studies and interpretability scores need,
never the [tokens × directions] activation matrix. Per direction: the firing count, the power sums Σa, Σa², Σa³, Σa⁴
over all tokens (mean, variance, skew, kurtosis), a histogram on one fixed geometric grid in activation units
(`BINS_PER_OCTAVE` bins per factor 2 from 2^LOWEST_OCTAVE to 2^HIGHEST_OCTAVE, alike for every direction and run), the
`n_top` contexts with the largest max activation (ties: the lower context index) and a window of per-token activations
around that max, a seeded uniform sample of `n_random` contexts where the direction fires (same windows), and per
histogram bin a seeded uniform sample of `per_bin` firing tokens with their windows (the quantile examples between 0
and the max are drawn from it). Memory: O(directions × (n_top + n_random + N_BINS × per_bin) × window). The samples
are bottom-k sketches: each candidate's key in [0, 1) is a hash of (seed, context index, position, direction) (of
(seed, context, direction) for the context sample), each group keeps its k smallest: a uniform sample without
replacement of all the group saw. So nothing kept depends on the batch size; reordering the contexts changes which
tokens are sampled, not the counts, histogram, top values or (to rounding) moments."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch
from tqdm.auto import tqdm

from ..activations import Exclusion
from ..arguments import checked
from ..checks import check_int
from .sketch_keys import sketch_keys as _keys

BINS_PER_OCTAVE = 4
LOWEST_OCTAVE, HIGHEST_OCTAVE = -16, 16  # bin 0 also takes the values below, the last bin those above
N_BINS = (HIGHEST_OCTAVE - LOWEST_OCTAVE) * BINS_PER_OCTAVE
_OFFSET = -LOWEST_OCTAVE * BINS_PER_OCTAVE  # the bin whose lower edge is 1.0
FORMAT = 2  # of what `mine` keeps (meta "format"); 1 anchored the grid at each direction's max in the first batch
@dataclass
class Example:
    """A window of a context around one token: `tokens` and the direction's per-token `acts` (NaN past the context's
    edges, token -1 there), `target` the index in the window of the token the example is about."""

    context: int
    position: int
    value: float
    tokens: list[int]
    acts: list[float]
    target: int


@dataclass
class Mined:
    """What `mine` kept for every direction of one encoder; tensors have the direction axis first ([n, ...]).
    `tokens` [n_contexts, ctx_len] is the text mined (contexts are indexed into it)."""

    tokens: torch.Tensor
    count: torch.Tensor          # [n] long: tokens where the direction fires (> 0)
    power_sums: torch.Tensor     # [n, 4] float64: Σa, Σa², Σa³, Σa⁴ over all tokens (zeros included)
    hist: torch.Tensor           # [n, N_BINS] long: firing tokens per bin of the fixed grid (bin_edges)
    top_value: torch.Tensor      # [n, n_top] descending; <= 0 where fewer contexts fire
    top_context: torch.Tensor    # [n, n_top] long, -1 where empty
    top_position: torch.Tensor   # [n, n_top] long
    top_acts: torch.Tensor       # [n, n_top, window]
    random_value: torch.Tensor   # [n, n_random] the context's max; random_context -1 where empty
    random_context: torch.Tensor
    random_position: torch.Tensor
    random_acts: torch.Tensor    # [n, n_random, window]
    sample_value: torch.Tensor   # [n, N_BINS, per_bin] firing tokens; sample_context -1 where empty
    sample_context: torch.Tensor
    sample_position: torch.Tensor
    sample_acts: torch.Tensor    # [n, N_BINS, per_bin, window]
    meta: dict = field(default_factory=dict)  # window (before, after) or None = whole context, timings, ...
    context_max: torch.Tensor | None = None  # [n_contexts, n] each context's max (mine(keep_context_max=True))

    @property
    def n_tokens(self) -> int:
        """Tokens the statistics are over: those mined, less the excluded ones (meta's n_kept, where recorded)."""
        return int(self.meta.get("n_kept", self.tokens.numel()))

    @property
    def n_directions(self) -> int:
        return int(self.count.shape[0])

    def frequency(self) -> torch.Tensor:
        """[n] share of tokens where each direction fires."""
        return self.count.double() / self.n_tokens

    @property
    def max(self) -> torch.Tensor:
        """[n] the largest activation seen (0 for a direction that never fired)."""
        return self.top_value[:, 0].clamp_min(0)

    def moments(self) -> dict[str, torch.Tensor]:
        """mean, var, skew (third standardised moment), kurtosis (fourth, excess: 0 for a normal) of each
        direction's activation over all tokens, zeros included; NaN where the variance is 0. [n] each, float64."""
        m1, m2, m3, m4 = (self.power_sums[:, i] / self.n_tokens for i in range(4))
        var = (m2 - m1 ** 2).clamp_min(0)
        c3 = m3 - 3 * m1 * m2 + 2 * m1 ** 3
        c4 = m4 - 4 * m1 * m3 + 6 * m1 ** 2 * m2 - 3 * m1 ** 4
        ok = var > 0
        nan = torch.full_like(var, math.nan)
        skew = torch.where(ok, c3 / var.clamp_min(1e-300) ** 1.5, nan)
        kurt = torch.where(ok, c4 / var.clamp_min(1e-300) ** 2 - 3, nan)
        return {"mean": m1, "var": var, "skew": skew, "kurtosis": kurt}

    def bin_edges(self, latent: int) -> torch.Tensor:
        """[N_BINS + 1] float64 edges of `hist[latent]`, 2^(LOWEST_OCTAVE + i / BINS_PER_OCTAVE) in activation units:
        one grid for every direction (bin 0 also holds all below, the last all above). ValueError: bad latent."""
        self._check(latent)
        return torch.pow(2.0, (torch.arange(N_BINS + 1, dtype=torch.float64) - _OFFSET) / BINS_PER_OCTAVE)

    def _check(self, latent: int) -> int:
        check_int(latent, "latent", 0, self.n_directions - 1, f" (an index into the {self.n_directions} directions)")
        return int(latent)

    def window_tokens(self, ctx: int, pos: int) -> tuple[list[int], int]:
        T = self.tokens.shape[1]
        if self.meta.get("window") is None:
            return self.tokens[ctx].tolist(), pos
        before, after = self.meta["window"]
        idx = torch.arange(pos - before, pos + after + 1)
        ok = (idx >= 0) & (idx < T)
        toks = torch.where(ok, self.tokens[ctx, idx.clamp(0, T - 1)].long(), torch.full_like(idx, -1))
        return toks.tolist(), before

    def _example(self, c: int, p: int, v: float, acts: list[float]) -> Example:
        toks, target = self.window_tokens(c, p)
        return Example(c, p, v, toks, acts, target)

    def _examples(self, value, context, position, acts, latent) -> list[Example]:
        return [self._example(c, p, v, a) for v, c, p, a in zip(value[latent].tolist(), context[latent].tolist(),
                                                                 position[latent].tolist(), acts[latent].tolist())
                if c >= 0]

    def top_examples(self, latent: int) -> list[Example]:
        """The contexts with the largest max activation, strongest first (fewer when fewer contexts fire)."""
        d = self._check(latent)
        return self._examples(self.top_value, self.top_context, self.top_position, self.top_acts, d)

    def random_examples(self, latent: int) -> list[Example]:
        """A seeded uniform sample of the contexts where the direction fires, each around its max."""
        d = self._check(latent)
        return self._examples(self.random_value, self.random_context, self.random_position, self.random_acts, d)

    def _quantile_picks(self, d: int, n_bins: int, per_bin: int, seed: int) -> list[tuple[float, float, list]]:
        """Per equal-width bin of (0, max]: (lo, hi, [(context, position, value, flat index into the sample slots)])."""
        top, g = float(self.max[d]), torch.Generator().manual_seed(seed)
        ctx, vals = self.sample_context[d], self.sample_value[d].flatten()
        weight = (self.hist[d].double() / (ctx >= 0).sum(-1).clamp_min(1)).unsqueeze(-1).expand_as(ctx).flatten()
        ctx = ctx.flatten()
        c, p, v = ctx.tolist(), self.sample_position[d].flatten().tolist(), vals.tolist()
        out = []
        for j in range(n_bins):
            lo, hi = top * j / n_bins, top * (j + 1) / n_bins
            idx = ((ctx >= 0) & (vals > lo) & (vals <= hi)).nonzero().squeeze(1)  # (lo, hi]: bins partition (0, max]
            if len(idx) > per_bin:
                idx = idx[torch.multinomial(weight[idx], per_bin, replacement=False, generator=g)]
            out.append((lo, hi, [(c[i], p[i], v[i], i) for i in idx.tolist()]))
        return out

    def quantile_locations(self, latent: int, n_bins: int = 10, per_bin: int = 5, seed: int = 0
                           ) -> list[tuple[float, float, list[tuple[int, int, float]]]]:
        """`n_bins` equal-width bins (lo, hi] between 0 and the max, each with up to `per_bin` firing tokens
        (context, position, value) drawn from the mining sample, each sampled token weighted by the number of firing
        tokens it stands for (its histogram bin's count over the samples kept there)."""
        return [(lo, hi, [pick[:3] for pick in picks])
                for lo, hi, picks in self._quantile_picks(self._check(latent), n_bins, per_bin, seed)]

    def quantile_examples(self, latent: int, n_bins: int = 10, per_bin: int = 5, seed: int = 0
                          ) -> list[tuple[float, float, list[Example]]]:
        """The same picks as `quantile_locations`, as Examples with the windows kept while mining."""
        d = self._check(latent)
        acts = self.sample_acts[d].flatten(0, 1)
        return [(lo, hi, [self._example(c, p, v, acts[i].tolist()) for c, p, v, i in picks])
                for lo, hi, picks in self._quantile_picks(d, n_bins, per_bin, seed)]


# ---------------------------------------------------------------------------------------------------- streaming

def _bottom_k(keys: torch.Tensor, payloads: list[torch.Tensor], groups: torch.Tensor, new_keys: torch.Tensor,
              new_payloads: list[torch.Tensor]) -> None:
    """Merge candidates into per-group tables keeping the k smallest keys (tables [G, k, ...], keys ascending per
    group, +inf = empty), in place; only the groups that received candidates are touched."""
    if not len(groups):
        return
    k = keys.shape[1]
    touched, u_new = torch.unique(groups, return_inverse=True)
    U = len(touched)
    all_u = torch.cat([torch.arange(U).repeat_interleave(k), u_new])
    all_k = torch.cat([keys[touched].flatten(), new_keys])
    order = torch.argsort(all_k, stable=True)
    order = order[torch.argsort(all_u[order], stable=True)]
    su = all_u[order]
    rank = torch.arange(len(su)) - torch.searchsorted(su, torch.arange(U))[su]
    m = rank < k
    sel, r_u, r_rank = order[m], su[m], rank[m]
    table = torch.full((U, k), math.inf, dtype=keys.dtype)
    table[r_u, r_rank] = all_k[sel]
    keys[touched] = table
    for old, new in zip(payloads, new_payloads):
        merged = torch.cat([old[touched].flatten(0, 1), new])
        t = torch.full((U, k, *old.shape[2:]), math.nan if old.is_floating_point() else -1, dtype=old.dtype)
        t[r_u, r_rank] = merged[sel]
        old[touched] = t


class _Stream:
    """The running state of one encoder's directions (see the module docstring)."""

    def __init__(self, n: int, n_top: int, n_random: int, per_bin: int, window: tuple[int, int] | None, T: int,
                 seed: int):
        self.n, self.n_top, self.window, self.T = n, n_top, window, T
        self.context_max: list[torch.Tensor] | None = None  # a list to keep each batch's [B, n] maxima
        self.seed = (seed & 0xFFFFFFFF, seed >> 32 & 0xFFFFFFFF)  # the seed as two 32-bit hash parts
        self.offsets = torch.arange(T) if window is None else torch.arange(-window[0], window[1] + 1)
        W = len(self.offsets)
        self.count = torch.zeros(n, dtype=torch.long)
        self.power = torch.zeros(4, n, dtype=torch.float64)
        self.hist = torch.zeros(n * N_BINS, dtype=torch.long)
        self.top_v = torch.full((n_top, n), -1.0)
        self.top_c = torch.full((n_top, n), -1, dtype=torch.long)
        self.top_p = torch.zeros((n_top, n), dtype=torch.long)
        self.top_a = torch.full((n_top, n, W), math.nan)
        self.rnd_key = torch.full((n, n_random), math.inf, dtype=torch.float64)
        self.rnd = [torch.full((n, n_random), -1.0), torch.full((n, n_random), -1, dtype=torch.long),
                    torch.zeros((n, n_random), dtype=torch.long), torch.full((n, n_random, W), math.nan)]
        self.smp_key = torch.full((n * N_BINS, per_bin), math.inf, dtype=torch.float64)
        self.smp = [torch.full((n * N_BINS, per_bin), -1.0), torch.full((n * N_BINS, per_bin), -1, dtype=torch.long),
                    torch.zeros((n * N_BINS, per_bin), dtype=torch.long),
                    torch.full((n * N_BINS, per_bin, W), math.nan)]

    def _windows(self, A: torch.Tensor, b: torch.Tensor, p: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        """[m, W] activations of direction f[i] in context b[i] at the window around position p[i]."""
        pos = self.offsets.expand(len(b), -1) if self.window is None else p[:, None] + self.offsets[None]
        ok = (pos >= 0) & (pos < self.T)
        w = A[b[:, None], pos.clamp(0, self.T - 1), f[:, None]]
        return torch.where(ok, w, torch.full_like(w, math.nan))

    def update(self, A: torch.Tensor, c0: int) -> None:
        """A [B, T, n] non-negative activations of contexts c0 .. c0 + B - 1 (global indices: the keys hash them)."""
        B, T, n = A.shape
        flat = A.reshape(-1, n)
        rows, f = flat.nonzero(as_tuple=True)
        v = flat[rows, f]
        self.count += torch.bincount(f, minlength=n)
        vd = v.double()
        for i in range(4):
            self.power[i] += torch.bincount(f, weights=vd ** (i + 1), minlength=n)
        # log2 in float64: a value one float32 step off a bin edge stays on its own side
        g = f * N_BINS + (vd.log2() * BINS_PER_OCTAVE).floor().clamp_(-_OFFSET, N_BINS - 1 - _OFFSET).long() + _OFFSET
        self.hist += torch.bincount(g, minlength=n * N_BINS)
        if self.smp_key.shape[1]:  # per_bin=0: no quantile samples (notebook 07 reads top and random ones only)
            keys = _keys(0, *self.seed, c0 + rows // T, rows % T, f)  # the token's: (context, position, direction)
            keep = keys < self.smp_key[g, -1]
            r = rows[keep]
            _bottom_k(self.smp_key, self.smp, g[keep], keys[keep],
                      [v[keep], c0 + r // T, r % T, self._windows(A, r // T, r % T, f[keep])])

        cmax, carg = A.max(dim=1)  # [B, n]: each context's max and where it is
        if self.context_max is not None:
            self.context_max.append(cmax)
        cand = torch.where(cmax > 0, cmax, torch.full_like(cmax, -1.0))
        # stable over (kept, then this batch in order): ties go to the lower context index, whatever the batch size
        vals, sel = torch.cat([self.top_v, cand]).sort(dim=0, descending=True, stable=True)
        vals, sel = vals[:self.n_top], sel[:self.n_top]
        new, old, b_new = sel >= self.n_top, sel.clamp(max=self.n_top - 1), (sel - self.n_top).clamp(min=0)
        self.top_c = torch.where(new, c0 + b_new, self.top_c.gather(0, old))
        self.top_p = torch.where(new, carg.gather(0, b_new), self.top_p.gather(0, old))
        acts = self.top_a.gather(0, old.unsqueeze(-1).expand(-1, -1, self.top_a.shape[-1]))
        j, ff = new.nonzero(as_tuple=True)
        bb = sel[j, ff] - self.n_top
        acts[j, ff] = self._windows(A, bb, carg[bb, ff], ff)
        self.top_v, self.top_a = vals, acts

        ckeys = _keys(1, *self.seed, torch.arange(c0, c0 + B)[:, None], torch.arange(n))  # [B, n]: the context's
        ok = (cmax > 0) & (ckeys < self.rnd_key[:, -1].unsqueeze(0))
        bb, ff = ok.nonzero(as_tuple=True)
        pp = carg[bb, ff]
        _bottom_k(self.rnd_key, self.rnd, ff, ckeys[bb, ff], [cmax[bb, ff], c0 + bb, pp, self._windows(A, bb, pp, ff)])

    def result(self, tokens: torch.Tensor, meta: dict) -> Mined:
        n = self.n
        top_c = torch.where(self.top_v > 0, self.top_c, torch.full_like(self.top_c, -1))
        return Mined(tokens, self.count, self.power.T.contiguous(), self.hist.view(n, N_BINS),
                     self.top_v.T.contiguous(), top_c.T.contiguous(), self.top_p.T.contiguous(),
                     self.top_a.transpose(0, 1).contiguous(), *(t.contiguous() for t in self.rnd),
                     *(t.view(n, N_BINS, *t.shape[1:]) for t in self.smp), meta=dict(meta),
                     context_max=torch.cat(self.context_max) if self.context_max is not None else None)


@checked
@torch.no_grad()
def mine(read: Callable[[torch.Tensor], Mapping[str, torch.Tensor]],
         encoders: Mapping[str, tuple[str, Callable[[torch.Tensor], torch.Tensor]]], tokens: torch.Tensor, *,
         batch_size: int = 32, n_top: int = 20, n_random: int = 5, per_bin: int = 4,
         window: tuple[int, int] | None = (12, 4), seed: int = 0, exclude: Exclusion | None = None,
         progress: bool = True, keep_context_max: bool = False) -> dict[str, Mined]:
    """Stream `tokens` [n_contexts, ctx_len] through `read` (tokens [B, T] -> {hook: activations [B, T, d]}, e.g.
    `lm.hook_reader`, one forward pass for every hook) and every encoder {name: (hook, activations [rows, d] ->
    non-negative direction activations [rows, n])} in batches of `batch_size` contexts; return {name: Mined}.

    exclude: rows left out of the dictionaries' inputs (`activations.Exclusion`, its norm limit applied at each
    encoder's hook): their activations count as 0 and statistics are over the kept tokens (meta n_kept). window:
    (tokens before, tokens after) kept around an example's max, or None for the whole context. keep_context_max:
    also keep every context's max per direction (`Mined.context_max`, e.g. to draw contexts where a direction is
    0). Seeded: the same
    contexts give the same result whatever the batch size. meta records the format and the seconds spent reading,
    encoding and keeping statistics. Raises ValueError for non-integer tokens, no encoders or negative activations."""
    for value, name in ((batch_size, "batch_size"), (n_top, "n_top"), (n_random, "n_random")):
        check_int(value, name, 1)
    check_int(per_bin, "per_bin", 0)
    if not isinstance(tokens, torch.Tensor) or tokens.ndim != 2 or tokens.dtype.is_floating_point:
        raise ValueError(f"tokens must be integer token ids [n_contexts, ctx_len], got "
                         f"{tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__}")
    if not encoders:
        raise ValueError("encoders is empty: give at least one {name: activations -> direction activations}")
    N, T = tokens.shape
    streams: dict[str, _Stream] = {}
    clock = {"read_seconds": 0.0, "encode_seconds": 0.0, "keep_seconds": 0.0}
    n_kept = dict.fromkeys(encoders, 0)  # frequencies and moments are over the kept tokens only
    for c0 in tqdm(range(0, N, batch_size), desc="mining", unit="batch", disable=not progress):
        t0 = time.perf_counter()
        xs = read(tokens[c0:c0 + batch_size])
        clock["read_seconds"] += time.perf_counter() - t0
        for name, (hook, encode) in encoders.items():
            x = xs[hook]
            t1 = time.perf_counter()
            kept = exclude.keep(tokens[c0:c0 + batch_size], x, hook)[..., None].float().cpu() if exclude else 1.0
            n_kept[name] += int(kept.sum()) if exclude else x.shape[0] * T
            a = encode(x.reshape(x.shape[0] * T, -1)).float().reshape(x.shape[0], T, -1).cpu() * kept
            t2 = time.perf_counter()
            if name not in streams:
                streams[name] = _Stream(a.shape[-1], n_top, n_random, per_bin, window, T, seed)
                streams[name].context_max = [] if keep_context_max else None
            if bool((a < 0).any()):
                raise ValueError(f"encoder {name!r} gave negative activations; pass non-negative ones (split a "
                                 f"signed direction into its positive and negative halves)")
            streams[name].update(a, c0)
            clock["encode_seconds"] += t2 - t1
            clock["keep_seconds"] += time.perf_counter() - t2
    meta = {"format": FORMAT, "window": list(window) if window is not None else None, "n_top": n_top,
            "n_random": n_random, "per_bin": per_bin, "seed": seed, "batch_size": batch_size, **clock}
    return {name: s.result(tokens, {**meta, "n_kept": n_kept[name]}) for name, s in streams.items()}
