"""Max cosine similarity (MCS) between dictionaries.

A dictionary here is a [n_features, d] tensor of feature directions (decoder rows). MCS of a feature of A is its
largest cosine with any feature of B; MMCS is the mean of that over A's features."""

from __future__ import annotations

import torch


def _unit_rows(D: torch.Tensor, name: str) -> torch.Tensor:
    if D.ndim != 2:
        raise ValueError(f"{name} must be [n_features, d], got shape {tuple(D.shape)}")
    if D.shape[0] == 0:
        raise ValueError(f"{name} is empty (0 features)")
    return D / D.norm(dim=1, keepdim=True).clamp_min(1e-12)


def max_cosine(A: torch.Tensor, B: torch.Tensor, chunk_size: int = 4096) -> torch.Tensor:
    """For each row of A, its max cosine similarity over the rows of B (shape [len(A)]).

    Chunked over A so memory stays at chunk_size x len(B)."""
    A = _unit_rows(A.float(), "A")
    B = _unit_rows(B.float(), "B")
    if A.shape[1] != B.shape[1]:
        raise ValueError(f"dictionaries have different widths: A has d={A.shape[1]}, B has d={B.shape[1]}")
    out = torch.empty(A.shape[0], dtype=A.dtype, device=A.device)
    for start in range(0, A.shape[0], chunk_size):
        out[start:start + chunk_size] = (A[start:start + chunk_size] @ B.T).max(dim=1).values
    return out


def mmcs(A: torch.Tensor, B: torch.Tensor) -> float:
    """Mean max cosine similarity of A's features over B (e.g. A = ground truth, B = learned)."""
    return float(max_cosine(A, B).mean())
