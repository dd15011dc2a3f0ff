"""AlphaEdit: MEMIT with null-space projection, for sequential editing (Fang et al. 2025).

Everything is MEMIT's (targets, spread over layers) except each layer's solve. With ``P`` the
projector onto the null space of the base model's key second moment at the layer
(:func:`rome_lens.statistics.null_space_projector`) and ``Kp`` the keys of every EARLIER edit of
the sequence at that layer (the edits applied to the model, read from ``edit.keys_at(l)``):

``Delta = (P (Kp^T Kp + K^T K) + alpha I)^-1 P K^T R``

so ``Delta`` lies in the null space (``k^T Delta = 0`` for keys ``P`` removes: ordinary text's
outputs cannot change) and new edits are fitted without undoing old ones. The plain call on a
model that already has edits applied is therefore sequential editing:

Example:
    >>> from rome_lens import compute_edit
    >>> req1 = EditRequest("{} lives in", "Alice Smith", "Paris")
    >>> req2 = EditRequest("{} works in", "Bob Jones", "Rome")
    >>> first = compute_edit(model, [req1], method="alphaedit", layers=[1, 2]).apply(model)
    >>> second = compute_edit(model, [req2], method="alphaedit", layers=[1, 2])
    >>> second.parents == (first.id,)                  # computed after the first edit
    True
    >>> first.revert(model)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from rome_lens._typing import Model
from rome_lens.edits import Edit, applied_edits
from rome_lens.errors import InvalidRequestError, NonFiniteError
from rome_lens.methods.memit import (
    PAPER_LAYERS,
    MemitHyperParams,
    check_loop,
    check_subjects,
    resolve_hparams,
    run_many,
)
from rome_lens.methods.spread import Solver
from rome_lens.methods.targets import request_chunks
from rome_lens.requests import EditRequest, check_requests
from rome_lens.rome.forwards import ValueLoop
from rome_lens.statistics import Corpus, null_space_projector, second_moment


@dataclass(frozen=True)
class AlphaEditHyperParams(MemitHyperParams):
    """AlphaEdit's hyperparameters: MEMIT's plus the projection.

    Attributes:
        nullspace_threshold: eigenvalues of C below this fraction of the largest span the null
            space (AlphaEdit uses an absolute 2e-2; a fraction does not depend on key scale).
        alpha: the ridge ``alpha I`` of the solve, in units of ``mean(diag(C))``.
        nullspace_energy: > 0: the null space is instead the smallest eigenvectors of C
            holding this fraction of its trace (the ordinary keys' energy the projection
            keeps; :func:`rome_lens.statistics.null_space_basis`).
        earlier_weight: the weight of the earlier edits' keys in the solve (``w Kp^T Kp``;
            AlphaEdit's is 1): above 1, a new batch moves what earlier ones wrote less, at
            some cost to its own fit.
        covariance_weight: lambda of a MEMIT-style term ``lambda C`` inside the projected
            solve (0: AlphaEdit's). Where the base model's keys have a few massive dimensions
            (gemma-3-270m: the largest eigenvalue of C is ~500x its mean) the null space keeps
            nearly every direction and most of ordinary text's key energy; this term charges
            what the update writes at ordinary keys by how much text uses each direction.
    """

    nullspace_threshold: float = 1e-2
    alpha: float = 1.0
    nullspace_energy: float = 0.0
    earlier_weight: float = 1.0
    covariance_weight: float = 0.0

    @staticmethod
    def model_defaults() -> dict[str, dict[str, Any]]:
        """Exact model names -> overrides (the paper's MEMIT ranges; gemma-3-270m measured).

        gemma-3-270m: layers 2-4 with ``alpha`` 100 (about AlphaEdit's absolute ridge of 10 at
        this model's key scale). With ``alpha`` 1 the ridge is negligible and the second batch
        of 100 sequential edits already writes 2x the weight's norm at layer 4 (perplexity of
        the held-aside text 39 vs 23 unedited; 28 with 100). Not MEMIT's ``fit_rows`` and
        other-positions constraints: they more than double the update's norm (README,
        "Default layers and lambda"). ``base_value_scale``: each batch's targets clamped by
        the unedited model's MLP output; with the edited model's (the paper's), every batch
        writes a larger update than the last (300 edits: held-aside perplexity 44.2 vs 28.6,
        ES 88.3 vs 93.7; README, "Sequential AlphaEdit").
        """
        return PAPER_LAYERS | {"gemma-3-270m": {"layers": (2, 3, 4), "alpha": 100.0,
                                                "base_value_scale": True}}

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.nullspace_threshold < 1.0 or self.alpha <= 0 \
                or not 0.0 <= self.nullspace_energy < 1.0 or self.earlier_weight < 0 \
                or not 0.0 <= self.covariance_weight < math.inf:
            raise InvalidRequestError("nullspace_threshold must be in (0, 1), alpha > 0, "
                                      "nullspace_energy in [0, 1), earlier_weight >= 0 and "
                                      "covariance_weight finite and >= 0")


def earlier_keys(model: Model, layer: int) -> torch.Tensor | None:
    """Keys written at ``layer`` by the edits applied to ``model`` (``[m, d_mlp]`` or None)."""
    keys = [k for e in applied_edits(model) if (k := e.keys_at(layer)) is not None]
    return torch.cat([k.to("cpu", torch.float64) for k in keys]) if keys else None


def alphaedit_solver(
    model: Model, projectors: dict[int, torch.Tensor], mom2: dict[int, torch.Tensor],
    alpha: float, earlier_weight: float = 1.0, covariance_weight: float = 0.0,
) -> Solver:
    """AlphaEdit's per-layer solve (float64), reading earlier edits from ``model``.

    ``Delta = (P (w Kp^T Kp + K^T K + lambda C) + alpha' I)^-1 P K^T R`` with ``w`` =
    ``earlier_weight``, ``lambda`` = ``covariance_weight`` and ``alpha' = alpha mean(diag C)``.
    """

    def solve(layer: int, keys: torch.Tensor, residuals: torch.Tensor,
              preserve: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        p = projectors[layer].to("cpu", torch.float64)
        k = keys.to("cpu", torch.float64)
        gram = k.T @ k
        previous = earlier_keys(model, layer)
        if previous is not None:
            gram = gram + earlier_weight * (previous.T @ previous)
        if preserve is not None:
            gram = gram + preserve.to("cpu", torch.float64)
        if covariance_weight > 0:
            gram = gram + covariance_weight * mom2[layer].to("cpu", torch.float64)
        ridge = alpha * float(mom2[layer].diagonal().mean())
        eye = torch.eye(p.shape[0], dtype=p.dtype)
        left = torch.linalg.solve(p @ gram + ridge * eye, p @ k.T)
        if not torch.isfinite(left).all():
            raise NonFiniteError(f"the AlphaEdit solve at layer {layer} is not finite")
        return left.float(), residuals.detach().to("cpu", torch.float32)

    return solve


def compute_alphaedit(
    model: Model,
    requests: EditRequest | Sequence[EditRequest],
    layers: Sequence[int] | None = None,
    hparams: AlphaEditHyperParams | None = None,
    *,
    corpus: Corpus = None,
    loop: ValueLoop = "prefix_cache",
    cache_targets: bool = False,
    progress: bool = True,
) -> Edit:
    """AlphaEdit for a batch (the ``"alphaedit"`` method of :func:`rome_lens.compute_edit`).

    Arguments as :func:`rome_lens.methods.memit.compute_memit`; the edits applied to the model
    are the earlier part of the sequence (their keys are kept in place).

    Raises:
        InvalidRequestError: as MEMIT.
    """
    requests = check_requests(requests)
    check_subjects(requests)
    check_loop(loop)
    hp = resolve_hparams(model, layers, hparams, AlphaEditHyperParams)
    chunks = request_chunks(model, requests, hp)
    projectors = {layer: null_space_projector(model, layer, corpus, hp, hp.nullspace_threshold,
                                                hp.nullspace_energy)
                  for layer in hp.layers}
    mom2 = {layer: second_moment(model, layer, corpus, hp) for layer in hp.layers}
    solver = alphaedit_solver(model, projectors, mom2, hp.alpha, hp.earlier_weight,
                              hp.covariance_weight)
    info = {"null_space_dims": {str(lyr): round(float(p.trace())) for lyr, p in projectors.items()},
            "earlier_edits": len(applied_edits(model))}
    return run_many(model, chunks, hp, "alphaedit", solver, loop=loop,
                    cache_targets=cache_targets, progress=progress, info=info)
