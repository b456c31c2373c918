"""Rank correlation for the study benchmarks: how well one list of scores ranks as another does."""

from __future__ import annotations

import numpy as np


def ranks(values: list[float]) -> np.ndarray:
    """Each value's rank, 0 for the lowest (ties by position)."""
    return np.argsort(np.argsort(np.asarray(values)))


def spearman(ranks_a: np.ndarray, ranks_b: np.ndarray) -> float:
    """Spearman rank correlation of two rankings (from `ranks`), to 2 decimals."""
    return round(float(np.corrcoef(ranks_a, ranks_b)[0, 1]), 2)
