"""Stage 5, analyses: what a trained dictionary does — reconstruction and spliced loss, MCS and exact matching
against other dictionaries and the random null, recovery of known features, tracking across snapshots and revisions."""

from .matching import MatchResult, hungarian_match
from .similarity import MCSResult, max_cosine, mcs, mmcs
from .null import NullBaseline, null_mcs_cdf, null_mcs_mean, null_mcs_quantile, random_null
from .reconstruction import DENSE_THRESHOLD, density_histogram, log10_density, sparsity_stats
from .recovery import (dead_features, expected_random_mmcs, mmcs_from_learned, mmcs_to_truth, mmcs_vs_larger,
                       recovery_report, share_recovered)
from .splicing import spliced_loss
from .statistics import BIMODAL_SARLE, binned_median, sarle_bimodality
from .sweep_table import SweepEvaluation, best_members, evaluate_lm_sweep, evaluate_sweep
from .tracking import (BirthDeath, RevisionMatching, SelfSimilarity, TrainingTrack, birth_death,
                       match_across_revisions, reached_then_fell, self_similarity, settled_step, track_training)

__all__ = ["MatchResult", "hungarian_match", "MCSResult", "max_cosine", "mcs", "mmcs", "NullBaseline",
           "null_mcs_cdf", "null_mcs_mean", "null_mcs_quantile", "random_null", "DENSE_THRESHOLD",
           "density_histogram", "log10_density", "sparsity_stats", "dead_features", "expected_random_mmcs",
           "mmcs_from_learned", "mmcs_to_truth", "mmcs_vs_larger", "recovery_report", "share_recovered",
           "spliced_loss", "BIMODAL_SARLE", "binned_median", "sarle_bimodality", "SweepEvaluation", "best_members",
           "evaluate_lm_sweep", "evaluate_sweep", "BirthDeath", "RevisionMatching", "SelfSimilarity", "TrainingTrack",
           "birth_death", "match_across_revisions", "reached_then_fell", "self_similarity", "settled_step",
           "track_training"]
