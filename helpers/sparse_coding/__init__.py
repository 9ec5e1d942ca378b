"""sparse_coding: helpers behind the sparse-coding notebooks.

Modules, one concept each: toy (synthetic data with known features), sae (SAE kinds as batched ensembles),
train (the training loop), similarity (MCS and matching), baselines (PCA/ICA/OMP), corpus, lm, activations,
tracking, plots, io (atomic save/load), paths (where data and figures live).
"""

__version__ = "0.1.0"
