"""Stage 3, activations: harvest a model's activations to disk and read them back; synthetic activations with known
features (toy data)."""

from .exclusion import (MASSIVE_RATIO, NORM_RATIO, Exclusion, detect_exclusion, exclusion_of, first_position_ratio,
                        norm_limits, special_token_ids)
from .harvester import default_dtype, ensure_activations, harvest, model_and_store, revision_store
from .settings import HarvestSettings
from .layout import MANIFEST, ChunkError, chunk_checksum, hook_folder, open_chunk, safe_name, write_chunk
from .store import ActivationStore, norm_outliers, row_order, write_store
from .synthetic import ToyConfig, ToyData, firing_probabilities, standard_basis_data

__all__ = ["MASSIVE_RATIO", "NORM_RATIO", "Exclusion", "detect_exclusion", "exclusion_of", "first_position_ratio",
           "norm_limits", "norm_outliers", "special_token_ids",
           "default_dtype", "ensure_activations", "harvest", "model_and_store", "revision_store",
           "HarvestSettings", "MANIFEST", "ChunkError", "chunk_checksum", "hook_folder", "open_chunk",
           "safe_name", "write_chunk", "ActivationStore", "row_order", "write_store", "ToyConfig", "ToyData",
           "firing_probabilities", "standard_basis_data"]
