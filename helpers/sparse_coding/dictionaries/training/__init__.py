"""Training ensembles of SAEs: the loop and its parts (batch sources, schedules, resampling, saved state), and the
multi-process runner."""

from .loop import train_sae
from .optim import SAEAdam, adam, param_state
from .resample import member_generators, resample_dead_
from .schedules import Schedules, coef_factor, log_spaced_steps, lr_factor, sparsity_key, tracking_schedule
from .settings import TrainSettings
from .sources import BatchSource, default_input_scale, estimate_input_scale
from .state import (TrainingDiverged, TrainingState, load_decoder_trajectory, load_snapshot, load_state,
                    snapshot_path, snapshot_steps)

__all__ = ["train_sae", "TrainSettings", "default_input_scale", "member_generators", "resample_dead_", "Schedules", "coef_factor", "log_spaced_steps",
           "lr_factor", "sparsity_key", "BatchSource", "estimate_input_scale", "TrainingDiverged", "TrainingState",
           "adam", "SAEAdam", "param_state", "load_decoder_trajectory", "load_snapshot", "load_state", "snapshot_path",
           "snapshot_steps", "tracking_schedule"]
