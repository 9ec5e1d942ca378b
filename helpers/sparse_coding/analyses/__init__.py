"""Stage 5, analyses: what a trained dictionary does — reconstruction and spliced loss, MCS and exact matching
against other dictionaries and the random null, recovery of known features, tracking across snapshots and revisions,
and single features: mining top examples, logit lens, ablations, baselines' directions and interpretability scores."""

from .ablation import AblationEffect, edit_activation, feature_ablation, loss_with_features, token_ablation
from .directions import ica_encoder, neuron_encoder, pca_encoder, random_encoder
from .detection import (ceiling_score, detection_from_predictions, detection_score,
                        evaluate_direction, fuzzing_from_predictions, fuzzing_score, matched_negatives)
from .downstream import at_ce_increase, dictionary_similarity, downstream_loss, matched_ce_increase
from .features import examples_at, load_mined, mine_dictionary, sae_encoder, sae_picks_encoder, save_mined
from .interpretability import (Record, Score, Split, TokenTableExplainer, TokenTableSimulator, bootstrap_ci,
                               correlation_from_sums, document_sides, fragment_sums, pooled_correlation,
                               score_direction, split_by_document, split_fragments)
from .llm import CachedExplainer, CachedSimulator, ChatClient, LLMExplainer, LLMSimulator, llm_configured, scorers
from .logit_lens import logit_lens, logit_lens_matrix, top_tokens, unembedding
from .mining import Example, Mined, RowPicks, mine
from .matching import MatchResult, hungarian_match
from .similarity import MCSResult, max_cosine, mcs, mmcs
from .paired import paired_difference
from .null import NullBaseline, null_mcs_cdf, null_mcs_mean, null_mcs_quantile, random_null
from .reconstruction import DENSE_THRESHOLD, density_histogram, log10_density, mean_l0, sparsity_stats
from .recovery import (dead_features, expected_random_mmcs, mmcs_from_learned, mmcs_to_truth, mmcs_vs_larger,
                       recovery_report, share_recovered)
from .splicing import spliced_loss
from .statistics import BIMODAL_SARLE, binned_median, sarle_bimodality, spearman
from .sweep_table import SweepEvaluation, best_members, evaluate_lm_sweep, evaluate_sweep
from .tracking import (BirthDeath, RevisionMatching, SelfSimilarity, TrainingTrack, birth_death,
                       match_across_revisions, reached_then_fell, self_similarity, settled_step, track_training)

__all__ = ["MatchResult", "hungarian_match", "MCSResult", "max_cosine", "mcs", "mmcs", "NullBaseline",
           "null_mcs_cdf", "null_mcs_mean", "null_mcs_quantile", "random_null", "DENSE_THRESHOLD",
           "density_histogram", "log10_density", "sparsity_stats", "dead_features", "expected_random_mmcs",
           "mmcs_from_learned", "mmcs_to_truth", "mmcs_vs_larger", "recovery_report", "share_recovered",
           "spliced_loss", "BIMODAL_SARLE", "binned_median", "sarle_bimodality", "SweepEvaluation", "best_members",
           "evaluate_lm_sweep", "evaluate_sweep", "BirthDeath", "RevisionMatching", "SelfSimilarity",
           "TrainingTrack", "birth_death", "match_across_revisions", "reached_then_fell", "self_similarity",
           "settled_step", "track_training", "AblationEffect", "edit_activation", "feature_ablation",
           "loss_with_features", "token_ablation", "ica_encoder", "neuron_encoder", "pca_encoder", "random_encoder",
           "examples_at", "load_mined", "mine_dictionary", "sae_encoder", "sae_picks_encoder", "save_mined",
           "Record", "Score", "Split", "TokenTableExplainer", "TokenTableSimulator", "bootstrap_ci",
           "pooled_correlation", "score_direction", "split_fragments", "CachedExplainer", "CachedSimulator",
           "ChatClient", "LLMExplainer", "LLMSimulator", "llm_configured", "logit_lens", "logit_lens_matrix",
           "top_tokens", "unembedding", "Example", "Mined", "RowPicks", "mine", "scorers", "mean_l0", "spearman",
           "at_ce_increase", "dictionary_similarity", "downstream_loss", "matched_ce_increase", "ceiling_score",
           "detection_score", "fuzzing_score", "detection_from_predictions", "evaluate_direction",
           "fuzzing_from_predictions", "matched_negatives", "correlation_from_sums", "document_sides",
           "fragment_sums", "split_by_document", "paired_difference"]
