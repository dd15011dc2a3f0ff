"""Computing a ROME edit: key k*, value v*, and the rank-one update (REFERENCE.md §1).

The MLP of block L is read as a linear associative memory: its output projection maps keys k
(``blocks.L.mlp.hook_post``) to values ``W_out^T k + b_out`` (the raw MLP output, before any
post-MLP norm). To rewrite a fact, ROME

1. averages the subject's key over the prompt with model-written context prefixes (k*);
2. finds a value v* = v(k*) + delta that makes the model say the new object, by optimising delta
   (added to the raw MLP output at the last subject token) against the new object's NLL, a KL
   term that keeps "{subject} is a" unchanged, and a weight decay, with delta's norm clamped;
3. inserts the association with a rank-one update whitened by the key second moment C:
   ``W' = W + (C^-1 k*) (v* - v(k*))^T / ((C^-1 k*)^T k*)``, so that ``W'^T k* + b = v*``.

The same averaged k* is used in every step (the r-ROME fix of Gupta et al. 2024), and the value
target is the mean-key output plus delta, so the update adds exactly the optimised delta at k*.

Speed: the residual entering block L does not depend on delta, so it is computed once and the
Adam loop runs only blocks L.., decoding logits only at the positions the loss reads. The naive
loop (``fast=False``: full forward passes with full-vocabulary logits at every position, as the
reference implementation does) is kept as the baseline for ``benchmarks/edit_speed.py``.

Example:
    >>> req = EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome", "Paris")
    >>> edit = compute_rome(model, req)          # model unchanged
    >>> with edit.applied(model):
    ...     model.generate("The Eiffel Tower is located in the city of", max_new_tokens=3)
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from jaxtyping import Float, Int

from rome_lens._typing import Model
from rome_lens.corpus_types import Corpus
from rome_lens.errors import InvalidRequestError, LayerOutOfRangeError, NonFiniteError
from rome_lens.models import access
from rome_lens.requests import EditRequest, subject_token_span, target_tokens
from rome_lens.rome.contexts import context_templates
from rome_lens.rome.edit import RomeEdit, base_fingerprint
from rome_lens.rome.hparams import RomeHyperParams, default_hparams
from rome_lens.rome.statistics import second_moment

logger = logging.getLogger(__name__)


@dataclass
class _Batch:
    """Right-padded prompts for the value optimisation.

    Rows ``[0, n_value)`` are context-prefixed edit prompts followed by the new target's tokens
    (teacher forcing); the remaining rows are KL prompts ("{subject} is a").
    """

    tokens: Int[torch.Tensor, "batch pos"]
    lengths: Int[torch.Tensor, " batch"]
    pad: int
    subject_last: Int[torch.Tensor, " batch"]
    n_value: int
    loss_rows: Int[torch.Tensor, " n_loss"]
    loss_positions: Int[torch.Tensor, " n_loss"]
    loss_targets: Int[torch.Tensor, " n_loss"]
    loss_weights: Float[torch.Tensor, " n_loss"]
    loss_first: torch.Tensor  # bool [n_loss]: the entry reads the last prompt token


def _build_batch(
    model: Model,
    request: EditRequest,
    templates: list[str],
    hparams: RomeHyperParams,
    target: str | None = None,
) -> _Batch:
    new_ids = target_tokens(model, target or request.target_new).tolist()
    subject_offset = request.template.index("{}")
    rows: list[list[int]] = []
    subject_last: list[int] = []
    loss_rows: list[int] = []
    loss_pos: list[int] = []
    loss_tgt: list[int] = []
    loss_w: list[float] = []
    loss_first: list[bool] = []
    for template in templates:
        prefix = template[: template.index("{}")]
        text = template.replace("{}", request.text)
        tokens, (_, end) = subject_token_span(
            model, text, request.subject, char_start=len(prefix) + subject_offset
        )
        ids = tokens.tolist() + new_ids[:-1]
        access.check_fits(model, len(ids), what="edit prompt with target")
        for j, tok in enumerate(new_ids):
            loss_rows.append(len(rows))
            loss_pos.append(int(tokens.shape[0]) - 1 + j)
            loss_tgt.append(tok)
            loss_w.append(1.0 / len(new_ids))
            loss_first.append(j == 0)
        rows.append(ids)
        subject_last.append(end - 1)
    n_value = len(rows)
    kl_text = hparams.kl_prompt.replace("{}", request.subject)
    tokens, (_, end) = subject_token_span(
        model, kl_text, request.subject, char_start=hparams.kl_prompt.index("{}")
    )
    rows.append(tokens.tolist())
    subject_last.append(end - 1)
    width = max(len(r) for r in rows)
    pad = 0
    if model.tokenizer is not None and model.tokenizer.pad_token_id is not None:
        pad = int(model.tokenizer.pad_token_id)
    padded = torch.full((len(rows), width), pad, dtype=torch.long)
    for i, r in enumerate(rows):
        padded[i, : len(r)] = torch.tensor(r)
    return _Batch(
        tokens=padded.to(model.cfg.device),
        lengths=torch.tensor([len(r) for r in rows]),
        pad=pad,
        subject_last=torch.tensor(subject_last),
        n_value=n_value,
        loss_rows=torch.tensor(loss_rows),
        loss_positions=torch.tensor(loss_pos),
        loss_targets=torch.tensor(loss_tgt),
        loss_weights=torch.tensor(loss_w),
        loss_first=torch.tensor(loss_first, dtype=torch.bool),
    )


def _subject_mask(batch: _Batch, dtype: torch.dtype) -> Float[torch.Tensor, "batch pos 1"]:
    mask = torch.zeros(batch.tokens.shape, dtype=dtype, device=batch.tokens.device)
    mask[torch.arange(mask.shape[0]), batch.subject_last.to(mask.device)] = 1.0
    return mask.unsqueeze(-1)


def _keys_and_residual(
    model: Model, layer: int, batch: _Batch, keep_residual: bool
) -> tuple[Float[torch.Tensor, " d_mlp"], Float[torch.Tensor, "batch pos d_model"] | None]:
    """k* (mean key at the last subject token of the value rows), and the residual entering L.

    One forward pass serves both; the residual is kept only when ``keep_residual``.
    """
    hook = access.key_hook_name(layer)
    resid_hook = access.resid_pre_hook_name(layer)
    wanted = (hook, resid_hook) if keep_residual else (hook,)
    with torch.no_grad():
        _, cache = model.run_with_cache(
            batch.tokens,
            names_filter=lambda name: name in wanted,
            stop_at_layer=layer + 1,
            attention_mask=torch.ones_like(batch.tokens),
        )
    rows = torch.arange(batch.n_value)
    keys = cache[hook][rows, batch.subject_last[: batch.n_value].to(cache[hook].device)]
    return keys.mean(0), cache[resid_hook] if keep_residual else None


def _nll_and_kl(
    batch: _Batch,
    logp_loss: Float[torch.Tensor, "n_loss d_vocab"],
    logp_kl: Float[torch.Tensor, "n_kl d_vocab"],
    init_kl: Float[torch.Tensor, "n_kl d_vocab"] | None,
    objective: str = "insertion",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The objective's term and the KL term.

    ``insertion``: NLL of the new object. ``erasure``: ``-log(1 - p(original))`` (bounded,
    zero when the original is gone). Weights average multi-token targets.
    """
    targets = batch.loss_targets.to(logp_loss.device)
    token_lp = logp_loss.gather(-1, targets[:, None])[:, 0]
    weights = batch.loss_weights.to(logp_loss.device)
    if objective == "insertion":
        nll = -(token_lp * weights).sum() / batch.n_value
    else:
        # -log(1 - p), computed stably from log p
        erase = -torch.log1p(-token_lp.exp().clamp(max=1 - 1e-6))
        nll = (erase * weights).sum() / batch.n_value
    if init_kl is None:
        kl = torch.zeros((), device=logp_loss.device)
    else:
        kl = (init_kl.exp() * (init_kl - logp_kl)).sum(-1).mean()
    return nll, kl


_ENTROPY_PROMPTS = 6  # prompts whose lens entropy the max-entropy objective raises (cost)

ValueLoop = Literal["prefix_cache", "residual", "naive"]


class _ValueForward:
    """One forward pass of the value optimisation: log-probs at the loss and KL positions.

    ``mask`` marks where delta is added to the raw MLP output (the last subject tokens), in the
    coordinates of the tensor the edit layer's MLP sees.
    """

    mask: torch.Tensor
    rows: torch.Tensor  # row and position of each picked entry (loss entries, then KL)
    pos: torch.Tensor

    def __call__(self) -> Float[torch.Tensor, "rows d_vocab"]:
        raise NotImplementedError


class _NaiveForward(_ValueForward):
    """Baseline: full forward passes from the tokens, full-vocabulary logits everywhere."""

    def __init__(self, model: Model, batch: _Batch, dtype: torch.dtype) -> None:
        self.model, self.batch = model, batch
        self.mask = _subject_mask(batch, dtype)
        self.rows, self.pos = _picked_positions(batch)

    def __call__(self) -> torch.Tensor:
        tokens = self.batch.tokens
        logits = self.model(tokens, attention_mask=torch.ones_like(tokens))
        return logits.log_softmax(-1)[self.rows, self.pos]


class _ResidualForward(_ValueForward):
    """The residual entering the edit layer is fixed: run only blocks L.., decode only loss rows."""

    def __init__(
        self, model: Model, layer: int, batch: _Batch, resid: torch.Tensor
    ) -> None:
        self.model, self.layer, self.resid = model, layer, resid
        self.mask = _subject_mask(batch, resid.dtype)
        self.rows, self.pos = _picked_positions(batch)

    def __call__(self) -> torch.Tensor:
        final = access.run_blocks_from(self.model, self.resid, self.layer)
        return access.decode_residual(self.model, final[self.rows, self.pos]).log_softmax(-1)


class _PrefixCacheForward(_ValueForward):
    """Like :class:`_ResidualForward`, and the tokens before the subject are not recomputed.

    Nothing before a row's last subject token depends on delta. Rows are left-padded so that
    every last subject token sits at one position P; the prefix ``[0, P)`` runs once through all
    layers into a frozen key-value cache, the suffix's residual entering layer L is computed
    once, and each step runs blocks L.. on the suffix only (typically a third of the tokens).
    """

    def __init__(self, model: Model, layer: int, batch: _Batch) -> None:
        from transformer_lens import TransformerLensKeyValueCache

        self.model, self.layer = model, layer
        device = batch.tokens.device
        subj = batch.subject_last.tolist()
        lengths = batch.lengths.tolist()
        n_rows, width_p = len(subj), max(subj)
        width_s = max(n - s for n, s in zip(lengths, subj, strict=True))
        pad = batch.pad
        prefix = torch.full((n_rows, width_p), pad, dtype=torch.long, device=device)
        suffix = torch.full((n_rows, width_s), pad, dtype=torch.long, device=device)
        prefix_mask = torch.zeros_like(prefix)
        suffix_mask = torch.zeros_like(suffix)
        for i, (n, s) in enumerate(zip(lengths, subj, strict=True)):
            prefix[i, width_p - s :] = batch.tokens[i, :s]
            prefix_mask[i, width_p - s :] = 1
            suffix[i, : n - s] = batch.tokens[i, s:n]
            suffix_mask[i, : n - s] = 1
        self.cache = TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device, n_rows)
        with torch.no_grad():
            model(prefix, past_kv_cache=self.cache, attention_mask=prefix_mask, return_type=None)
            self.cache.freeze()
            self.resid = model(
                suffix, past_kv_cache=self.cache, attention_mask=suffix_mask, stop_at_layer=layer
            )
        self.full_mask = torch.cat([prefix_mask, suffix_mask], dim=1)
        rows, pos = _picked_positions(batch)
        self.rows, self.pos = rows, pos - batch.subject_last.to(device)[rows]
        self.mask = torch.zeros(n_rows, width_s, 1, dtype=self.resid.dtype, device=device)
        self.mask[:, 0] = 1.0

    def __call__(self) -> torch.Tensor:
        final = self.model(
            self.resid,
            start_at_layer=self.layer,
            stop_at_layer=access.n_layers(self.model),
            past_kv_cache=self.cache,
            attention_mask=self.full_mask,
        )
        return access.decode_residual(self.model, final[self.rows, self.pos]).log_softmax(-1)


def _picked_positions(batch: _Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows and positions read by the loss: target positions first, then the KL positions."""
    device = batch.tokens.device
    kl_rows = torch.arange(batch.n_value, batch.tokens.shape[0])
    rows = torch.cat([batch.loss_rows, kl_rows]).to(device)
    pos = torch.cat([batch.loss_positions, batch.subject_last[batch.n_value :]]).to(device)
    return rows, pos


def compute_value_delta(
    model: Model,
    layer: int,
    batch: _Batch,
    v_orig: Float[torch.Tensor, " d_model"],
    forward: _ValueForward,
    hparams: RomeHyperParams,
    objective: str = "insertion",
    entropy_layers: Sequence[int] = (),
) -> tuple[Float[torch.Tensor, " d_model"], list[float]]:
    """Optimise delta (added to the raw MLP output at the last subject tokens).

    Args:
        model: the model (not modified).
        layer: edit layer.
        batch: value and KL prompts.
        v_orig: MLP output at k*, the scale of the clamp and weight decay.
        forward: how each step's forward pass is computed (see ``loop`` of
            :func:`compute_rome`).
        hparams: optimisation settings.
        objective: ``"insertion"``, ``"erasure"`` or ``"max_entropy"`` (see
            :func:`compute_rome`).
        entropy_layers: layers whose logit-lens entropy ``"max_entropy"`` maximises.

    Returns:
        ``(delta, losses)``: the optimised delta and the total loss at each step.

    Raises:
        NonFiniteError: if the loss becomes NaN or infinite.
    """
    delta = torch.zeros_like(v_orig, requires_grad=True)
    optimizer = torch.optim.Adam([delta], lr=hparams.v_lr)
    max_norm = hparams.clamp_norm_factor * v_orig.norm()
    n_loss = int(batch.loss_rows.shape[0])
    init_kl: torch.Tensor | None = None
    losses: list[float] = []

    def add_delta(out: torch.Tensor) -> torch.Tensor:
        return out + forward.mask * delta

    captured: dict[int, torch.Tensor] = {}
    capture_hooks: list[tuple[str | Callable[..., Any], Callable[..., Any]]] = [
        (access.resid_post_hook_name(lyr), _capture(captured, lyr))
        for lyr in (entropy_layers if objective == "max_entropy" else ())
    ]
    # max-entropy rows: the last prompt token of the bare prompt and the first few contexts
    first = batch.loss_first & (batch.loss_rows < _ENTROPY_PROMPTS)
    first_rows = forward.rows[:n_loss][first.to(forward.rows.device)]
    first_pos = forward.pos[:n_loss][first.to(forward.pos.device)]

    for step in range(max(1, hparams.v_num_grad_steps)):
        with access.raw_mlp_output_hook(model, layer, add_delta), model.hooks(capture_hooks):
            logp = forward()
        logp_loss, logp_kl = logp[:n_loss], logp[n_loss:]
        if init_kl is None:
            init_kl = logp_kl.detach().clone()
        if objective == "max_entropy":
            nll = _entropy_gap(model, [captured[lyr][first_rows, first_pos]
                                       for lyr in entropy_layers])
            kl = _nll_and_kl(batch, logp_loss, logp_kl, init_kl)[1]
        else:
            nll, kl = _nll_and_kl(batch, logp_loss, logp_kl, init_kl, objective)
        decay = hparams.v_weight_decay * delta.norm() / v_orig.norm() ** 2
        loss = nll + hparams.kl_factor * kl + decay
        value = float(loss.detach())
        losses.append(value)
        if not torch.isfinite(loss.detach()):
            raise NonFiniteError(f"ROME value loss is not finite at step {step}: {value}")
        logger.debug("v* step %d: loss %.4f (nll %.4f, kl %.4f)", step, value, nll, kl)
        if value < hparams.early_stop_loss or step == hparams.v_num_grad_steps - 1:
            break
        (grad,) = torch.autograd.grad(loss, [delta])
        delta.grad = grad
        optimizer.step()
        with torch.no_grad():
            norm = delta.norm()
            if norm > max_norm:
                delta.mul_(max_norm / norm)
    return delta.detach(), losses


def _capture(store: dict[int, torch.Tensor], layer: int) -> Callable[..., None]:
    def fn(act: torch.Tensor, hook: object = None) -> None:
        store[layer] = act

    return fn


def _entropy_gap(
    model: Model, states: list[Float[torch.Tensor, "rows d_model"]]
) -> torch.Tensor:
    """Mean over layers and rows of ``1 - H(logit lens) / log(V)`` (0 at maximum entropy)."""
    h = torch.cat(states)
    logp = access.decode_residual(model, h).log_softmax(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return (1.0 - entropy / math.log(logp.shape[-1])).mean()


Objective = Literal["insertion", "erasure", "max_entropy"]


def default_entropy_layers(model: Model, layer: int, count: int = 6) -> list[int]:
    """Up to ``count`` evenly spaced layers from ``layer`` to the last (the last included)."""
    last = access.n_layers(model) - 1
    if last - layer + 1 <= count:
        return list(range(layer, last + 1))
    step = (last - layer) / (count - 1)
    return sorted({round(layer + i * step) for i in range(count)})


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
) -> RomeEdit:
    """Compute a ROME edit for ``request``. The model is not modified.

    Args:
        model: a HookedTransformer (any weight processing; the edit records which weights).
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
            :func:`default_entropy_layers`: six layers from L to the last).

    Returns:
        A :class:`RomeEdit`; apply it with ``edit.apply(model)`` or ``with edit.applied(model)``.

    Raises:
        InvalidRequestError: malformed request (empty target, target_new == target_true).
        SubjectNotFoundError: the subject is not in the prompt.
        LayerOutOfRangeError: ``layer`` outside the model.
        PromptTooLongError: a prompt exceeds the context window.
        NonFiniteError: NaN/inf in statistics, keys or the loss.

    Example:
        >>> edit = compute_rome(model, EditRequest("{} plays", "LeBron James", "soccer"))
    """
    if not isinstance(request, EditRequest):
        raise InvalidRequestError(f"request must be an EditRequest, got {type(request).__name__}")
    if loop not in ("prefix_cache", "residual", "naive"):
        raise InvalidRequestError(f"loop must be prefix_cache, residual or naive, got {loop!r}")
    if objective not in ("insertion", "erasure", "max_entropy"):
        raise InvalidRequestError(
            f"objective must be insertion, erasure or max_entropy, got {objective!r}"
        )
    if objective != "insertion" and request.target_true is None:
        raise InvalidRequestError(f"objective {objective!r} needs request.target_true")
    hparams = hparams or default_hparams(model)
    auto_info: dict[str, object] = {}
    if layer == "auto":
        from rome_lens.tracing import causal_trace

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
    assert layer is not None and layer != "auto"
    layer = access.check_layer(model, layer)
    hparams = replace(hparams, layer=layer)
    # Validate the prompt, subject and target before any expensive work.
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

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    templates = context_templates(model, hparams)
    target = request.target_new if objective == "insertion" else request.target_true
    batch = _build_batch(model, request, templates, hparams, target)
    if objective == "max_entropy":
        entropy_layers = [
            access.check_layer(model, lyr)
            for lyr in (entropy_layers or default_entropy_layers(model, layer))
        ]
        if any(lyr < layer for lyr in entropy_layers):
            raise LayerOutOfRangeError(f"entropy_layers must be >= the edit layer {layer}")
    if loop == "prefix_cache" and access.is_bridge(model):
        loop = "residual"  # the bridge has no TransformerLens key-value cache
    k_star, resid = _keys_and_residual(model, layer, batch, keep_residual=loop == "residual")
    if not torch.isfinite(k_star).all():
        raise NonFiniteError(f"the subject's key at layer {layer} is not finite")
    timings["keys_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    if stats is None:
        stats = second_moment(model, layer, corpus=corpus, hparams=hparams)
    timings["stats_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    weight = access.mlp_out_weight(model, layer).detach()
    with torch.no_grad():
        v_orig = access.mlp_value(model, layer, k_star)
    forward: _ValueForward
    if loop == "prefix_cache":
        forward = _PrefixCacheForward(model, layer, batch)
    elif loop == "residual":
        assert resid is not None
        forward = _ResidualForward(model, layer, batch, resid)
    elif loop == "naive":
        forward = _NaiveForward(model, batch, v_orig.dtype)
    else:  # pragma: no cover - validated above
        raise AssertionError(loop)
    delta, losses = compute_value_delta(
        model, layer, batch, v_orig, forward, hparams, objective, entropy_layers or ()
    )
    del forward
    timings["value_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    left, right = rank_one_factors(stats, k_star, delta, hparams.mom2_ridge)
    timings["update_s"] = time.perf_counter() - t0
    edit = RomeEdit(
        layer=layer,
        left=left.to(weight.dtype),
        right=right.to(weight.dtype),
        k_star=k_star.detach().clone(),
        v_star=(v_orig + delta).detach().clone(),
        request=request,
        hparams=hparams,
        fingerprint=base_fingerprint(model),
        model_name=access.model_label(model),
        info={"losses": losses, "timings": timings, "loop": loop, "objective": objective,
              "api": access.api_name(model), "weight_space": access.weight_space(model)}
        | ({"entropy_layers": list(entropy_layers or ())} if objective == "max_entropy" else {})
        | ({"auto_layer": auto_info} if auto_info else {}),
    )
    logger.info(
        "ROME edit at layer %d: loss %.3f -> %.3f in %d steps", layer, losses[0], losses[-1],
        len(losses),
    )
    return edit


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
