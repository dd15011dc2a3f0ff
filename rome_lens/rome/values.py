"""Value targets v*: the change of the MLP output that makes the model say the new object.

For every request, ``delta`` (added to the raw MLP output of the edit layer at the last subject
token of each of its rows) is optimised with Adam against the objective, a KL term that keeps
``"{subject} is a"`` unchanged, and a weight decay, with ``||delta||`` clamped to
``clamp_norm_factor * ||v(k*)||``. Requests are optimised together in one batch but
independently: each has its own delta, loss, clamp and early stop, so a request's result does
not depend on the others. Objectives (Hase et al. 2023; Patil et al. 2023):

* ``"insertion"`` (error injection): NLL of the new object;
* ``"erasure"`` (Fact Erasure): ``-log(1 - p(original))``, zero once the original is gone; it
  stops early only once this term is also 5% (``early_stop_loss``) of its start (:func:`finished`);
* ``"max_entropy"`` (Patil et al.'s defence): raise the logit-lens entropy at the last prompt
  token over ``entropy_layers`` on the bare prompt and its first five context variants.

Example (the steps :func:`~rome_lens.rome.compute.compute_rome_edit` runs before this one):
    >>> from rome_lens.models import access
    >>> from rome_lens.rome.forwards import make_forward
    >>> from rome_lens.rome.keys import subject_keys
    >>> from rome_lens.rome.prompts import value_batch
    >>> from rome_lens.statistics import context_templates
    >>> hp, layer = rome_lens.default_hparams(model), 1
    >>> batch = value_batch(model, [request], context_templates(model, hp), hp.kl_prompt)
    >>> k_star, _ = subject_keys(model, layer, batch)
    >>> with torch.no_grad():
    ...     v_orig = access.mlp_value(model, layer, k_star)
    >>> forward = make_forward(model, layer, batch, "naive", None, v_orig.dtype)
    >>> delta, losses, final = optimise_values(model, layer, batch, v_orig, forward, hp)
    >>> delta.shape == v_orig.shape                 # [n_requests, d_model]
    True
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from jaxtyping import Float

from rome_lens._typing import Model
from rome_lens.errors import NonFiniteError
from rome_lens.models import access
from rome_lens.rome.forwards import ValueForward
from rome_lens.rome.hparams import RomeHyperParams, fast_bfloat16
from rome_lens.rome.prompts import ValueBatch

logger = logging.getLogger(__name__)

Objective = Literal["insertion", "erasure", "max_entropy"]
OBJECTIVES: tuple[str, ...] = ("insertion", "erasure", "max_entropy")
_ENTROPY_PROMPTS = 6  # prompts whose lens entropy the max-entropy objective raises (cost)


def default_entropy_layers(model: Model, layer: int, count: int = 6) -> list[int]:
    """Up to ``count`` evenly spaced layers from ``layer`` to the last (the last included)."""
    last = access.n_layers(model) - 1
    if last - layer + 1 <= count:
        return list(range(layer, last + 1))
    step = (last - layer) / (count - 1)
    return sorted({round(layer + i * step) for i in range(count)})


@dataclass
class _Step:
    """What one forward pass gives the loss."""

    token_lp: Float[torch.Tensor, " n_loss"]
    kl_rows: Float[torch.Tensor, " n_requests"]
    kl_reference: Float[torch.Tensor, "n_requests d_vocab"]
    captured: dict[int, torch.Tensor]


def _objective_term(
    model: Model, batch: ValueBatch, step: _Step, request: int, objective: str,
    entropy_rows: tuple[torch.Tensor, torch.Tensor], entropy_layers: Sequence[int],
) -> torch.Tensor:
    """The objective's term of one request (its KL term is separate)."""
    if objective == "max_entropy":
        rows, pos = entropy_rows
        states = [step.captured[lyr][rows, pos] for lyr in entropy_layers]
        return _entropy_gap(model, states)
    sel = (batch.loss_request == request).to(step.token_lp.device)
    token_lp = step.token_lp[sel]
    weights = batch.loss_weights.to(step.token_lp.device)[sel]
    n_value = int((batch.row_request[: batch.n_value] == request).sum())
    if objective == "insertion":
        return -(token_lp * weights).sum() / n_value
    erase = -torch.log1p(-token_lp.exp().clamp(max=1 - 1e-6))  # -log(1 - p), stable
    return (erase * weights).sum() / n_value


def _entropy_gap(
    model: Model, states: list[Float[torch.Tensor, "rows d_model"]]
) -> torch.Tensor:
    """Mean over layers and rows of ``1 - H(logit lens) / log(V)`` (0 at maximum entropy)."""
    h = torch.cat(states)
    logp = access.decode_residual(model, h).log_softmax(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return (1.0 - entropy / math.log(logp.shape[-1])).mean()


def _entropy_rows(
    batch: ValueBatch, forward: ValueForward, request: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows/positions of the last prompt token of a request's first few prompts."""
    n_loss = int(batch.loss_rows.shape[0])
    first = batch.loss_first & (batch.loss_row_rank < _ENTROPY_PROMPTS)
    first = first & (batch.loss_request == request)
    first = first.to(forward.rows.device)
    return forward.rows[:n_loss][first], forward.pos[:n_loss][first]


def _capture(store: dict[int, torch.Tensor], layer: int) -> Callable[..., None]:
    def fn(act: torch.Tensor, hook: object = None) -> None:
        store[layer] = act

    return fn


def _run_step(
    model: Model, layer: int, forward: ValueForward, delta: torch.Tensor,
    batch_targets: torch.Tensor, init_kl: torch.Tensor | None, capture_layers: Sequence[int],
) -> _Step:
    n_loss = int(batch_targets.shape[0])
    captured: dict[int, torch.Tensor] = {}
    hooks: list[tuple[Any, Callable[..., Any]]] = [
        (access.resid_post_hook_name(lyr), _capture(captured, lyr)) for lyr in capture_layers
    ]

    # one request: broadcast its delta directly (the single-edit computation, bit for bit)
    rows = delta[0] if delta.shape[0] == 1 else delta[forward.row_request][:, None, :]

    def add_delta(out: torch.Tensor) -> torch.Tensor:
        return out + forward.mask * rows

    with access.raw_mlp_output_hook(model, layer, add_delta), model.hooks(hooks):
        logp = forward()
    logp_loss, logp_kl = logp[:n_loss], logp[n_loss:]
    # every loss entry's target log-prob at once: selecting per request afterwards moves
    # [entries] floats, not [entries, d_vocab] (whose backward would fill a vocabulary-wide
    # zero tensor per request)
    targets = batch_targets.to(logp.device)
    token_lp = logp_loss.gather(-1, targets[:, None])[:, 0]
    reference = logp_kl.detach() if init_kl is None else init_kl
    kl_rows = (reference.exp() * (reference - logp_kl)).sum(-1)
    return _Step(token_lp, kl_rows, reference, captured)


def optimise_values(
    model: Model,
    layer: int,
    batch: ValueBatch,
    v_orig: Float[torch.Tensor, "n_requests d_model"],
    forward: ValueForward,
    hparams: RomeHyperParams,
    objective: Objective = "insertion",
    entropy_layers: Sequence[int] = (),
) -> tuple[Float[torch.Tensor, "n_requests d_model"], list[float], list[float]]:
    """Optimise every request's delta (added to the raw MLP output at its last subject tokens).

    Args:
        model: the model (not modified).
        layer: the edit layer.
        batch: value and KL prompts of the requests.
        v_orig: MLP output at each request's k*, the scale of its clamp and weight decay.
        forward: the forward strategy (:mod:`rome_lens.rome.forwards`).
        hparams: optimisation settings.
        objective: ``"insertion"``, ``"erasure"`` or ``"max_entropy"``.
        entropy_layers: layers whose logit-lens entropy ``"max_entropy"`` maximises.

    Returns:
        ``(delta, losses, final)``: the deltas (float32), the total loss at each step, and each
        request's last loss. ``hparams.z_precision="bfloat16"`` runs the passes under
        bfloat16 autocast; delta and Adam stay float32.

    Raises:
        NonFiniteError: the loss becomes NaN or infinite.
    """
    n_req = batch.n_requests
    delta = torch.zeros_like(v_orig, requires_grad=True)
    optimizer = torch.optim.Adam([delta], lr=hparams.v_lr)
    v_norms = [v_orig[r].norm() for r in range(n_req)]
    capture = list(entropy_layers) if objective == "max_entropy" else []
    entropy_rows = [_entropy_rows(batch, forward, r) for r in range(n_req)]
    init_kl: torch.Tensor | None = None
    losses: list[float] = []
    done = torch.zeros(n_req, dtype=torch.bool)
    first_terms: list[float] | None = None
    with value_precision(model, hparams):
        for step in range(max(1, hparams.v_num_grad_steps)):
            out = _run_step(model, layer, forward, delta, batch.loss_targets, init_kl, capture)
            if init_kl is None:
                init_kl = out.kl_reference  # the unedited model's distribution (step 0)
            terms = [
                _objective_term(model, batch, out, r, objective, entropy_rows[r], capture)
                for r in range(n_req)
            ]
            per_request = [
                terms[r]
                + hparams.kl_factor * out.kl_rows[r]
                + hparams.v_weight_decay * delta[r].norm() / v_norms[r] ** 2
                for r in range(n_req)
            ]
            loss = per_request[0] if n_req == 1 else torch.stack(per_request).sum()
            values = [float(x.detach()) for x in per_request]
            losses.append(float(loss.detach()))
            if not all(math.isfinite(v) for v in values):
                raise NonFiniteError(f"ROME value loss is not finite at step {step}: {values}")
            logger.debug("v* step %d: loss %.4f", step, losses[-1])
            term_values = [float(t.detach()) for t in terms]
            first_terms = term_values if first_terms is None else first_terms
            done |= finished(values, term_values, first_terms, objective, hparams.early_stop_loss)
            if bool(done.all()) or step == hparams.v_num_grad_steps - 1:
                break
            _adam_step(optimizer, delta, loss, done, v_norms, hparams.clamp_norm_factor)
    return delta.detach().float(), losses, values


def finished(
    totals: Sequence[float], terms: Sequence[float], first_terms: Sequence[float],
    objective: str, level: float,
) -> torch.Tensor:
    """Which requests stop early: a boolean per request.

    Every request stops once its total loss is below ``level``; erasure also needs its
    erasure term below ``level`` times the term's step-0 value: since ``-log(1 - p) ~ p`` for
    small ``p``, p(original) has fallen to about ``level`` (5%) of where it started. The
    absolute level alone would stop erasure at step 0 wherever p(original) starts below
    ~``level``, as it does for many facts a small model knows (gemma-3-270m: a third of the
    known facts of benchmarks/ripple.py).

    Example:
        >>> finished([0.04], [0.04], [0.04], "erasure", 0.05).tolist()    # nothing erased yet
        [False]
        >>> finished([0.04], [0.04], [0.04], "insertion", 0.05).tolist()
        [True]
    """
    done = torch.tensor([v < level for v in totals])
    if objective == "erasure":
        done &= torch.tensor([t <= level * f for t, f in zip(terms, first_terms, strict=True)])
    return done


def value_precision(model: Model, hparams: RomeHyperParams) -> torch.autocast:
    """Autocast for ``hparams.z_precision`` (disabled for ``"float32"``).

    Open for the whole loop: autocast caches its casts of the weights while it is open.
    """
    device = torch.device(model.cfg.device or "cpu").type
    enabled = hparams.z_precision == "bfloat16"
    if enabled and not fast_bfloat16(device):
        _warn_slow_bfloat16(device)
    return torch.autocast(device, dtype=torch.bfloat16, enabled=enabled)


@functools.cache
def _warn_slow_bfloat16(device: str) -> None:
    """Warn once per device type that bfloat16 targets will be emulated there (slow)."""
    logger.warning(
        "z_precision='bfloat16' on a %s without fast bfloat16 (no AVX-512 BF16 / AMX): the "
        "value optimisation will be far slower than float32; pass z_precision='float32'", device)


def _adam_step(
    optimizer: torch.optim.Optimizer, delta: torch.Tensor, loss: torch.Tensor,
    done: torch.Tensor, v_norms: list[torch.Tensor], clamp: float,
) -> None:
    """One Adam step; finished requests keep their delta; every delta stays in its ball."""
    (grad,) = torch.autograd.grad(loss, [delta])
    delta.grad = grad
    frozen = delta.detach()[done].clone() if bool(done.any()) else None
    optimizer.step()
    with torch.no_grad():
        if frozen is not None:
            delta[done] = frozen
        for r in range(delta.shape[0]):
            norm, max_norm = delta[r].norm(), clamp * v_norms[r]
            if norm > max_norm:
                delta[r].mul_(max_norm / norm)
