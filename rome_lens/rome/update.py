"""ROME's closed-form update: insert a key -> value association with a rank-one change.

``W' = W + (C^-1 k*) (v* - v(k*))^T / ((C^-1 k*)^T k*)``, so that ``W'^T k* + b = v*`` while keys
that typical text produces (whose second moment is C) are disturbed as little as possible.
"""

from __future__ import annotations

import torch
from jaxtyping import Float

from rome_lens.errors import NonFiniteError


def rank_one_factors(
    mom2: Float[torch.Tensor, "d_mlp d_mlp"],
    k_star: Float[torch.Tensor, " d_mlp"],
    residual: Float[torch.Tensor, " d_model"],
    ridge: float = 0.0,
) -> tuple[Float[torch.Tensor, " d_mlp"], Float[torch.Tensor, " d_model"]]:
    """The rank-one update ``outer(left, right)`` that adds ``residual`` to the output at k*.

    ``left = C^-1 k* / (k*^T C^-1 k*)`` so that ``k*^T left = 1``; ``right = residual``
    (= v* - v(k*)). Solved in float64 with an optional ridge ``ridge * mean(diag(C))``.

    Raises:
        NonFiniteError: if the solve produces NaN/inf or ``k*^T C^-1 k*`` is not positive.
    """
    c = mom2.to(torch.float64)
    if ridge > 0:
        c = c + ridge * c.diagonal().mean() * torch.eye(c.shape[0], dtype=c.dtype, device=c.device)
    k = k_star.to(c.device, torch.float64)
    try:
        u = torch.linalg.solve(c, k)
    except torch.linalg.LinAlgError as exc:
        raise NonFiniteError(
            "the key statistics C are singular (use more statistics text or mom2_ridge > 0)"
        ) from exc
    denom = u @ k
    if not torch.isfinite(u).all() or not torch.isfinite(denom) or denom <= 0:
        raise NonFiniteError(
            "C^-1 k* is not finite or k*^T C^-1 k* <= 0: the key statistics are degenerate"
        )
    left = (u / denom).to(k_star.device)
    return left.float(), residual.detach().float()
