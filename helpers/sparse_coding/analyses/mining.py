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

import numpy as np
import torch
from tqdm.auto import tqdm

from ..activations import Exclusion
from ..arguments import checked
from ..checks import check_int
# the grid's constants live beside the stream that bins with them; imported from here by users and tests
from .mining_sources import RowPicks, checked_picks
from .mining_stream import BINS_PER_OCTAVE, HIGHEST_OCTAVE, LOWEST_OCTAVE, N_BINS, _OFFSET, Stream  # noqa: F401

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


def _draw(weight: np.ndarray, n: int, g: torch.Generator) -> list[int]:
    """torch.multinomial(weight, n, replacement=False, generator=g) for float64 weights, drawn alike (one
    exponential per weight from g, then the n largest weight / exponential, largest first): the same picks and the
    same state of g afterwards (tests/analyses/test_mining_order.py), with one torch call instead of three."""
    q = torch.empty(len(weight), dtype=torch.float64).exponential_(1, generator=g).numpy()
    return np.argsort(-(weight / q), kind="stable")[:n].tolist()


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
    _rows: dict = field(default_factory=dict, init=False, repr=False, compare=False)  # window_tokens' cache

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
        row = self._rows.get(ctx)
        if row is None:  # each context's tokens as a list once: a dashboard builds tens of thousands of examples
            row = self._rows[ctx] = self.tokens[ctx].tolist()
        if self.meta.get("window") is None:
            return list(row), pos
        before, after = self.meta["window"]
        return [row[i] if 0 <= i < len(row) else -1 for i in range(pos - before, pos + after + 1)], before

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
        check_int(n_bins, "n_bins", 1)
        check_int(per_bin, "per_bin", 1)
        top, g = max(float(self.top_value[d, 0]), 0.0), torch.Generator().manual_seed(seed)
        # numpy for these small gathers: a torch op may start a parallel region, and with OpenMP's passive wait
        # policy (sparse_coding.threads) waking the other thread costs more than the gather
        ctx = self.sample_context[d].numpy()
        K = ctx.shape[-1]
        flat = ctx.ravel()
        have = np.flatnonzero(flat >= 0)  # the filled slots (most are empty), ascending
        slots, c = have.tolist(), flat[have].tolist()
        values = self.sample_value[d].numpy().ravel()[have]
        p, v = self.sample_position[d].numpy().ravel()[have].tolist(), values.tolist()
        edges = [top * j / n_bins for j in range(n_bins + 1)]
        # compared as torch compares a float32 tensor with a Python float: the bound rounded to float32 first
        e32 = np.array(edges, dtype=np.float64).astype(np.float32)
        at = np.searchsorted(e32, values, side="left") - 1  # (lo, hi]: the bin whose upper edge is the first >= x
        at[(at < 0) | (at >= n_bins) | (e32[np.clip(at, 0, n_bins)] >= values)] = -1  # outside (0, max]
        order = np.argsort(at, kind="stable")  # the slots of each bin together, ascending within it
        ends = np.cumsum(np.bincount(at + 1, minlength=n_bins + 1)).tolist()
        order = order.tolist()
        hist = None
        out = []
        for j in range(n_bins):
            idx = order[ends[j]:ends[j + 1]]
            if len(idx) > per_bin:
                if hist is None:  # each slot stands for its histogram bin's count over the slots filled there
                    hist, filled = self.hist[d].tolist(), (ctx >= 0).sum(-1).tolist()  # per histogram bin
                weight = np.array([hist[slots[k] // K] / max(filled[slots[k] // K], 1) for k in idx])
                idx = [idx[k] for k in _draw(weight, per_bin, g)]
            out.append((edges[j], edges[j + 1], [(c[k], p[k], v[k], slots[k]) for k in idx]))
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
        bins = self._quantile_picks(d, n_bins, per_bin, seed)
        rows = [i for _, _, picks in bins for *_, i in picks]
        acts = iter(self.sample_acts[d].flatten(0, 1).numpy()[rows].tolist())  # one gather and conversion
        return [(lo, hi, [self._example(c, p, v, next(acts)) for c, p, v, _ in picks]) for lo, hi, picks in bins]


@checked
@torch.no_grad()
def mine(read: Callable[[torch.Tensor], Mapping[str, torch.Tensor]],
         encoders: Mapping[str, tuple[str, Callable[[torch.Tensor], torch.Tensor]]], tokens: torch.Tensor, *,
         batch_size: int = 32, n_top: int = 20, n_random: int = 5, per_bin: int = 4,
         window: tuple[int, int] | None = (12, 4), seed: int = 0, exclude: Exclusion | None = None,
         progress: bool = True, keep_context_max: bool = False) -> dict[str, Mined]:
    """Stream `tokens` [n_contexts, ctx_len] through `read` (tokens [B, T] -> {hook: activations [B, T, d]}, e.g.
    `lm.hook_reader`, one forward pass for every hook) and every encoder {name: (hook, activations [rows, d] ->
    non-negative direction activations [rows, n], or each row's picks as `RowPicks`)} in batches of `batch_size`
    contexts; return {name: Mined}. The two forms of the codes give the same result.

    exclude: rows left out of the dictionaries' inputs (`activations.Exclusion`, its norm limit applied at each
    encoder's hook): their activations count as 0 and statistics are over the kept tokens (meta n_kept). window:
    (tokens before, tokens after) kept around an example's max, or None for the whole context. keep_context_max:
    also keep every context's max per direction (`Mined.context_max`, e.g. to draw contexts where a direction is
    0). Seeded: the same
    contexts give the same result whatever the batch size. meta records the format and the seconds spent reading,
    encoding and keeping statistics. Raises ValueError for non-integer tokens, no encoders or negative or non-finite
    (NaN, inf) activations."""
    for value, name in ((batch_size, "batch_size"), (n_top, "n_top"), (n_random, "n_random")):
        check_int(value, name, 1)
    check_int(per_bin, "per_bin", 0)
    if window is not None:
        if len(window) != 2:
            raise ValueError(f"window must be (tokens before, tokens after) or None for whole contexts, got {window!r}")
        for w, part in zip(window, ("before", "after")):
            check_int(w, f"window's tokens {part}", 0, hint=" (window = (tokens before, tokens after))")
    if not isinstance(tokens, torch.Tensor) or tokens.ndim != 2 or tokens.dtype.is_floating_point:
        raise ValueError(f"tokens must be integer token ids [n_contexts, ctx_len], got "
                         f"{tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__}")
    if not encoders:
        raise ValueError("encoders is empty: give at least one {name: activations -> direction activations}")
    N, T = tokens.shape
    streams: dict[str, Stream] = {}
    clock = {"read_seconds": 0.0, "encode_seconds": 0.0, "keep_seconds": 0.0}
    n_kept = dict.fromkeys(encoders, 0)  # frequencies and moments are over the kept tokens only
    for c0 in tqdm(range(0, N, batch_size), desc="mining", unit="batch", disable=not progress):
        t0 = time.perf_counter()
        xs = read(tokens[c0:c0 + batch_size])
        clock["read_seconds"] += time.perf_counter() - t0
        for name, (hook, encode) in encoders.items():
            x = xs[hook]
            t1 = time.perf_counter()
            a = encode(x.reshape(x.shape[0] * T, -1))
            if isinstance(a, RowPicks):
                a = checked_picks(a, x.shape[0] * T, name, distinct=name not in streams)
                a = RowPicks(a.values.view(x.shape[0], T, -1), a.latents.view(x.shape[0], T, -1), a.n)
            else:
                a = a.float().reshape(x.shape[0], T, -1).cpu()
            if exclude:  # (without, no `* 1.0`: a copy of the codes per batch for nothing)
                kept = exclude.keep(tokens[c0:c0 + batch_size], x, hook)[..., None].float().cpu()
                a = RowPicks(a.values * kept, a.latents, a.n) if isinstance(a, RowPicks) else a * kept
            n_kept[name] += int(kept.sum()) if exclude else x.shape[0] * T
            t2 = time.perf_counter()
            if name not in streams:
                n = a.n if isinstance(a, RowPicks) else a.shape[-1]
                streams[name] = Stream(n, n_top, n_random, per_bin, window, T, seed, name, keep_context_max)
            streams[name].update(a, c0)  # ValueError for negative or non-finite activations
            clock["encode_seconds"] += t2 - t1
            clock["keep_seconds"] += time.perf_counter() - t2
    meta = {"format": FORMAT, "window": list(window) if window is not None else None, "n_top": n_top,
            "n_random": n_random, "per_bin": per_bin, "seed": seed, "batch_size": batch_size, **clock}
    out = {}
    for name, s in streams.items():
        tensors, context_max = s.result()
        out[name] = Mined(tokens, *tensors, meta={**meta, "n_kept": n_kept[name]}, context_max=context_max)
    return out
