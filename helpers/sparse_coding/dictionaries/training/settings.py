"""One object for how an SAE is trained: `TrainSettings`, checked once when it is built, passed unchanged from a
notebook through a sweep to `train_sae`, written whole into the sweep's settings and the resumable state, and what a
resume compares. `train_sae(sae, x, steps=..., lr=...)` keeps its keyword arguments as a way in: they build one.

Defaults and where they come from: Adam lr 1e-3 and betas (0.9, 0.999) (Kingma & Ba; SAELens's defaults), batches of
4096 tokens (SAELens's `train_batch_size_tokens`), the lr decayed over the last 20 % of steps when `decay` is set
(Bricken et al. 2023, "Towards Monosemanticity"; Conerly et al. 2024), a dead window of a tenth of the run's tokens
up to Gao et al. 2024's 10M (arXiv 2406.04093), input scaled so that E‖s·x‖² = d_in (Conerly et al. 2024)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

from ...arguments import checked
from ...checks import check_choice, check_int, check_number, check_positive, check_seed


# What a training run preserves (TrainSettings.loss), and the fields only the e2e modes read.
LOSSES = ("local", "e2e", "e2e+ds")
E2E_FIELDS = ("loss", "kl_coef", "downstream_coef")


@checked
@dataclass(frozen=True)
class TrainSettings:
    """How `train_sae` trains. Units: steps are optimizer steps, windows and batch sizes are tokens (rows).

    steps: optimizer steps (each on one batch).
    lr: Adam's learning rate (peak, before warmup and decay).
    betas: Adam's two decay rates (b1, b2), each in [0, 1).
    batch_size: rows (tokens) per step; None: min(4096, the source's rows) for a tensor or store, else the batch given.
    seed: draws the batches of a tensor source, the store's epoch order and the resampling RNG.
    log_every: steps between log rows (the last step is always logged).
    dead_window: tokens without firing before a latent counts as dead (the dead_frac column, TopK's AuxK); None keeps
        the SAE's own, else a tenth of the run's tokens (at least one batch, at most 10M).
    warmup_steps: linear lr warmup from 0 over this many steps.
    decay: None, "linear" or "cosine": the lr decays to 0 over the last `decay_frac` of the steps.
    decay_frac: the share of the steps that decay, in (0, 1].
    coef_warmup_steps: the sparsity coefficient ramps up linearly over this many steps (Conerly et al. 2024).
    input_scale: a positive number, or "auto": for a new SAE, E‖s·x‖² = d_in estimated from the source
        (`estimate_input_scale`); for one with weights (trained or loaded), the scale they work at (see train_sae).
    resample_every: resample dead latents every so many steps (None: never), while step < resample_until · steps.
    resample_until: the share of the run during which resampling happens, in [0, 1].
    snapshot_steps: with a state_dir, the steps whose weights are kept: "log" (0, 1, 2, 4, ..., steps), a list, None.
    state_every: with a state_dir, write the resumable state every so many steps (None: at snapshots and the end).
    loss: what the SAE is trained to preserve (Braun et al. 2024, arXiv 2405.12241): "local" (the MSE at its own
        hook, from activations), "e2e" (the KL divergence of the model's output distribution with the reconstruction
        spliced in from the clean one, from token contexts through the frozen model) or "e2e+ds" (e2e plus the MSE
        at every later layer). The kind's sparsity term is added in every mode. See `training.e2e`.
    kl_coef: e2e modes: weight of the KL term (nats per token, times d_in; the paper's logits_kl coeff).
    downstream_coef: "e2e+ds": weight of the mean over later layers of their per-dimension MSE in the SAE's input
        units (times d_in; the paper's in_to_orig total_coeff, split evenly over the layers).

    Raises ValueError naming the field and what it must be, when built."""

    steps: int = 2000
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    batch_size: int | None = None
    seed: int = 0
    log_every: int = 50
    dead_window: int | None = None
    warmup_steps: int = 0
    decay: str | None = None
    decay_frac: float = 0.2
    coef_warmup_steps: int = 0
    input_scale: float | str = "auto"
    resample_every: int | None = None
    resample_until: float = 0.5
    snapshot_steps: str | tuple[int, ...] | None = "log"
    state_every: int | None = None
    loss: str = "local"
    kl_coef: float = 1.0
    downstream_coef: float = 2.5

    def __post_init__(self) -> None:
        # Each checked value is stored as the plain int / float the check returns: a numpy scalar (a seed from
        # np.arange, an lr from np.logspace) would otherwise make to_json() unwritable by json.
        ints = {"steps": (1, " (optimizer steps)"), "log_every": (1, " (steps between log rows)"),
                "warmup_steps": (0, ""), "coef_warmup_steps": (0, "")}
        for name, (low, hint) in ints.items():
            self._set(name, check_int(getattr(self, name), name, low, hint=hint))
        self._set("lr", check_positive(self.lr, "lr"))
        betas = self.betas
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"betas must be Adam's two decay rates (b1, b2) in [0, 1), got {betas!r}")
        self._set("betas", tuple(check_number(b, f"betas[{i}]", low=0, high=1, high_open=True,
                                              hint=" (an Adam decay rate)") for i, b in enumerate(betas)))
        self._set("seed", check_seed(self.seed))
        for name in ("dead_window", "resample_every", "state_every", "batch_size"):
            if getattr(self, name) is not None:
                self._set(name, check_int(getattr(self, name), name, 1, hint=" or None"))
        check_choice(self.decay, "decay", (None, "linear", "cosine"))
        self._set("decay_frac", check_number(self.decay_frac, "decay_frac", low=0, high=1, low_open=True,
                                             hint=" (share of the steps decaying)"))
        if self.input_scale != "auto":
            self._set("input_scale", check_positive(self.input_scale, "input_scale",
                                                    " (see estimate_input_scale) or 'auto'"))
        self._set("resample_until", check_number(self.resample_until, "resample_until", low=0, high=1,
                                                 hint=" (share of the run resampling)"))
        check_choice(self.loss, "loss", LOSSES)
        self._set("kl_coef", check_positive(self.kl_coef, "kl_coef"))
        self._set("downstream_coef", check_number(self.downstream_coef, "downstream_coef", low=0,
                                                  hint=" (0 leaves the later layers out)"))
        snap = self.snapshot_steps
        if snap is not None and not (isinstance(snap, str) and snap == "log"):
            if isinstance(snap, str) or not isinstance(snap, (list, tuple, range)):
                raise ValueError(f"snapshot_steps must be 'log', a list of step counts in [0, steps] or None, got "
                                 f"{snap!r}")
            bad = [s for s in snap if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s <= self.steps]
            if bad:
                raise ValueError(f"snapshot_steps must be ints in [0, steps={self.steps}] (steps completed), got "
                                 f"{bad}")
            object.__setattr__(self, "snapshot_steps", tuple(int(s) for s in snap))

    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)

    @classmethod
    def build(cls, settings: "TrainSettings | None" = None, **overrides: Any) -> "TrainSettings":
        """`settings` (default: the defaults) with `overrides` applied, checked. Raises ValueError naming an unknown
        field (a misspelt keyword would otherwise be ignored)."""
        if settings is not None and not isinstance(settings, cls):
            raise ValueError(f"settings must be a TrainSettings, got {type(settings).__name__}; build one with "
                             f"TrainSettings(steps=..., lr=...) or pass the fields as keywords")
        unknown = sorted(set(overrides) - cls.fields())
        if unknown:
            raise ValueError(f"unknown training setting(s) {unknown}; the fields are {sorted(cls.fields())}")
        return dataclasses.replace(settings or cls(), **overrides)

    @classmethod
    def fields(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    def to_json(self) -> dict[str, Any]:
        """Every field, JSON-ready (tuples as lists): what a sweep's settings and the training state record."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}

    def resume_key(self) -> dict[str, Any]:
        """The fields a resumed run must share with the run it continues (where and how often the state is
        written may change between the two). A local run leaves out the e2e fields, which it does not read, so
        that states and sweeps saved before e2e modes existed stay valid."""
        skip = {"state_every", "snapshot_steps"} | (set(E2E_FIELDS) if self.loss == "local" else set())
        return {k: v for k, v in self.to_json().items() if k not in skip}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "TrainSettings":
        """Inverse of `to_json`; unknown keys raise ValueError naming them."""
        return cls.build(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in obj.items()})


def snapshot_set(settings: TrainSettings, log_spaced: Sequence[int]) -> set[int]:
    """The steps whose weights a run with `settings` keeps (log_spaced: the "log" steps for its length)."""
    snap = settings.snapshot_steps
    if snap is None:
        return set()
    return set(log_spaced) if snap == "log" else set(snap)
