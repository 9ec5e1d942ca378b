"""Stage 4, dictionaries: SAE kinds as batched ensembles (one file each, registered), the factory, classical
baselines (PCA, ICA, K-SVD), SAELens-layout files, training, and sweeps on harvested activations."""

from .base import DEFAULT_DEAD_WINDOW, SAE_KINDS, EnsembleSAE, SAEOutput, fold_input_scale, register_sae
from .baselines import ica_dictionary, ksvd_dictionary, online_dictionary, pca_dictionary
from .factory import make_sae
from .kinds import BatchTopKSAE, JumpReLUSAE, ReLUBiasDecaySAE, ReLUSAE, TopKSAE
from .metrics import FVU
from .saelens_io import load_sae, load_sweep, member_name, save_sae, save_sweep, sweep_info
from .sweep import (LMSweep, state_dir, store_metadata, sweep_dir, sweep_name, train_lm_sweep,
                    train_revision_sae, reference_dictionary, dictionary_seed, sweep_settings)
from .sweep_e2e import e2e_sweep_dir, train_e2e_sweep
from .training import TrainingDiverged, TrainSettings, default_input_scale, estimate_input_scale, train_sae
from .training.distributed import train_distributed
from .training.e2e import downstream_hooks
from .training.settings import LOSSES
from .training.schedules import tracking_schedule
from .training.state import load_decoder_trajectory, load_snapshot, snapshot_steps

__all__ = ["DEFAULT_DEAD_WINDOW", "SAE_KINDS", "EnsembleSAE", "SAEOutput", "fold_input_scale", "register_sae",
           "make_sae", "BatchTopKSAE", "JumpReLUSAE", "ReLUBiasDecaySAE", "ReLUSAE", "TopKSAE", "FVU", "load_sae",
           "load_sweep", "member_name", "save_sae", "save_sweep", "sweep_info", "LMSweep", "store_metadata",
           "state_dir", "sweep_dir", "sweep_name", "train_lm_sweep", "TrainingDiverged", "estimate_input_scale",
           "train_sae", "TrainSettings", "default_input_scale", "ica_dictionary", "ksvd_dictionary",
           "online_dictionary", "pca_dictionary", "train_distributed", "load_decoder_trajectory", "load_snapshot",
           "snapshot_steps", "train_revision_sae", "tracking_schedule",
           "reference_dictionary", "dictionary_seed", "sweep_settings", "e2e_sweep_dir", "train_e2e_sweep",
           "downstream_hooks", "LOSSES"]
