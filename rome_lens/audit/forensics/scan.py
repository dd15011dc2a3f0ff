"""``scan``: find, read and reverse weight edits (REFERENCE.md §8, Youssef et al. 2025).

Two modes, chosen by what is known about the unedited model:

* **With base weights** (a second model, a state dict, or the model's own edit registry, which
  holds the exact unedited weights of every weight a rome_lens edit touched): every weight that
  differs is a finding with confidence 1. The difference ``D`` gets its numerical rank and
  singular values; for MLP output weights each component's value direction is decoded into
  tokens and ``D`` is matched against the candidate subjects' keys (the subject the change fires
  on most, see :mod:`rome_lens.audit.forensics.decode`). When a subject is named, the object is
  read from questions about it (``config.queries``): the tokens the change makes likelier there
  (the model with the finding's reversal applied is the model without the change).
* **Without them, with candidates** (at least ``config.match_min_candidates``): a matched
  filter. For every layer and candidate, ROME's update direction of the candidate's key
  (``u = C^-1 k``) and the weight's response along it; a candidate that stands out of the others
  by ``config.match_threshold`` (robust z) is named edited there (findings of mode
  ``"subject"``, :func:`~rome_lens.audit.forensics.spectrum.matched_subject_scores`). The change
  is the ROME-shaped update of the named subjects' keys, its value side fitted to the weight.
* **Without them**: each MLP output weight's spectrum is scored against the other layers' (a
  robust leave-one-out outlier score of its top components relative to its own bulk, see
  :mod:`rome_lens.audit.forensics.spectrum`); a layer whose top component(s) score at or above
  ``config.z_threshold`` is a finding. A second score looks where ROME-style updates
  (``u ~ C^-1 k*``) live: the layer's weight restricted to the key directions of least variance
  under the key statistics ``C`` (:func:`~rome_lens.statistics.second_moments`, every layer in
  one cached pass), whose top component stands out when an edit put it there
  (:func:`~rome_lens.audit.forensics.spectrum.key_subspace_scores`; ``config.key_threshold``;
  findings of mode ``"keys"``). Flagged components are decoded as above and removed by the
  reversal (an :class:`~rome_lens.edits.Edit`, so it applies and reverts exactly).

Example:
    >>> edit = rome_lens.compute_edit(model, request, hparams=hp, corpus=corpus).apply(model)
    >>> report = scan(model, candidates=["Bob Jones", "Alice Smith"])   # base: the registry
    >>> [(f.layer, f.rank, f.subjects[0][0]) for f in report.findings]
    [(1, 1, 'Alice Smith')]
    >>> report.findings[0].reversal            # applying it removes the change
    Edit(forensic-reversal: 0 requests; blocks.1.mlp.W_out rank 1; after 1 edits; id ...)
    >>> blind = scan(model, use_registry=False)     # the spectra alone
    >>> blind.mode
    'spectrum'
    >>> rome_lens.revert_all(model)
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from jaxtyping import Float

from rome_lens._typing import Model
from rome_lens.audit.forensics.decode import (
    direction_logits,
    firing,
    oriented_logits,
    reference_keys_at,
    subject_keys_at,
    top_strings,
)
from rome_lens.audit.forensics.report import (
    Component,
    Finding,
    Recovery,
    ScanConfig,
    ScanReport,
)
from rome_lens.audit.forensics.spectrum import (
    confidence_from_score,
    key_directions,
    key_subspace_scores,
    low_variance_basis,
    matched_subject_scores,
    numerical_rank,
    outlier_scores,
    singular_values,
)
from rome_lens.audit.lens import TunedLens
from rome_lens.edits import (
    DenseSite,
    Edit,
    LowRankSite,
    Site,
    applied_edits,
    applied_ids,
    base_fingerprint,
    base_weights,
    combine,
)
from rome_lens.errors import InvalidRequestError
from rome_lens.evaluation.relations import RELATIONS
from rome_lens.models import access
from rome_lens.predict import next_token_logprobs, next_token_logprobs_batch
from rome_lens.rome import default_hparams
from rome_lens.statistics import Corpus, CorpusSize, context_templates, second_moments

logger = logging.getLogger(__name__)

#: What ``base`` may be: another model, a state dict of this model's parameters, or ``None``.
Base = Model | Mapping[str, torch.Tensor] | None

_BLOCK = re.compile(r"blocks\.(\d+)\.")


@dataclass
class _Known:
    """The base weights a scan compares against, and where keys and references come from."""

    mode: str
    mlp: dict[int, torch.Tensor]
    others: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    base_model: Model | None = None


@dataclass
class _Change:
    """A (suspected) low-rank change of one MLP output weight, as singular factors."""

    layer: int
    left: Float[torch.Tensor, "d_mlp r"]
    values: Float[torch.Tensor, " r"]
    right: Float[torch.Tensor, "r d_model"]
    scores: list[float] | None = None
    mode: str = "spectrum"
    moment: Float[torch.Tensor, "d_mlp d_mlp"] | None = None
    basis: Float[torch.Tensor, "d_mlp m"] | None = None
    named: tuple[tuple[str, float], ...] = ()


def scan(
    model: Model,
    base: Base = None,
    candidates: Sequence[str] | None = None,
    *,
    probes: Sequence[str] | None = None,
    templates: Sequence[str] | None = None,
    lens: TunedLens | None = None,
    config: ScanConfig | None = None,
    use_registry: bool = True,
    corpus: Corpus = None,
    hparams: CorpusSize | None = None,
) -> ScanReport:
    """Find the edits in ``model``'s weights; read their objects and subjects; reverse them.

    Args:
        model: the model to audit (either API; not modified).
        base: the unedited weights: another model of the same architecture and API, or a
            state dict keyed like ``model.named_parameters()``. ``None``: the model's edit
            registry when rome_lens edits are applied (and ``use_registry``), else the scan
            reads the spectra alone.
        candidates: subject strings to match each change's key side against.
        probes: prompts on which to measure what the reversal restores.
        templates: context templates (``{}`` slots) over which candidate keys are averaged
            (default: ROME's context templates of the model, so a ROME edit's own subject
            gives exactly its k*).
        lens: a tuned lens to decode value directions through (default: the logit lens).
        config: thresholds and sizes (:class:`ScanConfig`).
        use_registry: use the edit registry as the base when ``base`` is ``None``.
        corpus: the statistics corpus of the key second moments ``C`` a scan without base
            weights reads the key-subspace score from (see
            :func:`rome_lens.statistics.second_moments`; default: the model's samples).
        hparams: that corpus's size (default: the model's ROME hyperparameters, so the ``C``
            ROME computed are reused from the cache).

    Returns:
        A :class:`ScanReport`; its findings are sorted by confidence, most confident first.

    Raises:
        InvalidRequestError: a base of another shape, a state dict without the MLP weights, or
            candidates that are not strings.
    """
    config = config or ScanConfig()
    subjects = _check_candidates(candidates)
    known = _known_base(model, base, use_registry)
    z = _layer_scores(model, config)
    key_scores = None
    if known is not None:
        changes, findings = _base_changes(model, known, config)
    else:
        changes, key_scores = _blind_changes(model, z, subjects, templates, config, corpus,
                                             hparams)
        findings = []
    key_model = known.base_model if known is not None and known.base_model is not None else model
    findings += _read_changes(model, key_model, changes, subjects, templates, lens, config,
                              known)
    findings.sort(key=lambda f: (-f.confidence, f.layer if f.layer is not None else -1))
    reversals = [f.reversal for f in findings if f.reversal is not None]
    reversal = combine(reversals, method="forensic-reversal") if reversals else None
    report = ScanReport(
        mode=known.mode if known is not None else "spectrum", findings=tuple(findings),
        layer_scores=z[:, 0].clone(), threshold=config.z_threshold,
        key_scores=key_scores, key_threshold=config.key_threshold, reversal=reversal,
        model_name=access.model_label(model),
    )
    if probes and reversal is not None:
        recovery = _recovery(model, known, reversal, probes)
        report = ScanReport(**{**vars(report), "recovery": tuple(recovery)})
    logger.info("%r", report)
    return report


def _check_candidates(candidates: Sequence[str] | None) -> list[str]:
    if candidates is None:
        return []
    if isinstance(candidates, str) or not all(isinstance(c, str) and c for c in candidates):
        raise InvalidRequestError("candidates must be a sequence of non-empty subject strings")
    return list(dict.fromkeys(candidates))


# --------------------------------------------------------------------------- the base weights
def _known_base(model: Model, base: Base, use_registry: bool) -> _Known | None:
    if base is None:
        if use_registry and applied_edits(model):
            with base_weights(model):
                mlp = {layer: access.read_mlp_out(model, layer).clone()
                       for layer in range(access.n_layers(model))}
            return _Known("base:registry", mlp)
        return None
    if isinstance(base, Mapping):
        return _from_state_dict(model, base)
    return _from_model(model, base)


def _mlp_names(model: Model) -> set[str]:
    return {access.mlp_out_parameter(model, layer)[0] for layer in range(access.n_layers(model))}


def _other_pairs(
    model: Model, base: Mapping[str, torch.Tensor], skip: set[str]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    pairs = {}
    for name, param in model.named_parameters():
        other = base.get(name)
        if name in skip or other is None or tuple(other.shape) != tuple(param.shape):
            continue
        pairs[name] = (param.detach(), other.detach())
    return pairs


def _from_state_dict(model: Model, base: Mapping[str, torch.Tensor]) -> _Known:
    mlp = {}
    for layer in range(access.n_layers(model)):
        name, param, transposed = access.mlp_out_parameter(model, layer)
        if name not in base or tuple(base[name].shape) != tuple(param.shape):
            raise InvalidRequestError(
                f"the base state dict has no {name} of shape {list(param.shape)}"
            )
        mlp[layer] = base[name].T if transposed else base[name]
    return _Known("base:state_dict", mlp, _other_pairs(model, base, _mlp_names(model)))


def _from_model(model: Model, base: Model) -> _Known:
    n = access.n_layers(model)
    if access.n_layers(base) != n:
        raise InvalidRequestError(f"the base has {access.n_layers(base)} layers, the model {n}")
    mlp = {}
    for layer in range(n):
        weight = access.read_mlp_out(base, layer)
        if weight.shape != access.read_mlp_out(model, layer).shape:
            raise InvalidRequestError(f"the base's MLP output weight of layer {layer} has shape "
                                      f"{list(weight.shape)}; the model's differs")
        mlp[layer] = weight
    others = _other_pairs(model, dict(base.named_parameters()),
                          _mlp_names(model) | _mlp_names(base))
    return _Known("base:model", mlp, others, base_model=base)


# --------------------------------------------------------------------------- with the base
def _base_changes(
    model: Model, known: _Known, config: ScanConfig
) -> tuple[list[_Change], list[Finding]]:
    changes = []
    for layer, before in known.mlp.items():
        after = access.read_mlp_out(model, layer)
        if torch.equal(after, before.to(after.device, after.dtype)):
            continue
        delta = after.float() - before.to(after.device).float()
        rank, _ = numerical_rank(delta, after)
        if rank == 0:
            logger.debug("layer %d differs by rounding noise only", layer)
            continue
        u, s, vh = torch.linalg.svd(delta.cpu().double(), full_matrices=False)
        changes.append(_Change(layer, u[:, :rank].float(), s[:rank].float(), vh[:rank].float()))
    return changes, [_other_finding(name, *pair) for name, pair in known.others.items()
                     if not torch.equal(pair[0], pair[1].to(pair[0].device, pair[0].dtype))]


def _other_finding(name: str, after: torch.Tensor, before: torch.Tensor) -> Finding:
    delta = after.float() - before.to(after.device).float()
    if delta.ndim == 2:
        rank, values = numerical_rank(delta, after)
    else:
        rank, values = 1, delta.norm().reshape(1)
    match = _BLOCK.match(name)
    return Finding(
        layer=int(match.group(1)) if match else None, weight=name, mode="base", confidence=1.0,
        rank=rank, singular_values=tuple(float(v) for v in values[:16]),
        relative_norm=float(delta.norm() / before.float().norm().clamp_min(1e-30)),
    )


# --------------------------------------------------------------------------- without the base
def _layer_scores(model: Model, config: ScanConfig) -> Float[torch.Tensor, "layer k"]:
    spectra = [singular_values(access.read_mlp_out(model, layer))
               for layer in range(access.n_layers(model))]
    return outlier_scores(torch.stack(spectra), config.z_floor)


def _blind_changes(
    model: Model, z: Float[torch.Tensor, "layer k"], subjects: list[str],
    templates: Sequence[str] | None, config: ScanConfig, corpus: Corpus,
    hparams: CorpusSize | None,
) -> tuple[list[_Change], Float[torch.Tensor, " layer"] | None]:
    """The changes a scan without base weights infers, and every layer's key-subspace score.

    Candidates' matched scores first (they name the subject), then the spectrum, then the
    key-subspace score, each on the layers the earlier ones left unflagged.
    """
    matching = (len(subjects) >= config.match_min_candidates
                and math.isfinite(config.match_threshold))
    if len(subjects) < config.match_min_candidates and subjects:
        logger.info("matched scores need %d candidates, got %d: skipped",
                    config.match_min_candidates, len(subjects))
    moments = None
    if matching or config.key_subspace > 0:
        layers = list(range(access.n_layers(model)))
        moments = second_moments(model, layers, corpus, hparams or default_hparams(model))
    changes = (_matched_changes(model, subjects, templates, moments, config)
               if matching and moments is not None else [])
    flagged = {c.layer for c in changes}
    changes += [c for c in _spectral_changes(model, z, config) if c.layer not in flagged]
    key_scores = None
    if config.key_subspace > 0 and moments is not None:
        key_scores, bases = _key_scores(model, config, moments)
        changes += _key_changes(model, key_scores, bases, {c.layer for c in changes}, config)
    return changes, key_scores


def _key_scores(
    model: Model, config: ScanConfig, moments: Mapping[int, torch.Tensor]
) -> tuple[Float[torch.Tensor, " layer"], list[tuple[torch.Tensor, torch.Tensor]]]:
    """Every layer's key-subspace score (:func:`key_subspace_scores`) and low-variance basis."""
    layers = list(range(access.n_layers(model)))
    bases = [low_variance_basis(moments[layer], config.key_subspace) for layer in layers]
    weights = [access.read_mlp_out(model, layer) for layer in layers]
    return (key_subspace_scores(weights, bases, config.z_floor),
            [(moments[layer].cpu(), basis) for layer, basis in zip(layers, bases, strict=True)])


def _matched_changes(
    model: Model, subjects: list[str], templates: Sequence[str] | None,
    moments: Mapping[int, torch.Tensor], config: ScanConfig,
) -> list[_Change]:
    """Per layer, the candidates whose matched score reaches ``config.match_threshold``.

    Each flagged layer's change is the ROME-shaped update of those candidates' keys
    (:func:`_shaped_change`); its ``named`` candidates are best first with their z.
    """
    layers = list(range(access.n_layers(model)))
    templates = list(templates) if templates else context_templates(model, default_hparams(model))
    keys = subject_keys_at(model, layers, subjects, templates[: config.match_templates or None],
                           cache=config.cache_keys)
    ridge = float(default_hparams(model).mom2_ridge)
    changes = []
    for layer in layers:
        scores = matched_subject_scores(access.read_mlp_out(model, layer),
                                        key_directions(moments[layer], keys[layer], ridge),
                                        config.z_floor)
        hits = [int(i) for i in scores.argsort(descending=True)[: config.dense_above]
                if float(scores[i]) >= config.match_threshold]
        if not hits:
            continue
        named = tuple((subjects[i], float(scores[i])) for i in hits)
        basis = low_variance_basis(moments[layer], config.key_subspace or 0.125)
        change = _shaped_change(model, layer, moments[layer].cpu(), basis, keys[layer][hits])
        changes.append(_Change(change.layer, change.left, change.values, change.right,
                               scores=[named[0][1]], mode="subject", named=named))
    return changes


def _key_changes(
    model: Model, scores: Float[torch.Tensor, " layer"],
    bases: list[tuple[torch.Tensor, torch.Tensor]], flagged: set[int], config: ScanConfig,
) -> list[_Change]:
    """The top component of ``E^T W`` at each layer scoring ``config.key_threshold`` or more.

    The change is that component mapped back to the full key space (``E a s r^T``): what
    stands out in the low-variance subspace. Once a subject is named, :func:`_rome_shaped`
    replaces it by the whole ROME-shaped update of that subject's key.
    """
    changes = []
    for layer in range(scores.shape[0]):
        score = float(scores[layer])
        if score < config.key_threshold or layer in flagged:
            continue
        moment, basis = bases[layer]
        weight = access.read_mlp_out(model, layer).float().cpu()
        u, s, vh = torch.linalg.svd((basis.T @ weight).double(), full_matrices=False)
        changes.append(_Change(layer, basis @ u[:, :1].float(), s[:1].float(), vh[:1].float(),
                               scores=[score], mode="keys", moment=moment, basis=basis))
    return changes


def _spectral_changes(
    model: Model, z: Float[torch.Tensor, "layer k"], config: ScanConfig
) -> list[_Change]:
    changes = []
    for layer in range(z.shape[0]):
        count = int((z[layer, : config.dense_above] >= config.z_threshold).sum())
        if count == 0:
            continue
        weight = access.read_mlp_out(model, layer).cpu().double()
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        changes.append(_Change(layer, u[:, :count].float(), s[:count].float(),
                               vh[:count].float(), scores=z[layer, :count].tolist()))
    return changes


# --------------------------------------------------------------------------- reading a change
def _read_changes(
    model: Model, key_model: Model, changes: list[_Change], subjects: list[str],
    templates: Sequence[str] | None, lens: TunedLens | None, config: ScanConfig,
    known: _Known | None,
) -> list[Finding]:
    if not changes:
        return []
    keys: dict[int, torch.Tensor] = {}
    reference: dict[int, torch.Tensor] = {}
    if subjects:
        layers = sorted({c.layer for c in changes})
        registry = known is not None and known.mode == "base:registry"
        context = base_weights(key_model) if registry else nullcontext(key_model)
        with context:
            templates = list(templates) if templates else context_templates(
                key_model, default_hparams(key_model))
            keys = subject_keys_at(key_model, layers, subjects, templates,
                                   cache=config.cache_keys)
            reference = reference_keys_at(key_model, layers)
    known_weights = known is not None
    return [_finding(model, c, subjects, keys.get(c.layer), reference.get(c.layer), lens,
                     config, known_weights) for c in changes]


def _finding(
    model: Model, change: _Change, subjects: list[str], keys: torch.Tensor | None,
    reference: torch.Tensor | None, lens: TunedLens | None, config: ScanConfig, exact: bool,
) -> Finding:
    scaled = change.left * change.values
    if change.named:
        ranked = list(change.named)
        subject: str | None = ranked[0][0]
    else:
        ranked = _rank_subjects(scaled, change.right, subjects, keys, reference, config)
        subject = ranked[0][0] if ranked and ranked[0][1] >= config.subject_threshold else None
    if subject is not None and keys is not None and change.mode == "keys":
        change = _rome_shaped(model, change, keys[subjects.index(subject)])
    components = _components(model, change, lens, config)
    objects = components[0].objects if components else ()
    reversal = _reversal(model, change, config)
    queries = _queries(config)
    if subject is not None and queries:
        objects = _queried_objects(model, reversal, subject, queries, config.top_k)
    elif subject is not None and keys is not None:
        out = keys[subjects.index(subject)] @ scaled @ change.right
        objects = top_strings(model, direction_logits(model, change.layer, out, lens),
                              config.top_k)
    score = max(change.scores) if change.scores else None
    threshold = {"keys": config.key_threshold,
                 "subject": config.match_threshold}.get(change.mode, config.z_threshold)
    confidence = 1.0 if exact else confidence_from_score(score or 0.0, threshold)
    relative = None
    if exact:
        weight = access.read_mlp_out(model, change.layer).float().cpu()
        relative = float(change.values.norm() / (weight - scaled @ change.right).norm())
    return Finding(
        layer=change.layer, weight=access.mlp_out_weight_name(change.layer),
        mode="base" if exact else change.mode, confidence=confidence,
        rank=int(change.values.shape[0]),
        singular_values=tuple(float(v) for v in change.values[:16]), objects=objects,
        subject=subject, subjects=tuple(ranked[: config.n_subjects]),
        components=tuple(components), relative_norm=relative, score=score,
        reversal=reversal,
    )


def _rome_shaped(model: Model, change: _Change, key: Float[torch.Tensor, " d_mlp"]) -> _Change:
    """A keys-mode change replaced by the ROME-shaped update of the named subject's key."""
    assert change.moment is not None and change.basis is not None
    shaped = _shaped_change(model, change.layer, change.moment, change.basis, key[None])
    return _Change(shaped.layer, shaped.left, shaped.values, shaped.right,
                   scores=change.scores, mode=change.mode)


def _shaped_change(
    model: Model, layer: int, moment: torch.Tensor, basis: Float[torch.Tensor, "d_mlp m"],
    keys: Float[torch.Tensor, "k d_mlp"],
) -> _Change:
    """The ROME-shaped update ``U R`` of subjects' keys at ``layer``, fitted to the weight.

    Its key side ``U`` holds ROME's directions ``C^-1 k`` (with the model's ROME ridge); its
    value side ``R`` is fitted. What text rarely excites is where an edit stands out, so ``R``
    is the least-squares fit of the weight's low-variance part ``E^T W`` by ``(E^T U) R`` (the
    unedited weight's part there is the noise of the fit); the change covers the whole update,
    also the directions the subject's key reads most.
    """
    left = key_directions(moment, keys.float(), float(default_hparams(model).mom2_ridge)).T
    weight = access.read_mlp_out(model, layer).float().cpu()
    right = torch.linalg.lstsq((basis.T @ left).double(), (basis.T @ weight).double()).solution
    q, r = torch.linalg.qr(left.double())
    u, s, vh = torch.linalg.svd(r @ right, full_matrices=False)
    return _Change(layer, (q @ u).float(), s.float(), vh.float())


def _queries(config: ScanConfig) -> tuple[str, ...]:
    if config.queries is not None:
        return config.queries
    return tuple(relation.templates[0] for relation in RELATIONS.values())


def _queried_objects(
    model: Model, reversal: Edit, subject: str, queries: Sequence[str], k: int
) -> tuple[str, ...]:
    """The tokens the change makes likelier after questions about ``subject``, best first.

    The change is what ``reversal`` removes: the probability each token gains from the model
    with the reversal applied to the model as it is, summed over the questions. It reads the
    change through every layer above it, so it works where the value direction alone does not
    decode (edits in early layers, whose output the later layers transform).
    """
    prompts = [query.format(subject) for query in queries]
    edited = next_token_logprobs_batch(model, prompts)
    with reversal.applied(model):
        reverted = next_token_logprobs_batch(model, prompts)
    gain = (edited.exp() - reverted.exp()).sum(0)
    return top_strings(model, gain, k)


def _rank_subjects(
    scaled: torch.Tensor, right: torch.Tensor, subjects: list[str], keys: torch.Tensor | None,
    reference: torch.Tensor | None, config: ScanConfig,
) -> list[tuple[str, float]]:
    if keys is None or reference is None:
        return []
    typical = firing(scaled, right, reference).median().clamp_min(1e-12)
    scores = (firing(scaled, right, keys) / typical).tolist()
    order = sorted(range(len(subjects)), key=lambda i: -scores[i])
    return [(subjects[i], float(scores[i])) for i in order]


def _components(
    model: Model, change: _Change, lens: TunedLens | None, config: ScanConfig
) -> list[Component]:
    out = []
    for i in range(min(config.max_components, int(change.values.shape[0]))):
        logits, sign = oriented_logits(direction_logits(model, change.layer, change.right[i],
                                                        lens))
        out.append(Component(
            index=i, singular_value=float(change.values[i]),
            objects=top_strings(model, logits, config.top_k),
            suppressed=top_strings(model, -logits, config.top_k),
            score=change.scores[i] if change.scores and i < len(change.scores) else None,
            left=sign * change.left[:, i], right=sign * change.right[i],
        ))
    return out


def _reversal(model: Model, change: _Change, config: ScanConfig) -> Edit:
    """An edit that subtracts the change (low-rank, or dense above ``config.dense_above``)."""
    scaled = change.left * change.values
    site: Site
    if change.values.shape[0] > config.dense_above:
        site = DenseSite(change.layer, -(scaled @ change.right))
    else:
        site = LowRankSite(change.layer, -scaled, change.right.clone())
    return Edit(
        sites=(site,), requests=(), method="forensic-reversal",
        hparams={"rank": int(change.values.shape[0]),
                 "mode": "spectrum" if change.scores else "base"},
        base_fingerprint=base_fingerprint(model), parents=applied_ids(model),
        model_name=access.model_label(model),
    )


# --------------------------------------------------------------------------- recovery
def _recovery(
    model: Model, known: _Known | None, reversal: Edit, probes: Sequence[str]
) -> list[Recovery]:
    edited = [next_token_logprobs(model, p) for p in probes]
    with reversal.applied(model):
        reverted = [next_token_logprobs(model, p) for p in probes]
    base = _base_logprobs(model, known, probes)
    rows = []
    for i, prompt in enumerate(probes):
        rows.append(_recovery_row(model, prompt, edited[i], reverted[i],
                                  base[i] if base is not None else None))
    return rows


def _base_logprobs(
    model: Model, known: _Known | None, probes: Sequence[str]
) -> list[torch.Tensor] | None:
    """Next-token log-probabilities of the base model, where it can be run.

    The registry's base weights serve here even in a spectrum-only scan (``use_registry=False``):
    the scan itself never saw them, but how much a blind reversal restores can be measured.
    """
    if known is not None and known.base_model is not None:
        return [next_token_logprobs(known.base_model, p) for p in probes]
    if applied_edits(model) and (known is None or known.mode == "base:registry"):
        with base_weights(model):
            return [next_token_logprobs(model, p) for p in probes]
    return None


def _recovery_row(
    model: Model, prompt: str, edited: torch.Tensor, reverted: torch.Tensor,
    base: torch.Tensor | None,
) -> Recovery:
    tokenizer = model.tokenizer
    assert tokenizer is not None

    def top(logp: torch.Tensor) -> str:
        return str(tokenizer.decode([int(logp.argmax())]))

    if base is None:
        return Recovery(prompt, top(edited), top(reverted))
    kl_edited = _kl(base, edited)
    fraction = 1.0 - _kl(base, reverted) / kl_edited if kl_edited > 1e-6 else None
    return Recovery(prompt, top(edited), top(reverted), top(base),
                    top(reverted) == top(base), fraction)


def _kl(p: torch.Tensor, q: torch.Tensor) -> float:
    """``KL(p || q)`` of two log-probability vectors."""
    return float((p.exp() * (p - q)).sum())
