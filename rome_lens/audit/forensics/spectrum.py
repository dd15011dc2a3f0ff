"""Spectra of MLP output weights: numerical ranks of differences, and outlier scores.

Two questions are answered from singular values alone.

* **With the base weights**, how many independent directions does a change ``D = W' - W`` have?
  Its *numerical rank* counts the singular values of ``D`` above the rounding noise of the
  subtraction. Each entry of ``W' - W`` carries an error of at most ``eps * |w|``, so the noise
  has a spectral norm below ``eps * ||W||_F <= eps * max(m, n) * s_1(W)``; the tolerance is
  ``max(m, n) * eps * max(s_1(D), s_1(W'))`` (numpy's ``matrix_rank`` convention, applied to the
  larger of the two matrices).
* **Without them**, does a matrix carry a planted low-rank component? A rank-one edit
  ``W + s u v^T`` whose norm is comparable to the matrix's adds a singular value that stands far
  above the matrix's bulk. Every layer's spectrum is put on a common scale by its own *median*
  singular value (robust to a few planted components), giving ``a[L, i] = log(s_i / median s)``.
  A layer's top components are then compared with the OTHER layers' top component: the robust
  z-score ``z[L, i] = (a[L, i] - median_M a[M, 1]) / max(1.4826 * MAD_M a[M, 1], floor)`` over
  layers ``M != L`` (leave-one-out, so an edit cannot raise its own reference). Unedited layers
  of one model have similar top-to-bulk ratios, a planted component makes one layer's ratio an
  outlier; the ``floor`` keeps the score honest when the other layers agree almost exactly
  (random matrices of one shape), so that a tiny excess is never a large z.

Example:
    >>> d = torch.outer(torch.ones(8), torch.ones(4))
    >>> numerical_rank(d, torch.eye(8, 4))[0]
    1
"""

from __future__ import annotations

import math

import torch
from jaxtyping import Float

#: The consistency constant of the median absolute deviation for a Gaussian.
MAD_TO_STD = 1.4826


def singular_values(matrix: Float[torch.Tensor, "m n"]) -> Float[torch.Tensor, " k"]:
    """Singular values of ``matrix`` in float32 (float64 for tiny matrices), descending."""
    dtype = torch.float64 if matrix.numel() <= 1 << 16 else torch.float32
    return torch.linalg.svdvals(matrix.detach().to(dtype)).float().cpu()


def rank_tolerance(
    shape: tuple[int, int], dtype: torch.dtype, top_delta: float, top_weight: float
) -> float:
    """Singular values of a difference at or below this are rounding noise (module docstring)."""
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else torch.finfo(torch.float32).eps
    return max(shape) * eps * max(top_delta, top_weight)


def numerical_rank(
    delta: Float[torch.Tensor, "m n"], weight: Float[torch.Tensor, "m n"]
) -> tuple[int, Float[torch.Tensor, " k"]]:
    """Numerical rank of a change ``delta`` of ``weight`` (either side), and its singular values.

    Args:
        delta: the difference of two versions of a weight.
        weight: one of the two versions (its norm sets the rounding noise of the subtraction).

    Returns:
        ``(rank, singular values of delta, descending)``.
    """
    values = singular_values(delta)
    top_weight = float(torch.linalg.matrix_norm(weight.detach().float(), ord=2))
    shape = (int(delta.shape[0]), int(delta.shape[1]))
    tol = rank_tolerance(shape, weight.dtype, float(values[0]), top_weight)
    return int((values > tol).sum()), values


def normalised_log_spectra(
    spectra: Float[torch.Tensor, "layer k"],
) -> Float[torch.Tensor, "layer k"]:
    """``log(s_i / median_j s_j)`` of every layer's spectrum (the bulk of each layer at 0)."""
    median = spectra.median(dim=1, keepdim=True).values.clamp_min(1e-30)
    return torch.log(spectra.clamp_min(1e-30) / median)


def outlier_scores(
    spectra: Float[torch.Tensor, "layer k"], floor: float
) -> Float[torch.Tensor, "layer k"]:
    """Robust leave-one-out z-scores of every layer's components against the other layers' top.

    Args:
        spectra: singular values of each layer's matrix (same count per layer), descending.
        floor: the smallest scale allowed (in log units): a z of 1 is at least this excess.

    Returns:
        ``z[L, i]`` as in the module docstring; all zeros when there is only one layer.
    """
    logs = normalised_log_spectra(spectra)
    scores = torch.zeros_like(logs)
    if logs.shape[0] < 2:
        return scores
    for layer in range(logs.shape[0]):
        centre, scale = _others_centre_scale(logs[:, 0], layer, floor)
        scores[layer] = (logs[layer] - centre) / scale
    return scores


def leave_one_out_z(values: Float[torch.Tensor, " layer"], floor: float
                    ) -> Float[torch.Tensor, " layer"]:
    """Each entry's robust z-score against the OTHER entries (median, 1.4826 MAD >= floor)."""
    scores = torch.zeros_like(values)
    for layer in range(values.shape[0] if values.shape[0] > 1 else 0):
        centre, scale = _others_centre_scale(values, layer, floor)
        scores[layer] = (values[layer] - centre) / scale
    return scores


def _others_centre_scale(values: torch.Tensor, layer: int, floor: float) -> tuple[float, float]:
    others = torch.cat([values[:layer], values[layer + 1:]])
    centre = others.median()
    spread = MAD_TO_STD * (others - centre).abs().median()
    return float(centre), max(float(spread), floor)


def low_variance_basis(
    moment: Float[torch.Tensor, "d_mlp d_mlp"], fraction: float
) -> Float[torch.Tensor, "d_mlp m"]:
    """Orthonormal eigenvectors of the key statistics ``C`` with the smallest eigenvalues.

    ``m = max(2, round(fraction * d_mlp))`` directions: the keys ordinary text rarely produces,
    where ROME's update direction ``C^-1 k*`` concentrates.
    """
    count = max(2, round(fraction * moment.shape[0]))
    _, vectors = torch.linalg.eigh(moment.detach().double().cpu())
    return vectors[:, :count].float()


def top_ratio(matrix: Float[torch.Tensor, "m n"]) -> float:
    """``log(s_1 / s_2)``: how far a matrix's top singular value stands above the next."""
    values = singular_values(matrix)
    return math.log(float(values[0]) / max(float(values[1]), 1e-30))


def key_subspace_scores(
    weights: list[Float[torch.Tensor, "d_mlp d_model"]],
    bases: list[Float[torch.Tensor, "d_mlp m"]],
    floor: float,
) -> Float[torch.Tensor, " layer"]:
    """How much more a layer's top component stands out in its low-variance key subspace.

    For each layer the robust leave-one-out z-score (:func:`leave_one_out_z`) of
    ``log(s_1 / s_2)`` of ``E^T W`` (``E``: :func:`low_variance_basis`) minus the same z-score of
    ``W`` itself. A rank-one edit ``u r^T`` with ``u ~ C^-1 k*`` adds a component that is far
    stronger in ``E``'s span than in ``W`` as a whole, so the edited layer's first z is high
    while its second is not; a layer whose top component is unusual everywhere (as the first
    layer of many models is) has both high, and a small difference.
    """
    low = torch.tensor([top_ratio(e.T @ w.float().cpu()) for w, e in zip(weights, bases,
                                                                         strict=True)])
    plain = torch.tensor([top_ratio(w) for w in weights])
    return leave_one_out_z(low, floor) - leave_one_out_z(plain, floor)


def key_directions(
    moment: Float[torch.Tensor, "d_mlp d_mlp"], keys: Float[torch.Tensor, "n d_mlp"],
    ridge: float,
) -> Float[torch.Tensor, "n d_mlp"]:
    """ROME's update directions ``u = (C + ridge * mean(diag C) I)^-1 k`` of ``keys``, unit norm.

    Solved in float64, one solve for all keys (the rows of the result follow ``keys``).
    """
    c = moment.detach().double().cpu()
    if ridge > 0:
        c = c + ridge * c.diagonal().mean() * torch.eye(c.shape[0], dtype=c.dtype)
    u = torch.linalg.solve(c, keys.detach().double().cpu().T).T
    return (u / u.norm(dim=1, keepdim=True).clamp_min(1e-300)).float()


def matched_subject_scores(
    weight: Float[torch.Tensor, "d_mlp d_model"], directions: Float[torch.Tensor, "n d_mlp"],
    floor: float,
) -> Float[torch.Tensor, " n"]:
    """How much more the weight answers each candidate's update direction than the others'.

    A ROME-style edit of subject ``s`` adds ``u_s r^T`` with ``u_s ~ C^-1 k_s``, so the weight's
    response ``||u_s^T W||`` along the subject's own unit direction gains the whole edit, while
    the unedited weight answers every candidate's direction alike. The score of each candidate
    is the robust z-score (median, 1.4826 MAD >= ``floor``) of ``log ||u^T W||`` over all
    candidates: a matched filter that needs the edited subject among the candidates, and in
    exchange sees edits far weaker than the spectrum of ``W`` shows.

    Example:
        >>> w = torch.randn(32, 8); d = torch.linalg.qr(torch.randn(32, 32))[0].T[:20]
        >>> w_edit = w + 5 * torch.outer(d[3], torch.randn(8))
        >>> int(matched_subject_scores(w_edit, d, 0.1).argmax())
        3
    """
    values = (directions.float() @ weight.detach().float().cpu()).norm(dim=1).clamp_min(1e-30)
    values = values.log()
    centre = values.median()
    spread = max(float(MAD_TO_STD * (values - centre).abs().median()), floor)
    return (values - centre) / spread


def confidence_from_score(score: float, threshold: float) -> float:
    """``1 - 2^(-score / threshold)``: 0.5 at the threshold, 0.75 at twice, 0.875 at 3x."""
    if score <= 0:
        return 0.0
    return 1.0 - math.pow(2.0, -score / threshold)
