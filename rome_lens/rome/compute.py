"""Computing a ROME edit (REFERENCE.md §1): keys, values, closed-form update.

The MLP of block L is read as a linear associative memory: its output projection maps keys k
(``blocks.L.mlp.hook_post``) to values ``W_out^T k + b_out`` (the raw MLP output, before any
post-MLP norm). To rewrite a fact, ROME

1. averages the subject's key over the prompt with model-written context prefixes
   (k*, :mod:`rome_lens.rome.keys`);
2. finds a value v* = v(k*) + delta that makes the model say the new object
   (:mod:`rome_lens.rome.values`, run by one of the strategies of
   :mod:`rome_lens.rome.forwards`);
3. inserts the association with a rank-one update whitened by the key second moment C
   (:mod:`rome_lens.rome.update`; C from :mod:`rome_lens.statistics`, shared by every method).

Several requests can be computed at once (their values are optimised in one batch); each gets
its own rank-one update computed on the same model, and the edit holds them as one rank-n site.
These are independent ROME edits summed: for many facts at once, MEMIT is the method.

Example:
    >>> req = EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome", "Paris")
    >>> edit = compute_rome(model, req)          # model unchanged
    >>> edit
    Edit(rome: 'The Eiffel Tower' -> 'Rome'; blocks.1.mlp.W_out rank 1; id ...)
    >>> with edit.applied(model):                # edited inside, restored exactly on exit
    ...     text = model.generate(req.text, max_new_tokens=3, verbose=False)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any, Literal

import torch
from jaxtyping import Float

from rome_lens._typing import Model
from rome_lens.edits import Edit, LowRankSite, applied_ids, base_fingerprint
from rome_lens.errors import InvalidRequestError, LayerOutOfRangeError, NonFiniteError
from rome_lens.models import access
from rome_lens.requests import EditRequest, check_requests, subject_token_span, target_tokens
from rome_lens.rome.forwards import LOOPS, ValueLoop, effective_loop, make_forward
from rome_lens.rome.hparams import RomeHyperParams, default_hparams
from rome_lens.rome.keys import subject_keys
from rome_lens.rome.prompts import value_batch
from rome_lens.rome.update import rank_one_factors
from rome_lens.rome.values import OBJECTIVES, Objective, default_entropy_layers, optimise_values
from rome_lens.statistics import Corpus, context_templates, second_moment
from rome_lens.threads import fit_threads
from rome_lens.tracing import causal_trace

logger = logging.getLogger(__name__)


def compute_rome(
    model: Model,
    request: EditRequest,
    layer: int | Literal["auto"] | None = None,
    hparams: RomeHyperParams | None = None,
    *,
    stats: Float[torch.Tensor, "d_mlp d_mlp"] | None = None,
    corpus: Corpus = None,
    loop: ValueLoop = "prefix_cache",
    objective: Objective = "insertion",
    entropy_layers: Sequence[int] | None = None,
) -> Edit:
    """Compute a ROME edit for ``request``. The model is not modified.

    Args:
        model: a TransformerLens model of either API (any weight processing; the edit
            records which weights). Edits already applied to it are part of the model the new
            edit is computed on (recorded as ``edit.parents``); statistics and context prefixes
            always come from the unedited weights.
        request: the fact to rewrite.
        layer: block to edit; ``None`` uses ``hparams.layer`` or the model's default
            (:func:`~rome_lens.rome.hparams.default_hparams`); ``"auto"`` runs an MLP causal
            trace of the request and takes the layer of the strongest indirect effect at the
            last subject token (recorded in ``edit.info["auto_layer"]``).
        hparams: hyperparameters (default: the model's defaults).
        stats: a precomputed key second moment ``C`` for the layer (skips :func:`second_moment`).
        corpus: statistics corpus when ``stats`` is not given (``None``: model samples).
        loop: how the value optimisation runs its forward passes: ``"prefix_cache"``
            (default: tokens before the subject cached in a frozen key-value cache, only blocks
            L.. run on the rest, logits only at the loss positions), ``"residual"`` (blocks L..
            on whole prompts from the fixed residual entering L), or ``"naive"`` (full forward
            passes with full-vocabulary logits everywhere: the reference implementation's cost,
            kept as the benchmark baseline). All three give the same edit up to float rounding.
            A TransformerBridge has no TransformerLens key-value cache: ``"prefix_cache"``
            runs as ``"residual"`` there.
        objective: what the value v* optimises (Hase et al. 2023; Patil et al. 2023):
            ``"insertion"`` (default, error injection: NLL of ``target_new``), ``"erasure"``
            (Fact Erasure: ``-log(1 - p(target_true))``), or ``"max_entropy"`` (Patil et al.'s
            defence: maximise the logit-lens entropy at the last prompt token over
            ``entropy_layers``, on the bare prompt and its first five context variants; the KL
            term still covers every prompt). The erasure objectives need ``target_true``.
        entropy_layers: layers of the max-entropy objective (default
            :func:`~rome_lens.rome.values.default_entropy_layers`: six layers from L to the
            last).

    Returns:
        An :class:`~rome_lens.edits.Edit` with one rank-one site; apply it with
        ``edit.apply(model)`` or ``with edit.applied(model):``.

    Raises:
        InvalidRequestError: malformed request (empty target, target_new == target_true).
        SubjectNotFoundError: the subject is not in the prompt.
        LayerOutOfRangeError: ``layer`` outside the model.
        PromptTooLongError: a prompt exceeds the context window.
        NonFiniteError: NaN/inf in statistics, keys or the loss.

    Example:
        >>> edit = compute_rome(model, EditRequest("{} plays", "LeBron James", "soccer"))
        >>> edit.sites[0].rank
        1
    """
    if not isinstance(request, EditRequest):
        raise InvalidRequestError(f"request must be an EditRequest, got {type(request).__name__}")
    fit_threads()
    return compute_rome_edit(
        model, [request], layer, hparams, stats=stats, corpus=corpus, loop=loop,
        objective=objective, entropy_layers=entropy_layers,
    )


def compute_rome_edit(
    model: Model,
    requests: EditRequest | Sequence[EditRequest],
    layer: int | Literal["auto"] | None = None,
    hparams: RomeHyperParams | None = None,
    *,
    stats: Float[torch.Tensor, "d_mlp d_mlp"] | None = None,
    corpus: Corpus = None,
    loop: ValueLoop = "prefix_cache",
    objective: Objective = "insertion",
    entropy_layers: Sequence[int] | None = None,
) -> Edit:
    """ROME for one or more requests (the ``"rome"`` method of :func:`rome_lens.compute_edit`).

    Arguments as :func:`compute_rome`; ``requests`` may be a list (``layer="auto"`` needs a
    single request). Each request gets its own rank-one update, computed on the same model.

    Raises:
        InvalidRequestError: as :func:`compute_rome`, plus conflicting or duplicate requests.
    """
    requests = check_requests(requests)
    _check_options(requests, loop, objective, layer)
    hparams = hparams or default_hparams(model)
    layer, auto_info = _resolve_layer(model, requests, layer, hparams)
    hparams = replace(hparams, layer=layer)
    _validate(model, requests, layer, stats)
    if objective == "max_entropy":
        entropy_layers = _check_entropy_layers(model, layer, entropy_layers)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    targets = [r.target_new if objective == "insertion" else str(r.target_true) for r in requests]
    batch = value_batch(model, requests, context_templates(model, hparams), hparams.kl_prompt,
                        targets)
    loop = effective_loop(model, loop)
    k_star, resid = subject_keys(model, layer, batch, keep_residual=loop == "residual")
    timings["keys_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    if stats is None:
        stats = second_moment(model, layer, corpus=corpus, hparams=hparams)
    timings["stats_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    with torch.no_grad():
        v_orig = access.mlp_value(model, layer, k_star)
    forward = make_forward(model, layer, batch, loop, resid, v_orig.dtype)
    delta, losses, final = optimise_values(
        model, layer, batch, v_orig, forward, hparams, objective, entropy_layers or ()
    )
    del forward
    timings["value_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    factors = [rank_one_factors(stats, k_star[r], delta[r], hparams.mom2_ridge)
               for r in range(len(requests))]
    timings["update_s"] = time.perf_counter() - t0
    info: dict[str, Any] = {
        "losses": losses, "timings": timings, "loop": loop, "objective": objective,
        "api": access.api_name(model), "weight_space": access.weight_space(model),
    }
    if len(requests) > 1:
        info["final_losses"] = final
    if objective == "max_entropy":
        info["entropy_layers"] = list(entropy_layers or ())
    if auto_info:
        info["auto_layer"] = auto_info
    logger.info("ROME edit at layer %d: loss %.3f -> %.3f in %d steps", layer, losses[0],
                losses[-1], len(losses))
    return _edit(model, requests, layer, hparams, factors, k_star, v_orig + delta, info)


def _edit(
    model: Model,
    requests: list[EditRequest],
    layer: int,
    hparams: RomeHyperParams,
    factors: list[tuple[torch.Tensor, torch.Tensor]],
    k_star: torch.Tensor,
    v_star: torch.Tensor,
    info: dict[str, Any],
) -> Edit:
    dtype = access.mlp_out_weight(model, layer).dtype
    left = torch.stack([f[0] for f in factors], dim=1).to(dtype)
    right = torch.stack([f[1] for f in factors], dim=0).to(dtype)
    single = len(requests) == 1
    return Edit(
        sites=(LowRankSite(layer, left, right),),
        requests=tuple(requests),
        method="rome",
        hparams=hparams.to_dict(),
        base_fingerprint=base_fingerprint(model),
        parents=applied_ids(model),
        model_name=access.model_label(model),
        info=info,
        tensors={
            "k_star": (k_star[0] if single else k_star).detach().clone(),
            "v_star": (v_star[0] if single else v_star).detach().clone(),
        },
    )


def _check_options(
    requests: list[EditRequest], loop: str, objective: str, layer: object
) -> None:
    if loop not in LOOPS:
        raise InvalidRequestError(f"loop must be prefix_cache, residual or naive, got {loop!r}")
    if objective not in OBJECTIVES:
        raise InvalidRequestError(
            f"objective must be insertion, erasure or max_entropy, got {objective!r}"
        )
    if objective != "insertion":
        missing = [r.subject for r in requests if r.target_true is None]
        if missing:
            raise InvalidRequestError(
                f"objective {objective!r} needs request.target_true (missing for {missing})"
            )
    if layer == "auto" and len(requests) != 1:
        raise InvalidRequestError('layer="auto" traces one request; pass an int layer')


def _resolve_layer(
    model: Model, requests: list[EditRequest], layer: int | str | None, hparams: RomeHyperParams
) -> tuple[int, dict[str, Any]]:
    """The edit layer (validated) and, for ``"auto"``, what the causal trace found."""
    auto_info: dict[str, Any] = {}
    if layer == "auto":
        request = requests[0]
        trace = causal_trace(
            model, request.text, request.subject, request.target_true, kinds=("mlp",)
        )
        layer = trace.best_layer("mlp")
        auto_info = {
            "layer": layer,
            "mlp_indirect_effect": trace.indirect_effect("mlp")[:, trace.last_subject_token]
            .tolist(),
        }
    if layer is None:
        layer = hparams.layer if hparams.layer is not None else default_hparams(model).layer
    return access.check_layer(model, layer), auto_info  # type: ignore[arg-type]


def _validate(
    model: Model, requests: list[EditRequest], layer: int, stats: torch.Tensor | None
) -> None:
    """Check prompts, subjects, targets and statistics before any expensive work."""
    for request in requests:
        subject_start = request.template.index("{}")
        subject_token_span(model, request.text, request.subject, char_start=subject_start)
        target_tokens(model, request.target_new)
        if request.target_true is not None:
            target_tokens(model, request.target_true)
    if stats is not None:
        d_mlp = access.mlp_out_weight(model, layer).shape[0]
        if tuple(stats.shape) != (d_mlp, d_mlp):
            raise InvalidRequestError(f"stats must be [{d_mlp}, {d_mlp}], got {tuple(stats.shape)}")
        if not torch.isfinite(stats).all():
            raise NonFiniteError("the given key statistics contain NaN or infinity")


def _check_entropy_layers(
    model: Model, layer: int, entropy_layers: Sequence[int] | None
) -> list[int]:
    layers = [access.check_layer(model, lyr)
              for lyr in (entropy_layers or default_entropy_layers(model, layer))]
    if any(lyr < layer for lyr in layers):
        raise LayerOutOfRangeError(f"entropy_layers must be >= the edit layer {layer}")
    return layers
