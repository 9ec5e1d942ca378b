"""Stage 6, plots: one module per question (notebook), one style, atomic PNG writes into the top-level figures/
folder; `writeup` builds figures/README.md from the metrics the notebooks wrote."""

from .e2e import plot_ce_vs_l0, plot_downstream_mse, plot_geometry
from .features import (plot_ablation_effects, plot_feature_cards, plot_loss_by_feature_set,
                       plot_token_ablation)
from .dictionary_html import dictionary_page, lens_tables, save_dictionary_page
from .features_html import inline_view, save_features_page
from .interpretability import (plot_controls, plot_detection_fuzzing, plot_score_vs_frequency, plot_score_vs_mcs,
                               plot_scores_by_layer, plot_top_vs_random)
from .frontier import plot_dead_features, plot_density_histogram, plot_density_panels, plot_frontier
from .lm import pca_spectrum, plot_activation_norms, plot_lm_loss, plot_pca_spectra
from .mcs import plot_high_mcs_vs_size, plot_mcs_panels, plot_mcs_vs_frequency
from .style import savefig
from .toy import plot_ksvd_wrong_k, plot_method_bars, plot_mmcs_vs_l0, plot_mmcs_vs_larger, plot_sweep_heatmap
from .tracking import plot_emergence, plot_feature_trajectories, plot_self_similarity

__all__ = ["plot_controls", "plot_detection_fuzzing", "plot_score_vs_frequency", "plot_score_vs_mcs",
           "plot_scores_by_layer", "plot_top_vs_random",
           "plot_ablation_effects", "plot_feature_cards", "plot_loss_by_feature_set", "plot_token_ablation",
           "inline_view", "save_features_page", "dictionary_page", "lens_tables", "save_dictionary_page", "plot_dead_features", "plot_density_histogram",
           "plot_density_panels", "plot_frontier", "pca_spectrum", "plot_activation_norms", "plot_lm_loss",
           "plot_pca_spectra", "plot_high_mcs_vs_size", "plot_mcs_panels", "plot_mcs_vs_frequency", "savefig",
           "plot_method_bars", "plot_mmcs_vs_larger", "plot_sweep_heatmap", "plot_ksvd_wrong_k", "plot_mmcs_vs_l0",
           "plot_emergence",
           "plot_feature_trajectories", "plot_self_similarity", "plot_ce_vs_l0", "plot_downstream_mse",
           "plot_geometry"]
