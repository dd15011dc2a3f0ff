"""Spreading the residual over a range of layers (MEMIT's second step), one solve per layer.

For each layer l of the range, lowest first, with the updates of the layers below already
applied: the requests' keys ``K`` at l and the residual ``h`` leaving the last layer are
measured (averaged over each request's prompts), the remaining gap ``z - h`` is divided by the
number of layers left, and the layer's output weight gets the least-squares update that adds
that share at the keys (a *solver*: MEMIT's or AlphaEdit's).

Where the model normalises the MLP output before adding it to the residual stream (Gemma 2/3's
``ln2_post``), the wanted change of the residual is mapped back to a change of the RAW output at
each key (:func:`raw_change`), because that is what the weight produces.

Example:
    >>> values = torch.randn(6, model.cfg.d_model)    # raw MLP outputs: 2 requests x 3 prompts
    >>> wanted = torch.randn(6, model.cfg.d_model)    # the residual change each prompt needs
    >>> dm = raw_change(model, 1, values, wanted, torch.tensor([0, 0, 0, 1, 1, 1]))
    >>> dm.shape                                      # one change per request
    torch.Size([2, 32])
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float, Int
from tqdm.auto import tqdm

from rome_lens._typing import Model
from rome_lens.edits import DenseSite, Edit, LowRankSite, Site, base_fingerprint
from rome_lens.errors import NonFiniteError
from rome_lens.methods.targets import (
    RequestChunk,
    chunk_index,
    first_rows,
    request_means,
    subject_rows,
)
from rome_lens.models import access
from rome_lens.threads import fit_threads

logger = logging.getLogger(__name__)

PENALTY = 1e-2  # weight of ||dm||^2 / mean ||value||^2 in :func:`raw_change`

#: ``solver(layer, keys [n, d_mlp], R [n, d_model], preserve [d_mlp, d_mlp] | None)
#: -> (left [d_mlp, r], right [r, d_out])``; ``preserve``: a Gram matrix of keys whose output
#: must not change, added to the solve's normal equations
Solver = Callable[
    [int, Float[torch.Tensor, "n d_mlp"], Float[torch.Tensor, "n d_model"],
     Float[torch.Tensor, "d_mlp d_mlp"] | None],
    tuple[torch.Tensor, torch.Tensor],
]


@dataclass(frozen=True)
class SpreadOptions:
    """How :func:`spread` sets up each layer's solve (MEMIT's hyperparameters of the same names).

    Attributes:
        fit_rows: every prompt's key is a constraint of the solve (default: each request's mean
            key, as MEMIT).
        bare_weight: with ``fit_rows``, each request's bare edit prompt counts that many times in
            the solve and in the fit of its raw change (its key is what the edit prompt reads).
        other_weight: > 0 adds the keys after the subject (:func:`other_positions_gram`) to the
            solve as "no change" constraints of that weight.
        overshoot: the layers aim at ``h + overshoot (z - h)``, ``h`` the residual rows before
            the first update.

    Example:
        >>> SpreadOptions.from_hparams(rome_lens.MemitHyperParams(overshoot=1.2)).overshoot
        1.2
    """

    fit_rows: bool = False
    bare_weight: float = 1.0
    other_weight: float = 0.0
    overshoot: float = 1.0

    @classmethod
    def from_hparams(cls, hparams: Any) -> SpreadOptions:
        """The options of a MEMIT-style hyperparameter object (missing fields: the defaults)."""
        plain = cls()
        return cls(
            fit_rows=bool(getattr(hparams, "fit_rows", plain.fit_rows)),
            bare_weight=float(getattr(hparams, "bare_row_weight", plain.bare_weight)),
            other_weight=float(getattr(hparams, "other_positions_weight", plain.other_weight)),
            overshoot=float(getattr(hparams, "overshoot", plain.overshoot)),
        )


@dataclass
class Spread:
    """The sites of a many-edit update and what was measured on the way."""

    sites: list[Site] = field(default_factory=list)
    keys: dict[int, torch.Tensor] = field(default_factory=dict)
    residual_norms: list[float] = field(default_factory=list)
    fit_errors: list[float] = field(default_factory=list)


def raw_change(
    model: Model, layer: int, values: Float[torch.Tensor, "rows d_model"],
    wanted: Float[torch.Tensor, "rows d_model"], row_request: Int[torch.Tensor, " rows"],
    steps: int = 500, penalty: float = PENALTY,
    weights: Float[torch.Tensor, " rows"] | None = None,
) -> Float[torch.Tensor, "n d_model"]:
    """The change of each request's raw MLP output that adds ``wanted`` to its residuals.

    ``values`` are the raw MLP outputs at the last subject token of every prompt (row) of the
    requests and ``wanted`` the change each row's residual needs. Without a post-MLP map the
    change of a request is the mean of its rows' ``wanted``. With one (Gemma's ``ln2_post``,
    an RMSNorm ``f``), each request's change ``dm`` is fitted over its rows by L-BFGS from
    zero, ``f(value_r + dm) ~ f(value_r) + wanted_r``, with a small penalty
    ``penalty * ||dm||^2 / mean ||value||^2`` (an RMSNorm is scale-invariant). The fit is
    badly conditioned: 500 iterations bring the single-layer case to the optimised change
    (cosine 0.99 on gemma-3-270m; 100 iterations: 0.8). ``weights``: how much each row counts
    in its request's fit (default: all alike).
    """
    index = row_request.to(values.device)
    n = int(index.max()) + 1
    post = access.post_mlp(model, layer)
    w = torch.ones(len(index)) if weights is None else weights.float()
    w = w.to(values.device)[:, None]
    if post is None:
        return request_means(wanted.float() * w, index, n) / request_means(w, index, n)
    values = values.detach().float()
    target = (post(values).detach().float() + wanted.to(values.device).float())
    scale = float(values.pow(2).sum(-1).mean())
    with torch.enable_grad():
        dm = torch.zeros(n, values.shape[-1], device=values.device, requires_grad=True)
        opt = torch.optim.LBFGS([dm], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe",
                                tolerance_grad=1e-12, tolerance_change=1e-14)

        def closure() -> torch.Tensor:
            loss = ((post(values + dm[index]) - target) ** 2 * w).sum() / w.sum() * n
            loss = loss + penalty * (dm**2).sum() / scale
            (dm.grad,) = torch.autograd.grad(loss, [dm])
            return loss.detach()

        opt.step(closure)
    return dm.detach()


def make_site(
    layer: int, left: torch.Tensor, right: torch.Tensor, dtype: torch.dtype
) -> Site:
    """A low-rank site, or a dense one where the factors would be larger than the matrix."""
    d_in, rank, d_out = left.shape[0], left.shape[1], right.shape[1]
    if rank * (d_in + d_out) >= d_in * d_out:
        return DenseSite(layer, (left.double() @ right.double()).to(dtype))
    fresh = torch.contiguous_format
    return LowRankSite(layer, left.to(dtype).clone(memory_format=fresh),
                       right.to(dtype).clone(memory_format=fresh))


def partial_edit(model: Model, sites: Sequence[Site]) -> Edit:
    """``sites`` as one edit value without requests (to apply while measuring, then revert).

    Example:
        >>> site = DenseSite(1, torch.zeros(model.cfg.d_mlp, model.cfg.d_model))
        >>> partial_edit(model, [site]).method
        'partial'
    """
    return Edit(sites=tuple(sites), requests=(), method="partial",
                hparams={}, base_fingerprint=base_fingerprint(model))


def measure_rows(
    model: Model, chunks: Sequence[RequestChunk], layer: int, z_layer: int
) -> tuple[Float[torch.Tensor, "rows d_mlp"], Float[torch.Tensor, "rows d_model"],
           Int[torch.Tensor, " rows"]]:
    """Keys at ``layer`` and residuals leaving ``z_layer`` of every row, and the row index.

    All at each row's last subject token, on the model as it is now.

    Returns:
        ``(key rows, residual rows, row -> request index)`` over all chunks.
    """
    key_hook, out_hook = access.key_hook_name(layer), access.resid_post_hook_name(z_layer)
    keys, outs = [], []
    for chunk in chunks:
        picked = subject_rows(model, chunk, [key_hook, out_hook], z_layer + 1)
        keys.append(picked[key_hook].cpu())
        outs.append(picked[out_hook].cpu())
    return torch.cat(keys), torch.cat(outs), chunk_index(chunks)


def other_positions_gram(
    model: Model, chunks: Sequence[RequestChunk], layer: int
) -> tuple[Float[torch.Tensor, "d_mlp d_mlp"], int]:
    """``K^T K`` (float64) and count of the keys after the subject at ``layer``.

    The keys at every position after the last subject token of every value row (relation
    tokens, last prompt token, target tokens): an update meant for the subject token should
    write nothing there.

    Example:
        >>> from rome_lens.methods.targets import request_chunks
        >>> hp = rome_lens.MemitHyperParams(n_contexts_short=1, n_contexts_long=1)
        >>> gram, count = other_positions_gram(model, request_chunks(model, [request], hp), 1)
        >>> gram.shape == (model.cfg.d_mlp, model.cfg.d_mlp) and count > 0
        True
    """
    hook, gram, count = access.key_hook_name(layer), None, 0
    for chunk in chunks:
        batch = chunk.batch
        tokens = batch.tokens[: batch.n_value]
        with torch.no_grad():
            _, states = access.run_with_states(model, tokens, [hook], stop_at_layer=layer + 1,
                                               attention_mask=torch.ones_like(tokens))
        pos = torch.arange(tokens.shape[1])[None]
        after = (pos > batch.subject_last[: batch.n_value, None]) & (
            pos < batch.lengths[: batch.n_value, None])
        keys = states[hook][after.to(states[hook].device)].to("cpu", torch.float64)
        gram = keys.T @ keys if gram is None else gram + keys.T @ keys
        count += keys.shape[0]
    assert gram is not None
    return gram, count


def row_weights(index: Int[torch.Tensor, " rows"], bare_weight: float) -> torch.Tensor:
    """Weights of the rows of a ``fit_rows`` solve.

    Each request's bare prompt counts ``bare_weight`` times, its context rows once.

    Example:
        >>> row_weights(torch.tensor([0, 0, 1, 1]), 4.0)
        tensor([4., 1., 4., 1.])
    """
    weights = torch.ones(len(index))
    weights[first_rows(index)] = bare_weight
    return weights


def spread(
    model: Model,
    chunks: Sequence[RequestChunk],
    layers: Sequence[int],
    z_rows: Float[torch.Tensor, "rows d_model"],
    solver: Solver,
    options: SpreadOptions | None = None,
    progress: bool = True,
) -> Spread:
    """Update each layer of ``layers`` (ascending) towards the row targets of the last one.

    The model is not modified: the lower layers' updates are applied only while the keys and
    residuals of the next layer are measured (exactly reverted by the edit registry).
    ``options``: the solve's set-up (:class:`SpreadOptions`; default: MEMIT's).

    Raises:
        NonFiniteError: a key, residual or update is NaN or infinite.
    """
    opt, out = options or SpreadOptions(), Spread()
    z_layer, dtype = layers[-1], access.mlp_out_weight(model, layers[0]).dtype
    for i, layer in enumerate(tqdm(layers, desc="layer updates", disable=not progress)):
        fit_threads()  # per layer: each solve and fit runs for minutes at thousands of facts
        below = partial_edit(model, out.sites).applied(model) if out.sites else nullcontext()
        preserve = None
        with below:
            key_rows, now, index = measure_rows(model, chunks, layer, z_layer)
            if opt.other_weight > 0:
                preserve = opt.other_weight * other_positions_gram(model, chunks, layer)[0]
        n = int(index.max()) + 1
        if i == 0 and opt.overshoot != 1.0:
            z_rows = now + opt.overshoot * (z_rows.to(now.device) - now)
        keys = request_means(key_rows, index, n)
        wanted = (z_rows.to(now.device) - now) / (len(layers) - i)
        with torch.no_grad():
            values = access.mlp_value(model, layer, key_rows.to(model.cfg.device))
        weights = row_weights(index, opt.bare_weight) if opt.fit_rows else None
        change = raw_change(model, layer, values, wanted.to(values.device), index,
                            weights=weights).cpu()
        if not (torch.isfinite(key_rows).all() and torch.isfinite(change).all()):
            raise NonFiniteError(f"keys or residuals at layer {layer} are not finite")
        if opt.fit_rows:  # every prompt's key is a constraint, with its request's change
            assert weights is not None
            sqrt_w = weights.sqrt()[:, None]  # least squares weighted by w: rows times sqrt(w)
            left, right = solver(layer, key_rows * sqrt_w, change[index] * sqrt_w, preserve)
        else:
            left, right = solver(layer, keys, change, preserve)
        out.sites.append(make_site(layer, left, right, dtype))
        out.keys[layer] = keys.detach().cpu()
        out.residual_norms.append(float(request_means(wanted, index, n).norm(dim=-1).mean()))
        fit = keys.to(left.device, left.dtype) @ left @ right - change.to(left.device, left.dtype)
        out.fit_errors.append(float(fit.norm() / change.norm().clamp_min(1e-12)))
        logger.info("layer %d: mean residual share %.3f, relative fit error %.3f", layer,
                    out.residual_norms[-1], out.fit_errors[-1])
    return out
