"""Batched numerical helpers shared by the estimators: |z|^2 and a one-thread CPU `eigh`."""

from __future__ import annotations

import torch


def squared_magnitude(values: torch.Tensor) -> torch.Tensor:
    """|z|^2 of a complex tensor without the square root of abs(); real, same shape."""
    return torch.view_as_real(values).square().sum(-1)


def eigh(matrix: torch.Tensor, *, vectors: bool = True
         ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Batched Hermitian eigendecomposition, ascending; on the CPU with one LAPACK thread.

    Returns (eigenvalues, eigenvectors), the eigenvectors None unless `vectors`.
    The matrices are small (N = 144) and many, so one thread per matrix loses little, while the
    threaded solver collapses when other processes hold the cores (HPO workers side by side):
    for 64 matrices on a shared 2-core machine, 0.08-0.18 s with one thread against 0.7-8 s with
    two. The thread count is restored afterwards.
    """
    if matrix.device.type != "cpu":
        if vectors:
            return torch.linalg.eigh(matrix)
        return torch.linalg.eigvalsh(matrix), None
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if vectors:
            return torch.linalg.eigh(matrix)
        return torch.linalg.eigvalsh(matrix), None
    finally:
        torch.set_num_threads(n_threads)
