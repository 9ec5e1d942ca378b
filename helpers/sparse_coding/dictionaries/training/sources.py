"""Where training batches come from: one callable step -> [B, d_in] over every accepted source, with what a resume
needs to continue the stream exactly, and the input scale that normalises it."""

from __future__ import annotations

import itertools
import math
import os
from typing import Any, Callable, Iterable, Iterator

import torch

from ...arguments import checked
from ...activations.store import ActivationStore, row_order
from ...checks import check_int

Batches = Iterable[torch.Tensor] | Callable[[int], torch.Tensor] | torch.Tensor | ActivationStore


# Rows per batch when a dataset tensor or a store is given without batch_size (SAELens's default, in tokens).
DEFAULT_BATCH_SIZE = 4096


class BatchSource:
    """`source(step)` -> the batch [B, d_in] of that step, for any of:

    - a dataset tensor [rows, d_in]: rows sampled with the training seed and batch_size (default
      min(DEFAULT_BATCH_SIZE, rows); a rerun sees the same);
    - an ActivationStore (batch_size by default as for a tensor): shuffled as `store.batches(batch_size, seed,
      drop_last=True)`, epoch after epoch (`activations.row_order`), so any step's batch is computable directly and a
      resume needs only the step;
    - a callable step -> batch (must be a pure function of the step for a resume to equal an uninterrupted run);
    - an iterable of batches (replayed from its start on resume).
    `state()` / `restore(state, step)` carry what a resume needs."""

    def __init__(self, batches: Any, batch_size: int | None, seed: int):
        self.kind = "iterable"
        self.gen: torch.Generator | None = None
        self.it: Iterator[torch.Tensor] | None = None
        if isinstance(batches, (str, os.PathLike)):
            raise ValueError(f"batches is a path ({str(batches)!r}), not activations: open a harvest folder with "
                             f"activations.ActivationStore(path) and pass the store (or pass a tensor [rows, d_in])")
        if isinstance(batches, torch.Tensor):
            if batches.ndim != 2:
                raise ValueError(f"batches as a tensor must be a dataset [rows, d_in], got shape "
                                 f"{tuple(batches.shape)}")
            if batches.shape[0] == 0:
                raise ValueError(f"batches is an empty dataset (shape {tuple(batches.shape)}): give at least one row")
            if not batches.is_floating_point():
                raise ValueError(f"batches must hold floating-point activations, got {batches.dtype}; convert "
                                 f"with .float()")
            if batch_size is None:
                batch_size = min(DEFAULT_BATCH_SIZE, batches.shape[0])
            self.kind, self.data, self.batch_size = "tensor", batches, batch_size
            self.gen = torch.Generator(device="cpu").manual_seed(seed)
        elif isinstance(batches, ActivationStore):
            if batch_size is None:
                batch_size = min(DEFAULT_BATCH_SIZE, batches.n_tokens)
            if batch_size > batches.n_tokens:
                raise ValueError(f"batch_size={batch_size} exceeds the store's {batches.n_tokens} rows; lower it")
            self.kind, self.store, self.batch_size, self.seed = "store", batches, batch_size, seed
            self.per_epoch = batches.n_tokens // batch_size
            self._perm_epoch, self._perm = -1, None
        elif callable(batches):
            self.kind, self.fn = "callable", batches
        else:
            try:
                self.it = iter(batches)
            except TypeError:
                raise ValueError(f"batches must be a dataset tensor, an ActivationStore, a callable step -> batch "
                                 f"or an iterable of batches, got {type(batches).__name__}") from None

    @property
    def width(self) -> int | None:
        """The batches' width (d_in) where it is known without reading one: a dataset tensor's or a store's."""
        if self.kind == "tensor":
            return int(self.data.shape[1])
        return int(self.store.d) if self.kind == "store" else None

    def __call__(self, step: int) -> torch.Tensor:
        if self.kind == "tensor":
            return self.data[torch.randint(len(self.data), (self.batch_size,), generator=self.gen)]
        if self.kind == "store":
            epoch, i = divmod(step, self.per_epoch)
            if epoch != self._perm_epoch:
                self._perm, self._perm_epoch = row_order(self.store.n_tokens, self.seed, epoch), epoch
            return self.store.rows(self._perm[i * self.batch_size:(i + 1) * self.batch_size])
        if self.kind == "callable":
            try:
                return self.fn(step)
            except (IndexError, KeyError, StopIteration) as e:
                # a callable over a precomputed stream (`lambda step: stream[step]`) ends like an iterable does
                raise ValueError(f"batches({step}) raised {type(e).__name__}: {e}; a callable source must give a "
                                 f"batch for every step 0..steps-1 (lower steps, or give a longer stream)") from e
        try:
            return next(self.it)
        except StopIteration:
            raise ValueError(f"batches ran out after {step} steps; give at least `steps` batches or a callable "
                             "step -> batch") from None

    def estimate_scale(self, seed: int) -> float:
        """The input scale of this source (`default_input_scale`) without disturbing the stream: a dataset tensor,
        store or callable is sampled apart; an iterable's first batch is read and put back."""
        if self.kind != "iterable":
            src = {"tensor": getattr(self, "data", None), "store": getattr(self, "store", None),
                   "callable": getattr(self, "fn", None)}[self.kind]
            return default_input_scale(src, seed)
        first = next(self.it, None)
        if first is None:
            raise ValueError("batches is an empty iterable; give at least one batch")
        self.it = itertools.chain([first], self.it)
        return estimate_input_scale([first], n_batches=1)

    def state(self) -> dict[str, torch.Tensor]:
        return {"rng.data": self.gen.get_state()} if self.gen is not None else {}

    def restore(self, tensors: dict[str, torch.Tensor], step: int) -> None:
        if self.gen is not None:
            self.gen.set_state(tensors["rng.data"])
        elif self.kind == "iterable":
            # An iterable cannot seek: replay it. Correct for any iterable that yields the same batches when
            # created again (a list, store.batches(...) with the same seed, ToyData.batches(...)).
            for s in range(step):
                self(s)


@checked
def default_input_scale(batches: Batches, seed: int = 0) -> float:
    """The one input-scale estimate every trainer uses for input_scale="auto" (train_sae, sweeps, distributed
    runs): `estimate_input_scale` over 16 batches of 4096 rows drawn with the run's seed (E‖s·x‖² = d_in; Conerly
    et al. 2024), so SAE hyperparameters mean the same at every layer and on every model."""
    return estimate_input_scale(batches, n_batches=16, batch_size=DEFAULT_BATCH_SIZE, seed=seed)


@checked
@torch.no_grad()
def estimate_input_scale(batches: Batches, n_batches: int = 16, batch_size: int | None = None, seed: int = 0
                         ) -> float:
    """s with E‖s·x‖² = d_in, from `n_batches` batches of the source (a dataset tensor or an ActivationStore,
    sampled with `seed` and `batch_size`, default 4096; a callable, called for steps 0..n-1; an iterable, its first
    batches; a callable or iterable that ends sooner, those it gives). `train_sae(input_scale="auto")` calls it
    through `default_input_scale`. Raises ValueError when the inputs are all zero or not finite, or the batches
    differ in width."""
    check_int(n_batches, "n_batches", 1)
    if isinstance(batches, (torch.Tensor, ActivationStore)):
        # an estimate needs no more rows than there are: a small store is read whole rather than refused
        rows_there = batches.shape[0] if isinstance(batches, torch.Tensor) else batches.n_tokens
        batch_size = min(batch_size or DEFAULT_BATCH_SIZE, rows_there)
    src = BatchSource(batches, batch_size, seed + 7919)  # not the training stream's generator
    total, rows, d = 0.0, 0, None
    for step in range(n_batches):
        try:
            x = src(step)
        except ValueError:
            if rows:
                break  # a short iterable: what it had is the estimate
            raise
        if not isinstance(x, torch.Tensor) or x.ndim != 2:
            raise ValueError(f"batch {step} must be a [batch, d_in] tensor")
        if d is not None and x.shape[1] != d:
            raise ValueError(f"batch {step} has width {x.shape[1]} but the batches before have d_in={d}: every "
                             f"batch must be [batch, d_in] of one hook's activations")
        total += float(x.double().pow(2).sum())
        rows, d = rows + x.shape[0], x.shape[1]
    if rows == 0:
        raise ValueError("batches gave 0 rows: give batches of at least one row, [batch >= 1, d_in]")
    mean_sq = total / rows
    if not math.isfinite(mean_sq) or mean_sq <= 0:
        raise ValueError(f"mean squared norm of the inputs is {mean_sq!r}: the activations are all zero or contain "
                         "NaN/inf; clean them before estimating the scale")
    return math.sqrt(d / mean_sq)
