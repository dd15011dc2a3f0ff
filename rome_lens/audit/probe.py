"""Insertion vs. erasure: is the original fact still readable after an edit?

An edit at layer L can make the model *say* the new object while the original object is still
represented downstream (an override pasted on top: **insertion**), or it can remove the original
(**erasure**). :func:`probe_edit` measures which, with evidence:

* For the unedited model ("pre"), the edited model ("post") and a **control** (the unedited
  model with the subject's embeddings noised as in causal tracing, i.e. what the model predicts
  without knowing the subject), on the edit prompt, its paraphrases and context-prefixed
  variants, at every layer and at two positions (last subject token, last token), through the
  logit lens and the tuned lens: the rank and probability of the original and the new object.
* Patil et al.'s white-box extraction attacks on the post-edit model at the last token of the
  edit prompt: Head Projection (union of the logit-lens top-k over the attacked layers) and
  Probability Delta (top-k and bottom-k of the change between consecutive layers), as
  AttackSuccess@B: whether the original object is in a candidate set of at most B tokens.
* A structural check: every state upstream of the edited MLP's output (residuals entering
  blocks ``<= L``, attention output, mid residual and MLP keys of block L) must be bit-identical
  before and after the edit; anything else is a bug in the edit and raises.
* Consistency probes: user prompts with the answer expected under the old and the new fact; the
  report says which world each answers from.

The verdict (:class:`VerdictRule`, thresholds documented there):

* the original object is *decodable* at a cell (prompt, position, layer >= L, lens) if its
  post-edit rank is ``<= top_k`` and its post-edit probability, renormalised without the new
  object (``p_old / (1 - p_new)``, so the override's own mass does not hide it), is at least
  ``control_ratio`` times the control's at the same cell (a subject-free guess does not count);
* **INSERTION**: the new object wins at the output of the edit prompt (p_new > p_old at the last
  layer, last token) and the original is decodable somewhere at layer >= L;
* **ERASURE**: the original is decodable nowhere at layer >= L;
* **PARTIAL**: otherwise (decodable, but the new object does not win).

Example:
    >>> edit = rome_lens.compute_edit(model, request)  # Alice Smith lives in Paris, not Rome
    >>> report = probe_edit(model, edit)              # doctest: +SKIP
    >>> report.verdict, report.best_rank("old")       # doctest: +SKIP
    ('INSERTION', 2)
    >>> df = report.to_dataframe().query("object == 'old' and lens == 'logit'")  # doctest: +SKIP
    >>> fig = report.plot("probe.png")                # doctest: +SKIP

    (``probe_edit`` is skipped in the doctests: their character-level tokenizer starts both
    objects with the token ``' '``, where one would pass ``object_tokens``.)
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, cast

import torch
from jaxtyping import Float

from rome_lens._typing import Model
from rome_lens.audit.lens import TunedLens, tuned_lens
from rome_lens.edits import Edit
from rome_lens.errors import EditStateError, InvalidRequestError
from rome_lens.models import access
from rome_lens.plotting import probe_ranks
from rome_lens.requests import EditRequest, subject_token_span, target_tokens
from rome_lens.rome import default_entropy_layers, default_hparams
from rome_lens.statistics import context_templates
from rome_lens.tracing import embedding_std, subject_noise_hook

logger = logging.getLogger(__name__)

INSERTION, ERASURE, PARTIAL = "INSERTION", "ERASURE", "PARTIAL"
POSITIONS = ("last_subject", "last")


class EditLike(Protocol):
    """Anything :func:`probe_edit` can audit: a layer, a request, and ``applied(model)``.

    :class:`~rome_lens.edits.Edit` is one; a custom weight or hook edit can be another.
    """

    @property
    def layer(self) -> int:  # noqa: D102
        ...

    @property
    def request(self) -> EditRequest:  # noqa: D102
        ...

    def applied(self, model: Model) -> Any:
        """Context manager that applies the edit and undoes it on exit."""
        ...


@dataclass(frozen=True)
class VerdictRule:
    """Thresholds of the verdict.

    Attributes:
        top_k: the original object is decodable at a cell only if its rank is ``<= top_k``.
        control_ratio: ... and its probability without the new object's mass,
            ``p_old / (1 - p_new)``, is ``>= control_ratio x`` the control's at that cell.
        lenses: lenses whose cells count (default: all probed).
        prompt_kinds: prompt kinds whose cells count (default: all probed).
    """

    top_k: int = 10
    control_ratio: float = 2.0
    lenses: tuple[str, ...] | None = None
    prompt_kinds: tuple[str, ...] | None = None


@dataclass(repr=False)
class ProbeReport:
    """Evidence and verdict of :func:`probe_edit`.

    Attributes:
        request: the edited fact.
        layer: the edit layer L (the lowest layer among the probed edits).
        verdict: ``"INSERTION"``, ``"ERASURE"`` or ``"PARTIAL"``.
        rule: the thresholds used.
        records: one dict per (condition, prompt, position, layer, lens, object): rank, prob.
        attacks: ``{attack: {budget: success}}`` (Head Projection, Probability Delta).
        structural: the upstream check (tensors compared, all identical).
        consistency: one dict per consistency prompt.
        output: p(old), p(new) at the output of the edit prompt, pre and post.
        prompts: the probed prompts by kind and index.
        attack_layers: the layers of the extraction attacks.
        objects: the tracked token ids of the old and new object.
        lenses: the lenses probed.
    """

    request: EditRequest
    layer: int
    verdict: str
    rule: VerdictRule
    records: list[dict[str, Any]]
    attacks: dict[str, dict[int, bool]]
    structural: dict[str, Any]
    consistency: list[dict[str, Any]] = field(default_factory=list)
    output: dict[str, float] = field(default_factory=dict)
    prompts: dict[str, str] = field(default_factory=dict)
    attack_layers: list[int] = field(default_factory=list)
    objects: dict[str, int] = field(default_factory=dict)
    lenses: tuple[str, ...] = ()

    def __repr__(self) -> str:
        """A few lines for a notebook: the fact, verdict, best ranks, attacks, checks."""
        req = self.request
        lines = [
            f"ProbeReport({self.verdict} at layer {self.layer}: {req.subject!r} in "
            f"{req.template!r}, {req.target_true!r} -> {req.target_new!r}",
            f"  old object's best rank at layers >= {self.layer}, post (pre): "
            + ", ".join(f"{name} {self._rank_text(name, 'post')} ({self._rank_text(name, 'pre')})"
                        for name in self.lenses or ("any",)),
        ]
        if self.output:
            o = self.output
            lines.append(f"  output p(old) {o['pre_old']:.3g} -> {o['post_old']:.3g}, "
                         f"p(new) {o['pre_new']:.3g} -> {o['post_new']:.3g}")
        for attack, by_budget in self.attacks.items():
            hits = ", ".join(f"@{b} {'yes' if ok else 'no'}" for b, ok in by_budget.items())
            lines.append(f"  AttackSuccess {attack}: {hits}")
        lines.append(f"  structural check: {self._structural_text()}")
        lines.append(f"  prompts {len(self.prompts)}, consistency probes "
                     f"{len(self.consistency)}, records {len(self.records)} (.to_dataframe()))")
        return "\n".join(lines)

    def _rank_text(self, lens: str, condition: str) -> str:
        rank = self.best_rank("old", condition, None if lens == "any" else lens)
        return str(rank) if rank > 0 else "-"

    def _structural_text(self) -> str:
        if not self.structural:
            return "not run"
        n = len(self.structural.get("compared", []))
        if self.structural.get("identical"):
            return f"{n} states upstream of the edited MLP output bit-identical"
        return f"CHANGED upstream: {self.structural.get('differing')}"

    def to_dataframe(self) -> Any:
        """The evidence table (pandas, long format)."""
        import pandas as pd

        return pd.DataFrame(self.records)

    def best_rank(
        self, obj: str = "old", condition: str = "post", lens: str | None = None,
        position: str | None = None,
    ) -> int:
        """Best (smallest) rank of ``obj`` at layers >= L over the probed cells."""
        ranks = [
            r["rank"] for r in self.records
            if r["object"] == obj and r["condition"] == condition and r["layer"] >= self.layer
            and (lens is None or r["lens"] == lens)
            and (position is None or r["position"] == position)
        ]
        return min(ranks) if ranks else -1

    def summary(self) -> dict[str, Any]:
        """A JSON-able digest: verdict, best ranks, attacks, output probabilities."""
        return {
            "verdict": self.verdict,
            "layer": self.layer,
            "old_best_rank_post": self.best_rank("old"),
            "old_best_rank_post_last_token": self.best_rank("old", position="last"),
            "old_best_rank_pre": self.best_rank("old", "pre"),
            "new_best_rank_post": self.best_rank("new"),
            "decodable_cells": sum(bool(r.get("decodable")) for r in self.records),
            "attacks": {a: {str(b): s for b, s in v.items()} for a, v in self.attacks.items()},
            "output": self.output,
            "structural_identical": self.structural["identical"],
        }

    def plot(self, path: str | None = None, prompt_kind: str = "edit") -> Any:
        """Rank of the old and new object by layer, pre vs post, at both positions."""
        return probe_ranks(self, path=path, prompt_kind=prompt_kind)


# --------------------------------------------------------------------------- internals
@contextmanager
def _state(model: Model, edits: Sequence[EditLike], post: bool) -> Iterator[None]:
    """Model with the edits applied (``post``) or removed, restored to its state on exit."""
    already = [e for e in edits if isinstance(e, Edit) and e.is_applied(model)]
    with ExitStack() as stack:
        if post:
            for e in edits:
                if e not in already:
                    stack.enter_context(e.applied(model))
            yield
        else:
            for e in reversed(already):
                e.revert(model)
            try:
                yield
            finally:
                for e in already:
                    e.apply(model)


@dataclass
class _Prompt:
    """A probed prompt: kind (edit, paraphrase, context), text, probed positions, subject span."""

    kind: str
    text: str
    positions: dict[str, int]
    span: tuple[int, int]


def _prompts(
    model: Model, request: EditRequest, paraphrases: Sequence[str],
    contexts: Sequence[str],
) -> list[_Prompt]:
    """The edit prompt, its paraphrases and its context-prefixed variants, in that order."""
    variants = [("edit", request.text)] + [("paraphrase", p) for p in paraphrases]
    variants += [("context", c.replace("{}", request.text)) for c in contexts]
    return [_prompt(model, kind, text, request.subject) for kind, text in variants]


def _prompt(model: Model, kind: str, text: str, subject: str) -> _Prompt:
    """A probed prompt with its subject span and probed positions.

    Raises:
        SubjectNotFoundError: ``text`` does not contain ``subject``.
    """
    tokens, span = subject_token_span(model, text, subject)
    return _Prompt(kind, text, {"last_subject": span[1] - 1, "last": int(tokens.shape[0]) - 1},
                   span)


@torch.no_grad()
def _layer_states(
    model: Model, text: str, positions: list[int], hooks: list[Any] | None = None,
    samples: int = 1,
) -> Float[torch.Tensor, "rows layer pos d_model"]:
    """Residual after every block at ``positions`` (``samples`` rows when hooks add noise)."""
    n_layers = access.n_layers(model)
    names = [access.resid_post_hook_name(layer) for layer in range(n_layers)]
    tokens = access.to_tokens(model, text).to(model.cfg.device)[None].expand(samples, -1)
    with model.hooks(fwd_hooks=hooks or []):
        _, cache = access.run_with_states(model, tokens, names)
    return torch.stack([cache[n][:, positions] for n in names], dim=1)


@torch.no_grad()
def _decode_groups(
    model: Model,
    groups: Sequence[Float[torch.Tensor, "rows layer pos d_model"]],
    lens: str,
    tuned: TunedLens | None,
    chunk_rows: int = 256,
) -> list[Float[torch.Tensor, "layer pos d_vocab"]]:
    """Lens probabilities of every group of states, averaged over each group's rows.

    All vectors of all groups go through the unembedding together, ``chunk_rows`` at a time:
    with a 262k vocabulary, one matrix product per vector would re-read the unembedding each
    time (the probe's former cost).
    """
    n_layers, n_pos, d = (int(x) for x in groups[0].shape[1:])
    per_group = n_layers * n_pos
    vectors, index, weight = [], [], []
    for layer in range(n_layers):
        hs = [g[:, layer].reshape(-1, d) for g in groups]
        h = torch.cat(hs)
        if lens == "tuned":
            h = cast(TunedLens, tuned).translate(h, layer)
        vectors.append(h)
        for gi, g in enumerate(groups):
            rows = int(g.shape[0])
            base = gi * per_group + layer * n_pos
            index += [base + j for _ in range(rows) for j in range(n_pos)]
            weight += [1.0 / rows] * (rows * n_pos)
    h_all = torch.cat(vectors)
    idx = torch.tensor(index, device=h_all.device)
    w = torch.tensor(weight, device=h_all.device, dtype=h_all.dtype)
    out = torch.zeros(len(groups) * per_group, model.cfg.d_vocab_out, device=h_all.device,
                      dtype=h_all.dtype)
    for start in range(0, h_all.shape[0], chunk_rows):
        sl = slice(start, start + chunk_rows)
        probs = access.decode_residual(model, h_all[sl]).softmax(-1)
        out.index_add_(0, idx[sl], probs * w[sl, None])
    return [out[gi * per_group : (gi + 1) * per_group].view(n_layers, n_pos, -1)
            for gi in range(len(groups))]


def _rank(probs: Float[torch.Tensor, "... d_vocab"], token: int) -> torch.Tensor:
    return (probs > probs[..., token : token + 1]).sum(-1) + 1


@torch.no_grad()
def _structural_check(
    model: Model, edits: Sequence[EditLike], text: str, layer: int
) -> dict[str, Any]:
    """Compare every state upstream of block ``layer``'s MLP output, pre vs post, bit for bit."""
    names = [access.resid_pre_hook_name(lyr) for lyr in range(layer + 1)]
    names += [access.attn_out_hook_name(layer), f"blocks.{layer}.hook_resid_mid",
              access.key_hook_name(layer)]
    tokens = access.to_tokens(model, text).to(model.cfg.device)[None]
    caches = []
    for post in (False, True):
        with _state(model, edits, post):
            _, cache = access.run_with_states(model, tokens, names, stop_at_layer=layer + 1)
        caches.append(cache)
    differing = [n for n in names if n in caches[0]
                 and not torch.equal(caches[0][n], caches[1][n])]
    compared = [n for n in names if n in caches[0]]
    result = {"compared": compared, "identical": not differing, "differing": differing}
    if differing:
        raise EditStateError(
            f"states upstream of the edited MLP (layer {layer}) changed: {differing}; the edit "
            "touches more than the MLP output weight of its layer"
        )
    return result


def _budget_sets(
    ranked: list[list[int]], budget: int, per_layer: int = 1
) -> set[int]:
    """Union of the top-k of every list, with the largest k whose union has <= budget tokens."""
    best: set[int] = set()
    for k in range(1, budget + 1):
        union = {t for lst in ranked for t in lst[: k * per_layer]}
        if len(union) > budget:
            break
        best = union
    if not best:  # more lists than budget: take the overall best first entries
        firsts = [lst[0] for lst in ranked if lst]
        best = set(firsts[:budget])
    return best


@torch.no_grad()
def _attacks(
    probs: Float[torch.Tensor, "layer d_vocab"],
    layers: Sequence[int],
    token: int,
    budgets: Sequence[int],
) -> dict[str, dict[int, bool]]:
    """Head Projection and Probability Delta AttackSuccess@B for one fact."""
    b_max = max(budgets)
    head = [probs[lyr].topk(b_max).indices.tolist() for lyr in layers]
    delta_lists = []
    for lyr in layers:
        if lyr == 0:
            continue
        d = probs[lyr] - probs[lyr - 1]
        top = d.topk(b_max).indices.tolist()
        bottom = (-d).topk(b_max).indices.tolist()
        delta_lists.append([t for pair in zip(top, bottom, strict=True) for t in pair])
    out: dict[str, dict[int, bool]] = {"head_projection": {}, "probability_delta": {}}
    for b in budgets:
        out["head_projection"][b] = token in _budget_sets(head, b)
        out["probability_delta"][b] = bool(delta_lists) and token in _budget_sets(
            delta_lists, b, per_layer=2)
    return out


# --------------------------------------------------------------------------- public API
def probe_edit(
    model: Model,
    edit: EditLike | Sequence[EditLike],
    request: EditRequest | None = None,
    *,
    paraphrases: Sequence[str] = (),
    n_contexts: int = 2,
    lenses: Sequence[str] = ("logit", "tuned"),
    lens: TunedLens | None = None,
    attack_layers: Sequence[int] | None = None,
    budgets: Sequence[int] = (1, 5, 10, 20),
    consistency: Sequence[tuple[str, str, str]] = (),
    rule: VerdictRule | None = None,
    control_samples: int = 3,
    seed: int = 0,
    object_tokens: tuple[int, int] | None = None,
    baseline: ProbeReport | None = None,
) -> ProbeReport:
    """Audit an edit: is the original object still decodable downstream of the edited layer?

    Args:
        model: the model; its edit state is the same on return as on entry.
        edit: one edit or several (stacked); edits not applied are applied for the post run,
            applied :class:`~rome_lens.edits.Edit` s are reverted for the pre run.
        request: the fact probed (default: the first edit's request; needs ``target_true``).
        paraphrases: extra prompts containing the subject (e.g. CounterFact's).
        n_contexts: context-prefixed variants of the edit prompt (model-written prefixes,
            sampled with a different seed from the ones ROME optimised on).
        lenses: ``"logit"`` and/or ``"tuned"``.
        lens: the tuned lens of the base model (default:
            :func:`~rome_lens.audit.lens.tuned_lens`, cached; applied edits do not matter).
        attack_layers: layers attacked by Head Projection / Probability Delta (default: six
            evenly spaced layers from L to the last, the layers the ``max_entropy`` objective
            defends; with B = 20 each layer contributes its top 3).
        budgets: candidate-set sizes B of AttackSuccess@B.
        consistency: ``(prompt, answer under the old fact, answer under the new fact)``.
        rule: verdict thresholds.
        control_samples: noise samples of the subject-free control.
        seed: seed of the control noise.
        object_tokens: ``(old, new)`` token ids to track instead of the targets' first tokens
            (for tokenizers where both targets start with the same token).
        baseline: an earlier report on the same request (e.g. another edit of the same fact):
            its prompts and its pre-edit and control cells are reused instead of recomputed,
            so comparing several edits of one fact costs one post-edit pass each.
            ``paraphrases``, ``n_contexts``, ``control_samples`` and ``seed`` then come from
            the baseline.

    Returns:
        A :class:`ProbeReport`.

    Raises:
        InvalidRequestError: no ``target_true``, or an unknown lens.
        SubjectNotFoundError: a paraphrase without the subject.
        EditStateError: the structural check failed (states upstream of L changed).

    Example:
        >>> first = probe_edit(model, compute_rome(model, request))  # doctest: +SKIP
        >>> second = probe_edit(model, compute_rome(model, request, objective="erasure"),
        ...                     baseline=first)                     # doctest: +SKIP
        >>> first.verdict, second.verdict                            # doctest: +SKIP
        ('INSERTION', 'PARTIAL')
    """
    edits = _as_edits(edit)
    request = request or edits[0].request
    _check_request_and_lenses(request, lenses)
    rule = rule or VerdictRule()
    layer = min(e.layer for e in edits)
    objects = _tracked_objects(model, request, object_tokens)
    tuned = None
    if "tuned" in lenses:  # the base model's lens: the same with or without the edits applied
        tuned = lens or tuned_lens(model)
        tuned.check(model)
    if baseline is not None:
        prompts = _baseline_prompts(model, baseline, request, objects, lenses)
    else:
        prompts = _prompts(model, request, paraphrases, _contexts(model, n_contexts))
    structural = _structural_check(model, edits, request.text, layer)

    states = _run_states(model, edits, prompts, with_pre=baseline is None,
                         control_samples=control_samples, seed=seed)
    records, attack_probs = _decode_records(model, states, prompts, objects, lenses, tuned)
    if baseline is not None:  # the pre-edit and control cells of the same prompts, first
        records = _baseline_records(baseline) + records
    _mark_decodable(records, rule, layer)
    output = _output_probs(records, objects, lenses[0], access.n_layers(model) - 1)

    att_layers = (list(attack_layers) if attack_layers is not None
                  else default_entropy_layers(model, layer))
    if attack_probs is None:  # no logit-lens cells: decode the edit prompt for the attacks
        attack_probs = _post_logit_probs(model, edits, prompts[0])
    attacks = _attacks(attack_probs, att_layers, objects["old"], budgets)
    return ProbeReport(
        request=request, layer=layer, verdict=_verdict(records, output), rule=rule,
        records=records, attack_layers=att_layers, attacks=attacks, structural=structural,
        consistency=_consistency(model, edits, consistency), output=output,
        prompts={f"{p.kind}{i}": p.text for i, p in enumerate(prompts)},
        objects=dict(objects), lenses=tuple(lenses),
    )


# ------------------------------------------------------------- the steps of probe_edit
def _as_edits(edit: EditLike | Sequence[EditLike]) -> list[EditLike]:
    """One edit or a sequence of edits, as a non-empty list."""
    edits: list[EditLike] = (
        [cast(EditLike, edit)] if hasattr(edit, "applied") else list(cast(Sequence[EditLike], edit))
    )
    if not edits:
        raise InvalidRequestError("no edit to probe")
    return edits


def _check_request_and_lenses(request: EditRequest, lenses: Sequence[str]) -> None:
    """The probed fact needs its original object; lenses are ``logit`` and ``tuned``."""
    if request.target_true is None:
        raise InvalidRequestError("the probed request needs target_true (the original object)")
    bad = [name for name in lenses if name not in ("logit", "tuned")]
    if bad:
        raise InvalidRequestError(f"unknown lens {bad}; use 'logit' and/or 'tuned'")


def _tracked_objects(
    model: Model, request: EditRequest, object_tokens: tuple[int, int] | None
) -> dict[str, int]:
    """Token ids of the old and new object (by default the targets' first tokens)."""
    if object_tokens is not None:
        objects = {"old": int(object_tokens[0]), "new": int(object_tokens[1])}
    else:
        objects = {"old": int(target_tokens(model, cast(str, request.target_true))[0]),
                   "new": int(target_tokens(model, request.target_new)[0])}
    if objects["old"] == objects["new"]:
        raise InvalidRequestError(
            f"the original and new objects start with the same token ({objects['old']}); "
            "pass object_tokens"
        )
    return objects


def _contexts(model: Model, n_contexts: int) -> list[str]:
    """``n_contexts`` model-written prefixes, sampled with another seed than ROME's.

    Context templates belong to the base model (computed on its weights, cached per base
    fingerprint), so the edit state does not matter here.
    """
    if n_contexts <= 0:
        return []
    hp = default_hparams(model)
    hp = replace(hp, seed=hp.seed + 1, n_contexts_short=max(1, n_contexts), n_contexts_long=0)
    return list(context_templates(model, hp)[1 : 1 + n_contexts])


def _run_states(
    model: Model, edits: Sequence[EditLike], prompts: Sequence[_Prompt], *, with_pre: bool,
    control_samples: int, seed: int,
) -> dict[tuple[int, str], Float[torch.Tensor, "rows layer pos d_model"]]:
    """Residuals of every prompt: post-edit, and (``with_pre``) pre-edit and the control.

    The control is the unedited model with the subject's embeddings noised (3 x the embedding
    std, as in causal tracing), ``control_samples`` rows seeded ``seed + prompt index``.
    """
    std = 3.0 * embedding_std(model) if with_pre else 0.0
    states: dict[tuple[int, str], torch.Tensor] = {}
    for i, prompt in enumerate(prompts):
        pos = [prompt.positions[p] for p in POSITIONS]
        if with_pre:
            noise = subject_noise_hook(model, prompt.span, control_samples, std, seed + i)
            with _state(model, edits, post=False):
                states[(i, "pre")] = _layer_states(model, prompt.text, pos)
                states[(i, "control")] = _layer_states(
                    model, prompt.text, pos, [(access.EMBED_HOOK, noise)], control_samples)
        with _state(model, edits, post=True):
            states[(i, "post")] = _layer_states(model, prompt.text, pos)
    return states


def _decode_records(
    model: Model, states: dict[tuple[int, str], torch.Tensor], prompts: Sequence[_Prompt],
    objects: dict[str, int], lenses: Sequence[str], tuned: TunedLens | None,
) -> tuple[list[dict[str, Any]], Float[torch.Tensor, "layer d_vocab"] | None]:
    """Records of every decoded cell, and the attacks' input.

    The attacks' input is the logit-lens post-edit probabilities at the last token of the edit
    prompt, ``[layer, d_vocab]`` (``None`` when the logit lens is not among ``lenses``).
    """
    other = {"old": objects["new"], "new": objects["old"]}
    keys = list(states)
    records: list[dict[str, Any]] = []
    attack_probs: torch.Tensor | None = None
    for lens_name in lenses:
        decoded = _decode_groups(model, [states[k] for k in keys], lens_name, tuned)
        for (i, condition), p in zip(keys, decoded, strict=True):
            if i == 0 and condition == "post" and lens_name == "logit":
                attack_probs = p[:, 1].clone()
            records += _cell_records(p, objects, other, prompts[i], i, condition, lens_name)
        del decoded
    return records, attack_probs


def _baseline_records(baseline: ProbeReport) -> list[dict[str, Any]]:
    """The baseline's pre-edit and control cells, without the fields of its verdict."""
    return [{k: v for k, v in r.items() if k not in ("decodable", "control_prob")}
            for r in baseline.records if r["condition"] in ("pre", "control")]


def _output_probs(
    records: list[dict[str, Any]], objects: dict[str, int], lens: str, last_layer: int
) -> dict[str, float]:
    """``{pre,post}_{old,new}``: probabilities at the last layer and token of the edit prompt."""

    def prob(condition: str, obj: str) -> float:
        return float(next(r["prob"] for r in records
                          if r["condition"] == condition and r["prompt_index"] == 0
                          and r["position"] == "last" and r["layer"] == last_layer
                          and r["lens"] == lens and r["object"] == obj))

    return {f"{c}_{o}": prob(c, o) for c in ("pre", "post") for o in objects}


def _post_logit_probs(
    model: Model, edits: Sequence[EditLike], prompt: _Prompt
) -> Float[torch.Tensor, "layer d_vocab"]:
    """Logit-lens probabilities at every layer, post-edit, at the last token of ``prompt``."""
    with _state(model, edits, post=True):
        st = _layer_states(model, prompt.text, [prompt.positions["last"]])
    return _decode_groups(model, [st], "logit", None)[0][:, 0]


def _verdict(records: list[dict[str, Any]], output: dict[str, float]) -> str:
    """ERASURE if nothing is decodable, else INSERTION if the new object wins, else PARTIAL."""
    if not any(r.get("decodable") for r in records):
        return ERASURE
    return INSERTION if output["post_new"] > output["post_old"] else PARTIAL


def _baseline_prompts(
    model: Model, baseline: ProbeReport, request: EditRequest,
    objects: dict[str, int], lenses: Sequence[str],
) -> list[_Prompt]:
    """The prompts of ``baseline``, after checking it probed the same fact the same way."""
    if (baseline.request.text, baseline.request.target_true) != (request.text,
                                                                  request.target_true):
        raise InvalidRequestError(
            f"baseline probed {baseline.request.text!r} -> {baseline.request.target_true!r}, "
            f"not {request.text!r} -> {request.target_true!r}"
        )
    if baseline.objects and baseline.objects != objects:
        raise InvalidRequestError(f"baseline tracked tokens {baseline.objects}, not {objects}")
    missing = [name for name in lenses if name not in baseline.lenses]
    if missing:
        raise InvalidRequestError(f"baseline has no cells for lens(es) {missing}")
    kinds = {r["prompt_index"]: r["prompt_kind"] for r in baseline.records}
    return [_prompt(model, kinds[i], text, request.subject)
            for i, text in enumerate(baseline.prompts.values())]


def _cell_records(
    p: Float[torch.Tensor, "layer pos d_vocab"], objects: dict[str, int], other: dict[str, int],
    prompt: _Prompt, index: int, condition: str, lens: str,
) -> list[dict[str, Any]]:
    """One record per (layer, position, object) of one decoded (prompt, condition, lens)."""
    out = []
    for obj, tok in objects.items():
        ranks = _rank(p, tok).tolist()
        probs = p[..., tok]
        excl = (probs / (1 - p[..., other[obj]]).clamp_min(1e-12)).tolist()
        probs_l = probs.tolist()
        for layer_i in range(p.shape[0]):
            for j, pos_name in enumerate(POSITIONS):
                out.append({
                    "condition": condition, "prompt_kind": prompt.kind, "prompt_index": index,
                    "prompt": prompt.text, "position": pos_name, "layer": layer_i,
                    "lens": lens, "object": obj, "rank": int(ranks[layer_i][j]),
                    "prob": float(probs_l[layer_i][j]),
                    "prob_excl_other": float(excl[layer_i][j]),
                })
    return out


def _mark_decodable(records: list[dict[str, Any]], rule: VerdictRule, layer: int) -> None:
    """Set ``decodable`` on the post-edit old-object cells at layers >= L."""
    control = {
        (r["prompt_index"], r["position"], r["layer"], r["lens"]): r["prob_excl_other"]
        for r in records if r["condition"] == "control" and r["object"] == "old"
    }
    for r in records:
        if r["condition"] != "post" or r["object"] != "old" or r["layer"] < layer:
            continue
        if rule.lenses is not None and r["lens"] not in rule.lenses:
            continue
        if rule.prompt_kinds is not None and r["prompt_kind"] not in rule.prompt_kinds:
            continue
        ctrl = control[(r["prompt_index"], r["position"], r["layer"], r["lens"])]
        r["control_prob"] = ctrl
        r["decodable"] = (
            r["rank"] <= rule.top_k and r["prob_excl_other"] >= rule.control_ratio * ctrl
        )


@torch.no_grad()
def _consistency(
    model: Model, edits: Sequence[EditLike],
    probes: Sequence[tuple[str, str, str]],
) -> list[dict[str, Any]]:
    """Which world (old or new fact) each consistency prompt answers from, pre and post."""
    out = []
    for prompt, old, new in probes:
        ids_old, ids_new = target_tokens(model, old).tolist(), target_tokens(model, new).tolist()
        # first token where the two answers differ (e.g. after a shared leading space)
        k = next((i for i, (a, b) in enumerate(zip(ids_old, ids_new, strict=False)) if a != b),
                 None)
        if k is None:
            raise InvalidRequestError(f"consistency answers {old!r} and {new!r} do not differ")
        t_old, t_new = ids_old[k], ids_new[k]
        prefix = torch.tensor(ids_old[:k], dtype=torch.long)
        tokens = torch.cat([access.to_tokens(model, prompt), prefix]).to(model.cfg.device)[None]
        row: dict[str, Any] = {"prompt": prompt, "old": old, "new": new}
        for post in (False, True):
            with _state(model, edits, post):
                final = access.final_residual(model, tokens)[0, -1]
            probs = access.decode_residual(model, final).softmax(-1)
            tag = "post" if post else "pre"
            row[f"{tag}_p_old"], row[f"{tag}_p_new"] = float(probs[t_old]), float(probs[t_new])
            row[f"{tag}_top1"] = str(model.to_string(probs.argmax()[None]))
            row[f"{tag}_world"] = "new" if probs[t_new] > probs[t_old] else "old"
        out.append(row)
    return out
