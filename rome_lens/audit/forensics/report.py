"""The values a forensic scan returns: findings, their components, the report.

A :class:`ScanReport` lists one :class:`Finding` per suspected edit site (a weight), each with
its low-rank :class:`Component` s (singular value, decoded object tokens) and, for MLP output
weights, a reversal (an :class:`~rome_lens.edits.Edit` that removes the change). Probe prompts
give :class:`Recovery` rows: what the model predicts edited, reversed and, when the base is
known, unedited.

Example:
    >>> edit = rome_lens.compute_edit(model, request, hparams=hp, corpus=corpus).apply(model)
    >>> report = rome_lens.audit.scan(model)            # base weights: the edit registry
    >>> report
    ScanReport(base:registry, 1 finding: blocks.1.mlp.W_out rank 1 -> ... 1.00)
    >>> report.to_dataframe().columns[:3].tolist()
    ['layer', 'weight', 'mode']
    >>> rome_lens.revert_all(model)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float

from rome_lens._extras import require
from rome_lens.edits import Edit
from rome_lens.plotting import forensic_scan

#: Key-subspace score at and above which a layer is flagged without base weights (see
#: :class:`ScanConfig`).
KEY_THRESHOLD = 4.0
#: Matched-filter z at and above which a candidate subject is named edited at a layer, blind.
MATCH_THRESHOLD = 8.0


@dataclass(frozen=True)
class ScanConfig:
    """Thresholds and sizes of a scan.

    Attributes:
        z_threshold: spectral outlier score (see
            :mod:`rome_lens.audit.forensics.spectrum`) at and above which a component of an MLP
            output weight is flagged without base weights. Set on tiny random models (3 and 6
            layers, three architectures: unedited |z| < 1; a planted rank-one change of 0.5x
            the weight's Frobenius norm z 5.5-6.6, of 1x z 12-13, of 0.3x z 1.7-3); the
            embedded model's calibration is ``benchmarks/forensics.py``.
        z_floor: smallest scale of the outlier score, in log units of singular values.
        max_components: components per finding decoded into tokens (rank-k changes).
        top_k: decoded object strings kept per component.
        subject_threshold: a candidate is named the subject when the change fires on its key
            at least this many times as much as on a typical token's (median) key (tiny
            models: the ROME edit's own subject 3.7-10, other subjects at most 1.6).
        n_subjects: candidates kept per finding, best first.
        dense_above: a base difference of higher rank becomes a dense reversal site.
        cache_keys: keep the candidates' keys per layer in the on-disk cache (see
            :mod:`rome_lens.audit.forensics.decode`), so a dataset's thousands of subjects run
            through the model once per base model, layer and template set.
        queries: question templates (``{}`` for the subject) whose next-token distributions
            read a finding's new object once its subject is named: the tokens whose
            probability the change raises most, summed over the questions (the finding's
            reversal gives the model without the change). ``None``: the first template of
            every relation in :data:`rome_lens.evaluation.relations.RELATIONS`; ``()``: decode
            the change's value direction through the lens instead (what is done anyway when no
            subject is named).
        key_subspace: fraction of the key directions, those of least variance under the key
            statistics ``C``, in which a scan without base weights looks for a standing-out
            component (ROME/MEMIT-style updates ``~ C^-1 k`` live there; see
            :func:`~rome_lens.audit.forensics.spectrum.key_subspace_scores`); 0 turns it off.
        key_threshold: the key-subspace score at and above which a layer is flagged (embedded
            model: ``benchmarks/forensics_subspace.py``).
        match_threshold: without base weights but with candidates, a candidate whose matched
            score at a layer (:func:`~rome_lens.audit.forensics.spectrum.matched_subject_scores`:
            the weight's response along ROME's update direction of the candidate's key, z over
            all candidates) reaches this value is named edited there; ``inf`` turns it off.
            Embedded model (``benchmarks/forensics_subspace.py``): ROME edits' own subjects
            z 22-38 at layer 1 and 11-27 at layer 6, the unedited model's maximum 5.4 over 18
            layers x 320 candidates.
        match_min_candidates: the matched score needs this many candidates (its median and MAD
            are taken over them); with fewer it is not computed.
        match_templates: the matched score reads each candidate's key from the first this many
            context templates (0: all). The keys are needed at every layer of the model as it
            is; on the embedded model 3 templates give the same z (ROME edits' subjects 22-39,
            unedited maximum 4.9 over 200 candidates) in 7 s instead of 110 s.
    """

    z_threshold: float = 4.0
    z_floor: float = 0.1
    max_components: int = 4
    top_k: int = 10
    subject_threshold: float = 3.0
    n_subjects: int = 10
    dense_above: int = 64
    cache_keys: bool = True
    queries: tuple[str, ...] | None = None
    key_subspace: float = 0.125
    key_threshold: float = KEY_THRESHOLD
    match_threshold: float = MATCH_THRESHOLD
    match_min_candidates: int = 20
    match_templates: int = 3


@dataclass(frozen=True, eq=False)
class Component:
    """One singular component ``s * left right^T`` of a (suspected) change.

    Attributes:
        index: 0 for the largest.
        singular_value: ``s``.
        objects: decoded top tokens of the value direction, on its sharper side, best first.
        suppressed: top tokens of the opposite side (often the original object).
        score: the spectral outlier score (scans without base weights), else ``None``.
        left: the key-side direction ``[d_mlp]`` (unit norm; oriented like ``objects``).
        right: the value-side direction ``[d_model]`` (unit norm).
    """

    index: int
    singular_value: float
    objects: tuple[str, ...]
    suppressed: tuple[str, ...]
    score: float | None
    left: Float[torch.Tensor, " d_mlp"]
    right: Float[torch.Tensor, " d_model"]

    def __repr__(self) -> str:
        score = f", z {self.score:.1f}" if self.score is not None else ""
        return (f"Component(#{self.index}: s {self.singular_value:.4g}{score}; "
                f"-> {list(self.objects[:3])})")


@dataclass(frozen=True, eq=False)
class Finding:
    """A suspected edit site.

    Attributes:
        layer: the block (``None`` for a weight outside the blocks).
        weight: the weight's name (``blocks.L.mlp.W_out`` for MLP output weights, else the
            model's state-dict name).
        mode: ``"base"`` (an exact difference to base weights), ``"spectrum"`` (inferred from the
            spectrum of the weight), ``"keys"`` (inferred from the weight in the
            low-variance key subspace, see
            :func:`~rome_lens.audit.forensics.spectrum.key_subspace_scores`) or ``"subject"``
            (candidates' matched scores, see
            :func:`~rome_lens.audit.forensics.spectrum.matched_subject_scores`).
        confidence: in [0, 1]; 1 for a difference above rounding noise, else from the score.
        rank: numerical rank of the difference, or the number of flagged components.
        singular_values: of the difference (up to 16), or of the flagged components.
        objects: decoded top strings of the new object, best first (empty when not decoded).
        subject: the candidate the change fires on most, when it fires clearly; else ``None``.
        subjects: ``(candidate, score)`` best first (score: firing / typical firing; in mode
            ``"subject"`` the matched z of the candidates named edited).
        components: the decoded components.
        relative_norm: ``||D||_F / ||W_base||_F`` (with base weights), else ``None``.
        score: the largest outlier score (spectrum mode), key-subspace score (keys) or
            matched z (subject), else ``None``.
        reversal: an edit that removes the change (MLP output weights), else ``None``.
    """

    layer: int | None
    weight: str
    mode: str
    confidence: float
    rank: int
    singular_values: tuple[float, ...]
    objects: tuple[str, ...] = ()
    subject: str | None = None
    subjects: tuple[tuple[str, float], ...] = ()
    components: tuple[Component, ...] = ()
    relative_norm: float | None = None
    score: float | None = None
    reversal: Edit | None = None

    def __repr__(self) -> str:
        parts = [f"{self.weight} rank {self.rank}", f"confidence {self.confidence:.2f}"]
        if self.objects:
            parts.append(f"-> {list(self.objects[:3])}")
        if self.subject is not None:
            parts.append(f"subject {self.subject!r}")
        return f"Finding({self.mode}: " + ", ".join(parts) + ")"

    def row(self) -> dict[str, Any]:
        """One dataframe row (no tensors)."""
        best = self.subjects[0][1] if self.subjects else None
        return {
            "layer": self.layer, "weight": self.weight, "mode": self.mode,
            "confidence": self.confidence, "rank": self.rank,
            "top_singular_value": self.singular_values[0] if self.singular_values else None,
            "relative_norm": self.relative_norm, "score": self.score,
            "objects": list(self.objects), "subject": self.subject, "subject_score": best,
            "reversible": self.reversal is not None,
        }


@dataclass(frozen=True)
class Recovery:
    """What a probe prompt predicts edited, after the reversal and (if known) unedited.

    Attributes:
        prompt: the probe prompt.
        edited: top-1 token of the model as scanned.
        reversed: top-1 token with the report's reversal applied.
        base: top-1 token of the base model (``None`` when the base is unknown).
        restored: ``reversed == base`` (``None`` when the base is unknown).
        fraction: ``1 - KL(base || reversed) / KL(base || edited)``: the share of the edit's
            change of the next-token distribution that the reversal undid (``None`` when the
            base is unknown or the edit did not change the prompt's distribution).
    """

    prompt: str
    edited: str
    reversed: str
    base: str | None = None
    restored: bool | None = None
    fraction: float | None = None


@dataclass(frozen=True, eq=False)
class ScanReport:
    """The result of :func:`~rome_lens.audit.scan`.

    Attributes:
        mode: ``"base:model"``, ``"base:state_dict"``, ``"base:registry"`` or ``"spectrum"``.
        findings: one per suspected edit site, most confident first.
        layer_scores: every layer's spectral outlier score of its MLP output weight (top
            component), computed in every mode (for plots and calibration).
        threshold: the score threshold used without base weights.
        key_scores: every layer's key-subspace score (scans without base weights; ``None``
            otherwise or when ``ScanConfig.key_subspace`` is 0).
        key_threshold: the key-subspace score threshold used.
        recovery: one row per probe prompt (empty without probes).
        reversal: every finding's reversal in one edit (``None`` when nothing is reversible).
        model_name: the scanned model's name.
    """

    mode: str
    findings: tuple[Finding, ...]
    layer_scores: Float[torch.Tensor, " layer"]
    threshold: float
    key_scores: Float[torch.Tensor, " layer"] | None = None
    key_threshold: float = KEY_THRESHOLD
    recovery: tuple[Recovery, ...] = ()
    reversal: Edit | None = None
    model_name: str = ""

    @property
    def layers(self) -> tuple[int, ...]:
        """The blocks with a finding, ascending."""
        return tuple(sorted({f.layer for f in self.findings if f.layer is not None}))

    def to_dataframe(self) -> Any:
        """One row per finding (pandas)."""
        pandas = require("pandas", "ScanReport.to_dataframe")
        return pandas.DataFrame([f.row() for f in self.findings], columns=_COLUMNS)

    def plot(self, path: str | None = None) -> Any:
        """Layer outlier scores and each finding's singular values (``rome_lens[plots]``)."""
        return forensic_scan(self, path)

    def summary(self) -> dict[str, Any]:
        """JSON-able summary (what ``rome-lens scan --json`` prints)."""
        return {
            "mode": self.mode, "model": self.model_name, "threshold": self.threshold,
            "layer_scores": [round(float(s), 3) for s in self.layer_scores],
            "key_scores": (None if self.key_scores is None
                           else [round(float(s), 3) for s in self.key_scores]),
            "findings": [f.row() | {"singular_values": list(f.singular_values[:8])}
                         for f in self.findings],
            "recovery": [vars(r) for r in self.recovery],
            "reversal": self.reversal.id if self.reversal is not None else None,
        }

    def __repr__(self) -> str:
        n = len(self.findings)
        head = f"ScanReport({self.mode}, {n} finding{'' if n == 1 else 's'}"
        if not n:
            return head + ")"
        shown = "; ".join(_short(f) for f in self.findings[:3])
        more = f"; ... ({n - 3} more)" if n > 3 else ""
        restored = [r.restored for r in self.recovery if r.restored is not None]
        tail = f"; probes restored {sum(restored)}/{len(restored)}" if restored else ""
        return f"{head}: {shown}{more}{tail})"


_COLUMNS = ["layer", "weight", "mode", "confidence", "rank", "top_singular_value",
            "relative_norm", "score", "objects", "subject", "subject_score", "reversible"]


def _short(finding: Finding) -> str:
    text = f"{finding.weight} rank {finding.rank}"
    if finding.objects:
        text += f" -> {finding.objects[0]!r}"
    if finding.subject is not None:
        text += f" (subject {finding.subject!r})"
    return text + f" {finding.confidence:.2f}"
