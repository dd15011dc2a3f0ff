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
    >>> report = probe_edit(model, edit)
    >>> report.verdict, report.best_rank("old")
    ('INSERTION', 2)
    >>> report.to_dataframe().query("object == 'old' and lens == 'logit'")
    >>> report.plot("probe.png")
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, cast

import torch
from jaxtyping import Float
from transformer_lens import HookedTransformer

from rome_lens.audit.lens import TunedLens, logit_lens, tuned_lens
from rome_lens.errors import EditStateError, InvalidRequestError
from rome_lens.models import access
from rome_lens.requests import EditRequest, subject_token_span, target_tokens
from rome_lens.rome.compute import default_entropy_layers

logger = logging.getLogger(__name__)

INSERTION, ERASURE, PARTIAL = "INSERTION", "ERASURE", "PARTIAL"
POSITIONS = ("last_subject", "last")


class EditLike(Protocol):
    """Anything :func:`probe_edit` can audit: a layer, a request, and ``applied(model)``.

    :class:`~rome_lens.rome.edit.RomeEdit` is one; a custom weight or hook edit can be another.
    """

    layer: int
    request: EditRequest

    def applied(self, model: HookedTransformer) -> Any:
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


@dataclass
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
        from rome_lens.plotting import probe_ranks

        return probe_ranks(self, path=path, prompt_kind=prompt_kind)


# --------------------------------------------------------------------------- internals
@contextmanager
def _state(model: HookedTransformer, edits: Sequence[EditLike], post: bool) -> Iterator[None]:
    """Model with the edits applied (``post``) or removed, restored to its state on exit."""
    from rome_lens.rome.edit import RomeEdit

    already = [e for e in edits if isinstance(e, RomeEdit) and e.is_applied(model)]
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
    kind: str
    text: str
    positions: dict[str, int]
    span: tuple[int, int]


def _prompts(
    model: HookedTransformer, request: EditRequest, paraphrases: Sequence[str],
    contexts: Sequence[str],
) -> list[_Prompt]:
    out = []
    variants = [("edit", request.text)] + [("paraphrase", p) for p in paraphrases]
    variants += [("context", c.replace("{}", request.text)) for c in contexts]
    for kind, text in variants:
        tokens, span = subject_token_span(model, text, request.subject)
        out.append(_Prompt(kind, text, {"last_subject": span[1] - 1,
                                        "last": int(tokens.shape[0]) - 1}, span))
    return out


@torch.no_grad()
def _layer_states(
    model: HookedTransformer, text: str, positions: list[int], hooks: list[Any] | None = None,
    samples: int = 1,
) -> Float[torch.Tensor, "rows layer pos d_model"]:
    """Residual after every block at ``positions`` (``samples`` rows when hooks add noise)."""
    n_layers = access.n_layers(model)
    names = [access.resid_post_hook_name(layer) for layer in range(n_layers)]
    tokens = access.to_tokens(model, text).to(model.cfg.device)[None].expand(samples, -1)
    with model.hooks(fwd_hooks=hooks or []):
        _, cache = model.run_with_cache(
            tokens, names_filter=lambda n: n in names, stop_at_layer=n_layers
        )
    return torch.stack([cache[n][:, positions] for n in names], dim=1)


@torch.no_grad()
def _decode(
    model: HookedTransformer, states: torch.Tensor, lens: str, tuned: TunedLens | None
) -> Float[torch.Tensor, "rows layer pos d_vocab"]:
    """Probabilities through a lens, averaged later over rows by the caller."""
    rows, n_layers, n_pos, d = states.shape
    out = []
    for layer in range(n_layers):
        h = states[:, layer].reshape(-1, d)
        logits = logit_lens(model, h) if lens == "logit" else cast(TunedLens, tuned).logits(
            model, h, layer)
        out.append(logits.softmax(-1).reshape(rows, n_pos, -1))
    return torch.stack(out, dim=1)


def _rank(probs: Float[torch.Tensor, "... d_vocab"], token: int) -> torch.Tensor:
    return (probs > probs[..., token : token + 1]).sum(-1) + 1


@torch.no_grad()
def _structural_check(
    model: HookedTransformer, edits: Sequence[EditLike], text: str, layer: int
) -> dict[str, Any]:
    """Compare every state upstream of block ``layer``'s MLP output, pre vs post, bit for bit."""
    names = [access.resid_pre_hook_name(lyr) for lyr in range(layer + 1)]
    names += [access.attn_out_hook_name(layer), f"blocks.{layer}.hook_resid_mid",
              access.key_hook_name(layer)]
    tokens = access.to_tokens(model, text).to(model.cfg.device)[None]
    caches = []
    for post in (False, True):
        with _state(model, edits, post):
            _, cache = model.run_with_cache(
                tokens, names_filter=lambda n: n in names, stop_at_layer=layer + 1
            )
        caches.append(cache)
    differing = [n for n in names if n in caches[0].cache_dict
                 and not torch.equal(caches[0][n], caches[1][n])]
    compared = [n for n in names if n in caches[0].cache_dict]
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
    model: HookedTransformer,
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
) -> ProbeReport:
    """Audit an edit: is the original object still decodable downstream of the edited layer?

    Args:
        model: the model; its edit state is the same on return as on entry.
        edit: one edit or several (stacked); edits not applied are applied for the post run,
            applied :class:`~rome_lens.rome.edit.RomeEdit` s are reverted for the pre run.
        request: the fact probed (default: the first edit's request; needs ``target_true``).
        paraphrases: extra prompts containing the subject (e.g. CounterFact's).
        n_contexts: context-prefixed variants of the edit prompt (model-written prefixes,
            sampled with a different seed from the ones ROME optimised on).
        lenses: ``"logit"`` and/or ``"tuned"``.
        lens: the tuned lens (default: :func:`~rome_lens.audit.lens.tuned_lens`, cached).
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

    Returns:
        A :class:`ProbeReport`.

    Raises:
        InvalidRequestError: no ``target_true``, or an unknown lens.
        SubjectNotFoundError: a paraphrase without the subject.
        EditStateError: the structural check failed (states upstream of L changed).
    """
    from rome_lens.rome.contexts import context_templates
    from rome_lens.rome.hparams import default_hparams
    from rome_lens.tracing.causal import _subject_noise_hook, embedding_std

    edits: list[EditLike] = (
        [cast(EditLike, edit)] if hasattr(edit, "applied") else list(cast(Sequence[EditLike], edit))
    )
    if not edits:
        raise InvalidRequestError("no edit to probe")
    request = request or edits[0].request
    if request.target_true is None:
        raise InvalidRequestError("the probed request needs target_true (the original object)")
    bad = [name for name in lenses if name not in ("logit", "tuned")]
    if bad:
        raise InvalidRequestError(f"unknown lens {bad}; use 'logit' and/or 'tuned'")
    rule = rule or VerdictRule()
    layer = min(e.layer for e in edits)
    n_layers = access.n_layers(model)
    if object_tokens is not None:
        objects = {"old": int(object_tokens[0]), "new": int(object_tokens[1])}
    else:
        objects = {"old": int(target_tokens(model, request.target_true)[0]),
                   "new": int(target_tokens(model, request.target_new)[0])}
    if objects["old"] == objects["new"]:
        raise InvalidRequestError(
            f"the original and new objects start with the same token ({objects['old']}); "
            "pass object_tokens"
        )

    with _state(model, edits, post=False):
        hp = default_hparams(model)
        hp = replace(hp, seed=hp.seed + 1, n_contexts_short=max(1, n_contexts),
                     n_contexts_long=0)
        contexts = context_templates(model, hp)[1 : 1 + n_contexts] if n_contexts > 0 else []
        tuned = None
        if "tuned" in lenses:
            tuned = lens or tuned_lens(model)
            tuned.check(model)
    prompts = _prompts(model, request, paraphrases, contexts)
    structural = _structural_check(model, edits, request.text, layer)

    other = {"old": objects["new"], "new": objects["old"]}
    records: list[dict[str, Any]] = []
    probs_by: dict[tuple[str, str, str], torch.Tensor] = {}
    std = 3.0 * embedding_std(model)
    for i, prompt in enumerate(prompts):
        pos = [prompt.positions[p] for p in POSITIONS]
        noise = _subject_noise_hook(model, prompt.span, control_samples, std, seed + i)
        states = {}
        with _state(model, edits, post=False):
            states["pre"] = _layer_states(model, prompt.text, pos)
            states["control"] = _layer_states(
                model, prompt.text, pos, [(access.EMBED_HOOK, noise)], control_samples)
        with _state(model, edits, post=True):
            states["post"] = _layer_states(model, prompt.text, pos)
        for lens_name in lenses:
            for condition, st in states.items():
                p = _decode(model, st, lens_name, tuned).mean(0)  # [layer, pos, vocab]
                probs_by[(prompt.kind + str(i), lens_name, condition)] = p
                for obj, tok in objects.items():
                    ranks = _rank(p, tok)
                    for layer_i in range(n_layers):
                        for j, pos_name in enumerate(POSITIONS):
                            records.append({
                                "condition": condition, "prompt_kind": prompt.kind,
                                "prompt_index": i, "prompt": prompt.text,
                                "position": pos_name, "layer": layer_i, "lens": lens_name,
                                "object": obj, "rank": int(ranks[layer_i, j]),
                                "prob": float(p[layer_i, j, tok]),
                                "prob_excl_other": float(
                                    p[layer_i, j, tok] / (1 - p[layer_i, j, other[obj]])
                                    .clamp_min(1e-12)
                                ),
                            })
    _mark_decodable(records, rule, layer)

    post_edit = probs_by[("edit0", lenses[0], "post")]
    pre_edit = probs_by[("edit0", lenses[0], "pre")]
    output = {f"{c}_{o}": float(p[-1, 1, t]) for c, p in (("pre", pre_edit), ("post", post_edit))
              for o, t in objects.items()}
    att_layers = (list(attack_layers) if attack_layers is not None
                  else default_entropy_layers(model, layer))
    if "logit" in lenses:
        attack_probs = probs_by[("edit0", "logit", "post")][:, 1]
    else:
        with _state(model, edits, post=True):
            st = _layer_states(model, request.text, [prompts[0].positions["last"]])
        attack_probs = _decode(model, st, "logit", None).mean(0)[:, 0]
    attacks = _attacks(attack_probs, att_layers, objects["old"], budgets)
    consist = _consistency(model, edits, consistency)

    decodable = any(r.get("decodable") for r in records)
    new_wins = output["post_new"] > output["post_old"]
    verdict = ERASURE if not decodable else (INSERTION if new_wins else PARTIAL)
    return ProbeReport(
        request=request, layer=layer, verdict=verdict, rule=rule, records=records,
        attack_layers=att_layers,
        attacks=attacks, structural=structural, consistency=consist, output=output,
        prompts={f"{p.kind}{i}": p.text for i, p in enumerate(prompts)},
    )


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
    model: HookedTransformer, edits: Sequence[EditLike],
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
                final = model(tokens, stop_at_layer=access.n_layers(model))[0, -1]
            probs = access.decode_residual(model, final).softmax(-1)
            tag = "post" if post else "pre"
            row[f"{tag}_p_old"], row[f"{tag}_p_new"] = float(probs[t_old]), float(probs[t_new])
            row[f"{tag}_top1"] = str(model.to_string(probs.argmax()[None]))
            row[f"{tag}_world"] = "new" if probs[t_new] > probs[t_old] else "old"
        out.append(row)
    return out
