"""Health of a model under a sequence of edits: update norms, weight growth, fluency.

Sequential editing degrades a model gradually (the edited weights drift away from the base
weights) and sometimes at once: Gupta et al. 2024 ("Model Editing at Scale leads to Gradual and
Catastrophic Forgetting") find *disabling edits*, single updates whose norm is far above the
others', after which the model generates repetitive text and loses most of its abilities. One
such edit silently ruins every later measurement of a sequence, so it must be caught when it
happens. This module measures, for an edit applied on a model:

* per edited weight (site): the update's size relative to the weight it changes,
  ``||Delta||_F / ||W||_F`` (``W``: the weight before this edit, earlier edits included), and the
  growth of the edited weight relative to the BASE weight, ``||W_now||_F / ||W_base||_F`` (the
  unedited weight, read exactly through :func:`rome_lens.edits.base_weights`);
* fluency: the mean n-gram entropy (:func:`rome_lens.evaluation.n_gram_entropy`) of seeded
  generations from a few fixed generic prompts (:func:`rome_lens.sampling.sample_tokens`), and
  the perplexity of a short neutral paragraph shipped with the package (:func:`held_out_text`);

and compares them with the unedited model, measured once under ``base_weights``.
:class:`HealthMonitor` keeps the history of a sequence and flags a disabling edit, with a
``logging`` warning and the reasons recorded in the :class:`EditHealth` value, when its update
is far larger than the median of the earlier ones, or generation collapses to repetition, or
the perplexity blows up (the thresholds are the monitor's fields).

Example:
    >>> monitor = HealthMonitor()
    >>> edit = rome_lens.compute_edit(model, request, method="ft-l", layer=1)
    >>> with edit.applied(model):
    ...     health = monitor.check(model, edit)
    >>> health
    EditHealth(#0 ...: update ... of ||W||, growth ..., entropy .../..., perplexity .../...)
    >>> health.flagged, health.reasons
    (False, ())
    >>> monitor
    HealthMonitor(1 edit checked, 0 flagged)
"""

from __future__ import annotations

import logging
import math
import statistics
from dataclasses import asdict, dataclass, field, fields, replace
from importlib import resources
from typing import Any

import torch
from jaxtyping import Int

from rome_lens._typing import Model
from rome_lens.edits import Edit, base_fingerprint, base_weights
from rome_lens.errors import FingerprintMismatchError, InvalidRequestError, NonFiniteError
from rome_lens.evaluation import n_gram_entropy
from rome_lens.models import access
from rome_lens.sampling import sample_tokens

logger = logging.getLogger(__name__)

#: Generic prompts the fluency check continues (no facts, no named entities).
DEFAULT_PROMPTS: tuple[str, ...] = (
    "The weather today is",
    "My favourite book is about",
    "In the morning, the children",
    "Scientists have recently found that",
)


def held_out_text() -> str:
    """The neutral paragraph whose perplexity the health check measures (``heldout.txt``)."""
    path = resources.files("rome_lens.audit").joinpath("heldout.txt")
    return path.read_text(encoding="utf-8").strip()


def held_out_tokens(
    model: Model, text: str | None = None, max_tokens: int = 256
) -> Int[torch.Tensor, " pos"]:
    """Token ids of ``text`` (default :func:`held_out_text`), cut to fit the context window.

    Example:
        >>> tokens = held_out_tokens(model, "A short text.")
        >>> int(tokens.shape[0]) >= 2
        True
    """
    text = held_out_text() if text is None else text
    tokens = model.to_tokens(text, truncate=False)[0]
    limit = min(int(max_tokens), int(model.cfg.n_ctx))
    if limit < 2 or tokens.shape[0] < 2:
        raise InvalidRequestError(f"perplexity needs at least 2 tokens, got {tokens.shape[0]} "
                                  f"(max_tokens={max_tokens})")
    return tokens[:limit]


@torch.no_grad()
def perplexity(model: Model, tokens: Int[torch.Tensor, " pos"], chunk: int = 64) -> float:
    """Perplexity of ``model`` on ``tokens`` (exp of the mean next-token NLL).

    Logits are decoded ``chunk`` positions at a time, so ``[pos, d_vocab]`` is never held for a
    large vocabulary. Returns ``inf`` when the model's logits are not finite.

    Example:
        >>> perplexity(model, held_out_tokens(model, "A short text.")) > 1.0
        True
    """
    tokens = tokens.to(model.cfg.device)
    resid = access.final_residual(model, tokens[None])[0, :-1]
    targets = tokens[1:]
    total = 0.0
    for start in range(0, targets.shape[0], chunk):
        logp = access.decode_residual(model, resid[start : start + chunk]).float().log_softmax(-1)
        total -= float(logp.gather(-1, targets[start : start + chunk, None]).sum())
    mean = total / targets.shape[0]
    return math.exp(mean) if math.isfinite(mean) else math.inf


def generation_entropy(
    model: Model,
    prompts: tuple[str, ...] = DEFAULT_PROMPTS,
    n_tokens: int = 30,
    *,
    top_k: int | None = 5,
    seed: int = 0,
) -> float:
    """Mean n-gram entropy of one seeded generation per prompt (low: repetitive text).

    Example:
        >>> generation_entropy(model, ("The weather today is",), n_tokens=10) >= 0.0
        True
    """
    assert model.tokenizer is not None
    values = []
    for i, prompt in enumerate(prompts):
        ids = sample_tokens(model, 1, n_tokens, top_k=top_k, seed=seed + i, prompt=prompt)
        values.append(n_gram_entropy(str(model.tokenizer.decode(ids[0].tolist()))))
    return statistics.fmean(values)


@dataclass(frozen=True)
class SiteHealth:
    """Norms of one edited weight (Frobenius norms, computed in float32).

    Attributes:
        name: the weight (``blocks.L.mlp.W_out``).
        update_norm: ``||Delta||`` of this edit's change of the weight.
        weight_norm: ``||W||`` before this edit (the other applied edits included).
        edited_norm: ``||W_now||`` with the edit applied.
        base_norm: ``||W_base||`` of the unedited weight.
    """

    name: str
    update_norm: float
    weight_norm: float
    edited_norm: float
    base_norm: float

    @property
    def relative_update(self) -> float:
        """``||Delta|| / ||W||``: the update's size relative to the weight it changes."""
        return self.update_norm / self.weight_norm if self.weight_norm > 0 else math.inf

    @property
    def growth(self) -> float:
        """``||W_now|| / ||W_base||``: how far the edited weight has grown from the base."""
        return self.edited_norm / self.base_norm if self.base_norm > 0 else math.inf


def site_health(model: Model, edit: Edit) -> tuple[SiteHealth, ...]:
    """Norms of every site of ``edit``, which must be applied to ``model``."""
    now = {site.name: access.read_mlp_out(model, site.layer).float() for site in edit.sites}
    with base_weights(model):
        base = {site.name: float(access.read_mlp_out(model, site.layer).float().norm())
                for site in edit.sites}
    found = []
    for site in edit.sites:
        delta = site.delta().float().to(now[site.name].device)
        found.append(SiteHealth(
            name=site.name,
            update_norm=float(delta.norm()),
            weight_norm=float((now[site.name] - delta).norm()),
            edited_norm=float(now[site.name].norm()),
            base_norm=base[site.name],
        ))
    return tuple(found)


@dataclass(frozen=True)
class Fluency:
    """Fluency of a model state: generation entropy and held-out perplexity (``None``: off)."""

    entropy: float | None = None
    perplexity: float | None = None


@dataclass(frozen=True, repr=False)
class EditHealth:
    """The health record of one edit of a sequence.

    Attributes:
        edit_id: the edit's id.
        step: its position in the monitor's history when checked (0: the first edit).
        sites: norms per edited weight.
        fluency: generation entropy and perplexity with the edit (and every earlier one) applied.
        baseline: the same for the unedited model.
        reasons: why the edit is flagged as disabling (empty: healthy).
    """

    edit_id: str
    step: int
    sites: tuple[SiteHealth, ...]
    fluency: Fluency = field(default_factory=Fluency)
    baseline: Fluency = field(default_factory=Fluency)
    reasons: tuple[str, ...] = ()

    @property
    def flagged(self) -> bool:
        """Whether the edit was flagged as disabling."""
        return bool(self.reasons)

    @property
    def relative_update(self) -> float:
        """The largest ``||Delta|| / ||W||`` over the sites."""
        return max(site.relative_update for site in self.sites)

    @property
    def growth(self) -> float:
        """The largest ``||W_now|| / ||W_base||`` over the sites."""
        return max(site.growth for site in self.sites)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (:meth:`from_dict` reads it back)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EditHealth:
        """Rebuild a record written by :meth:`to_dict`."""
        return cls(
            edit_id=str(data["edit_id"]),
            step=int(data["step"]),
            sites=tuple(SiteHealth(**site) for site in data["sites"]),
            fluency=Fluency(**data.get("fluency", {})),
            baseline=Fluency(**data.get("baseline", {})),
            reasons=tuple(str(r) for r in data.get("reasons", ())),
        )

    def __repr__(self) -> str:
        parts = [f"update {self.relative_update:.3g} of ||W||", f"growth {self.growth:.4g}"]
        for name in ("entropy", "perplexity"):
            now, base = getattr(self.fluency, name), getattr(self.baseline, name)
            if now is not None:
                parts.append(f"{name} {now:.3g}/{base:.3g}" if base is not None
                             else f"{name} {now:.3g}")
        if self.reasons:
            parts.append("FLAGGED: " + "; ".join(self.reasons))
        return f"EditHealth(#{self.step} {self.edit_id[:8]}: {', '.join(parts)})"


@dataclass(repr=False)
class HealthMonitor:
    """Checks every edit of a sequence and flags disabling edits (thresholds are fields).

    An edit is flagged, with a ``logging`` warning and its reasons in
    :attr:`EditHealth.reasons`, when any of these hold:

    * its ``||Delta|| / ||W||`` (largest over its sites) exceeds ``norm_factor`` times the median
      of the earlier edits' (once ``min_history`` earlier edits were checked);
    * its ``||Delta|| / ||W||`` exceeds ``max_relative_update`` (any edit, even the first);
    * an edited weight's ``||W_now|| / ||W_base||`` exceeds ``max_growth`` (off by default);
    * the generations' n-gram entropy falls below ``entropy_fraction`` times the unedited
      model's (generation collapsing to repetition);
    * the held-out perplexity exceeds ``perplexity_factor`` times the unedited model's.

    Attributes:
        norm_factor: an update this many times the median of the earlier ones is disabling.
        min_history: earlier edits needed before the median rule applies.
        max_relative_update: an update larger than this fraction of its weight is disabling
            (``None``: no absolute limit).
        max_growth: limit on ``||W_now|| / ||W_base||`` (``None``: recorded, never flagged).
        entropy_fraction: flag when the entropy falls below this fraction of the unedited one.
        perplexity_factor: flag when the perplexity exceeds this multiple of the unedited one.
        fluency: measure generations and perplexity (``False``: norms only, no forward passes).
        prompts: the generic prompts continued by the fluency check.
        n_tokens: tokens generated per prompt.
        top_k: sampling among the k most likely tokens (``None``: the full distribution).
        seed: seed of the generations (the same for every check, so they differ only by edits).
        text: held-out text of the perplexity check (``None``: :func:`held_out_text`).
        max_tokens: the held-out text is cut to this many tokens.
        history: the records, in the order checked.
        baseline: the unedited model's fluency (measured at the first check).
    """

    norm_factor: float = 8.0
    min_history: int = 2
    max_relative_update: float | None = 1.0
    max_growth: float | None = None
    entropy_fraction: float = 0.5
    perplexity_factor: float = 3.0
    fluency: bool = True
    prompts: tuple[str, ...] = DEFAULT_PROMPTS
    n_tokens: int = 30
    top_k: int | None = 5
    seed: int = 0
    text: str | None = None
    max_tokens: int = 256
    history: list[EditHealth] = field(default_factory=list, init=False)
    baseline: Fluency | None = field(default=None, init=False)
    _model_fingerprint: str | None = field(default=None, init=False)
    _tokens: torch.Tensor | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if self.norm_factor <= 1 or self.min_history < 1 or not 0 < self.entropy_fraction < 1:
            raise InvalidRequestError(
                "HealthMonitor needs norm_factor > 1, min_history >= 1 and 0 < entropy_fraction "
                f"< 1; got {self.norm_factor}, {self.min_history}, {self.entropy_fraction}"
            )
        if self.perplexity_factor <= 1 or self.n_tokens < 2 or not self.prompts:
            raise InvalidRequestError(
                "HealthMonitor needs perplexity_factor > 1, n_tokens >= 2 and at least one "
                f"prompt; got {self.perplexity_factor}, {self.n_tokens}, {self.prompts!r}"
            )

    def settings(self) -> dict[str, Any]:
        """The thresholds and measurement settings (JSON-able; ``HealthMonitor(**settings)``)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.init}

    @property
    def flagged(self) -> list[EditHealth]:
        """The records of the edits flagged as disabling."""
        return [record for record in self.history if record.flagged]

    def measure(self, model: Model) -> Fluency:
        """Fluency of the model as it is now (every applied edit included)."""
        if not self.fluency:
            return Fluency()
        if self._tokens is None:
            self._tokens = held_out_tokens(model, self.text, self.max_tokens)
        try:
            entropy = generation_entropy(model, tuple(self.prompts), self.n_tokens,
                                         top_k=self.top_k, seed=self.seed)
        except NonFiniteError:
            entropy = 0.0  # logits are NaN or infinite: the model generates nothing usable
        return Fluency(entropy, perplexity(model, self._tokens))

    def measure_baseline(self, model: Model) -> Fluency:
        """The unedited model's fluency, measured once under ``base_weights``.

        Raises:
            FingerprintMismatchError: the monitor's history belongs to another base model.
        """
        fingerprint = base_fingerprint(model)
        if self._model_fingerprint not in (None, fingerprint):
            raise FingerprintMismatchError(
                f"this HealthMonitor checks the model with base fingerprint "
                f"{self._model_fingerprint}; got one with {fingerprint} (use a new monitor)"
            )
        if self.baseline is None:
            with base_weights(model):
                self.baseline = self.measure(model)
            self._model_fingerprint = fingerprint
            logger.info("health baseline of the unedited model: %s", self.baseline)
        return self.baseline

    def check(self, model: Model, edit: Edit) -> EditHealth:
        """Measure ``edit`` on ``model``, record it in :attr:`history`, warn if disabling.

        The model is measured with ``edit`` and every other applied edit; an edit that is not
        applied is applied for the check and reverted after it.

        Returns:
            The record (also appended to :attr:`history`).
        """
        if not edit.is_applied(model):
            with edit.applied(model):
                return self.check(model, edit)
        baseline = self.measure_baseline(model)
        record = EditHealth(edit.id, len(self.history), site_health(model, edit),
                            self.measure(model), baseline)
        record = replace(record, reasons=self.reasons(record))
        self.history.append(record)
        if record.flagged:
            logger.warning("disabling edit %s (step %d): %s", edit.id, record.step,
                           "; ".join(record.reasons))
        return record

    def reasons(self, record: EditHealth) -> tuple[str, ...]:
        """Why ``record`` is disabling, judged against the edits checked before it."""
        found = list(self._norm_reasons(record))
        now, base = record.fluency, record.baseline
        if now.entropy is not None and base.entropy is not None and base.entropy > 0 \
                and now.entropy < self.entropy_fraction * base.entropy:
            found.append(f"generation collapsing to repetition: n-gram entropy "
                         f"{now.entropy:.3g} < {self.entropy_fraction} x unedited "
                         f"{base.entropy:.3g}")
        if now.perplexity is not None and base.perplexity is not None \
                and not now.perplexity <= self.perplexity_factor * base.perplexity:
            found.append(f"perplexity blow-up: {now.perplexity:.4g} > "
                         f"{self.perplexity_factor} x unedited {base.perplexity:.4g}")
        return tuple(found)

    def _norm_reasons(self, record: EditHealth) -> list[str]:
        found = []
        size = record.relative_update
        earlier = [r.relative_update for r in self.history if r.edit_id != record.edit_id]
        if len(earlier) >= self.min_history:
            median = statistics.median(earlier)
            if median > 0 and size > self.norm_factor * median:
                found.append(f"update norm {size / median:.3g}x the median of the "
                             f"{len(earlier)} earlier updates ({size:.3g} vs {median:.3g} "
                             f"of ||W||; limit {self.norm_factor}x)")
        if self.max_relative_update is not None and size > self.max_relative_update:
            found.append(f"update norm {size:.3g} of ||W|| > {self.max_relative_update}")
        if self.max_growth is not None and record.growth > self.max_growth:
            found.append(f"weight norm grew {record.growth:.4g}x from the base weights "
                         f"(> {self.max_growth})")
        return found

    def forget(self, edit_id: str) -> None:
        """Drop the records of an edit (it was reverted; later medians no longer count it)."""
        self.history = [record for record in self.history if record.edit_id != edit_id]

    def to_dataframe(self) -> Any:
        """The history as a ``pandas.DataFrame``, one row per edit."""
        import pandas as pd

        return pd.DataFrame([{
            "step": r.step, "edit_id": r.edit_id, "relative_update": r.relative_update,
            "growth": r.growth, "entropy": r.fluency.entropy, "perplexity": r.fluency.perplexity,
            "flagged": r.flagged, "reasons": "; ".join(r.reasons),
        } for r in self.history])

    def __repr__(self) -> str:
        n = len(self.history)
        return (f"HealthMonitor({n} edit{'' if n == 1 else 's'} checked, "
                f"{len(self.flagged)} flagged)")
