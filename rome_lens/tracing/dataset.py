"""Causal tracing over many facts: the paper's summary of average effects by token class.

Each fact's trace is reduced to six token classes (first / middle / last subject token, first
token after the subject, further tokens, last token), as in the ROME paper's summary figure, and
averaged over facts. Facts are kept only if the model predicts them (its top-1 token starts the
known answer). Per-fact results are appended to a JSONL file as they come, so an interrupted run
resumes where it stopped.

Example (``known_1000.json`` is the ROME paper's dataset; here one fact written out):
    >>> facts = load_known_facts("known_1000.json")[:100]  # doctest: +SKIP
    >>> facts = [Fact("The Eiffel Tower is located in the city of", "The Eiffel Tower", "Paris")]
    >>> summary = trace_dataset(model, facts, out="traces.jsonl", only_known=False)
    >>> summary.n_facts
    1
    >>> fig = summary.plot("summary.png")
    >>> df = summary.to_dataframe()
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from rome_lens._typing import Model
from rome_lens.errors import RomeLensError
from rome_lens.plotting import summary_heatmaps
from rome_lens.predict import next_token_logprobs
from rome_lens.requests import target_tokens
from rome_lens.tracing.causal import KINDS, CausalTraceResult, causal_trace

logger = logging.getLogger(__name__)

TOKEN_CLASSES = (
    "first subject token",
    "middle subject tokens",
    "last subject token",
    "first subsequent token",
    "further tokens",
    "last token",
)


@dataclass(frozen=True)
class Fact:
    """A fact to trace: prompt, subject and the expected answer."""

    prompt: str
    subject: str
    answer: str
    known_id: int = -1


def load_known_facts(path: str | os.PathLike[str]) -> list[Fact]:
    """Read ``known_1000.json`` (subject, attribute, prompt, known_id)."""
    raw = json.loads(Path(path).read_text())
    return [
        Fact(r["prompt"], r["subject"], r["attribute"], int(r.get("known_id", i)))
        for i, r in enumerate(raw)
    ]


def model_knows(model: Model, fact: Fact) -> bool:
    """Whether the model's top-1 next token is the first token of the answer."""
    try:
        first = int(target_tokens(model, fact.answer)[0])
        return int(next_token_logprobs(model, fact.prompt).argmax()) == first
    except RomeLensError:
        return False


def token_class_of(pos: int, span: tuple[int, int], n_tok: int) -> str:
    """The paper's token class of position ``pos`` (subject span half-open)."""
    start, end = span
    if pos == n_tok - 1:
        return "last token"
    if pos == end - 1:
        return "last subject token"
    if pos == start:
        return "first subject token"
    if start < pos < end - 1:
        return "middle subject tokens"
    if pos == end:
        return "first subsequent token"
    if pos > end:
        return "further tokens"
    return "before subject"


def class_effects(trace: CausalTraceResult) -> dict[str, dict[str, list[float]]]:
    """``{kind: {class: [mean indirect effect per layer]}}`` of one trace."""
    n_tok = len(trace.tokens)
    out: dict[str, dict[str, list[float]]] = {}
    for kind in trace.scores:
        ie = trace.indirect_effect(kind)
        out[kind] = {}
        for cls in TOKEN_CLASSES:
            cols = [
                p for p in range(n_tok) if token_class_of(p, trace.subject_span, n_tok) == cls
            ]
            if cols:
                out[kind][cls] = ie[:, cols].mean(-1).tolist()
    return out


@dataclass
class TraceSummary:
    """Average effects over facts.

    Attributes:
        n_facts: facts traced.
        p_clean: mean clean p(answer).
        p_corrupted: mean corrupted p(answer).
        effects: ``{kind: {class: tensor [n_layers]}}`` average indirect effects.
        counts: ``{class: facts contributing}``.
        per_fact: the per-fact records (as written to the JSONL file).
    """

    n_facts: int
    p_clean: float
    p_corrupted: float
    effects: dict[str, dict[str, torch.Tensor]]
    counts: dict[str, int]
    per_fact: list[dict[str, Any]] = field(default_factory=list)

    def __repr__(self) -> str:
        curves = [curve for classes in self.effects.values() for curve in classes.values()]
        layers = int(curves[0].shape[0]) if curves else 0
        return (
            f"TraceSummary(n_facts={self.n_facts}, p_clean={self.p_clean:.4g}, "
            f"p_corrupted={self.p_corrupted:.4g}, kinds={tuple(self.effects)}, "
            f"classes={len(self.counts)}, layers={layers})"
        )

    @property
    def total_effect(self) -> float:
        """Average total effect ``p_clean - p_corrupted``."""
        return self.p_clean - self.p_corrupted

    def peak(self, kind: str, cls: str = "last subject token") -> tuple[int, float]:
        """``(layer, average indirect effect)`` of the strongest layer for a kind and class."""
        curve = self.effects[kind][cls]
        layer = int(curve.argmax())
        return layer, float(curve[layer])

    def to_dataframe(self) -> Any:
        """Long format: kind, token class, layer, average indirect effect."""
        import pandas as pd

        return pd.DataFrame([
            {"kind": kind, "token_class": cls, "layer": layer, "aie": float(v)}
            for kind, classes in self.effects.items()
            for cls, curve in classes.items()
            for layer, v in enumerate(curve)
        ])

    def plot(self, path: str | None = None) -> Any:
        """Heatmaps of average indirect effect, token class x layer, one per kind."""
        return summary_heatmaps(self, path=path, row_order=TOKEN_CLASSES)


def summarize_records(records: Sequence[dict[str, Any]]) -> TraceSummary:
    """Average per-fact records (as produced by :func:`trace_dataset`)."""
    if not records:
        raise RomeLensError("no traced facts to summarise")
    effects: dict[str, dict[str, torch.Tensor]] = {}
    counts: dict[str, int] = {}
    for kind in records[0]["effects"]:
        effects[kind] = {}
        for cls in TOKEN_CLASSES:
            curves = [r["effects"][kind][cls] for r in records if cls in r["effects"][kind]]
            if curves:
                effects[kind][cls] = torch.tensor(curves).mean(0)
                counts[cls] = len(curves)
    return TraceSummary(
        n_facts=len(records),
        p_clean=float(sum(r["p_clean"] for r in records) / len(records)),
        p_corrupted=float(sum(r["p_corrupted"] for r in records) / len(records)),
        effects=effects,
        counts=counts,
        per_fact=list(records),
    )


def _read_records(path: Path | None) -> dict[str, dict[str, Any]]:
    """Per-fact records already in a JSONL file, by key (none if there is no file yet)."""
    done: dict[str, dict[str, Any]] = {}
    if path is not None and path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                done[row["key"]] = row
    return done


def trace_dataset(
    model: Model,
    facts: Sequence[Fact],
    out: str | os.PathLike[str] | None = None,
    kinds: Sequence[str] = KINDS,
    only_known: bool = True,
    progress: bool = True,
    **trace_kwargs: Any,
) -> TraceSummary:
    """Trace every fact and average the effects by token class and layer.

    Args:
        model: the model.
        facts: facts to trace.
        out: JSONL file for per-fact results; facts already in it are not traced again.
        kinds: state kinds traced.
        only_known: skip facts the model does not predict (recorded as skipped).
        progress: show a progress bar.
        **trace_kwargs: passed to :func:`~rome_lens.tracing.causal_trace` (samples, noise, ...).

    Returns:
        A :class:`TraceSummary` over the traced (known) facts.
    """
    path = Path(out) if out is not None else None
    done = _read_records(path)
    sink = path.open("a") if path is not None else None
    try:
        for fact in tqdm(facts, desc="tracing facts", disable=not progress):
            key = f"{fact.known_id}|{fact.prompt}|{fact.subject}"
            if key in done:
                continue
            rec: dict[str, Any] = {"key": key, "known_id": fact.known_id, "prompt": fact.prompt}
            if only_known and not model_knows(model, fact):
                rec["skipped"] = "not known"
            else:
                try:
                    trace = causal_trace(model, fact.prompt, fact.subject, fact.answer,
                                         kinds=kinds, **trace_kwargs)
                except RomeLensError as exc:
                    rec["skipped"] = str(exc)
                else:
                    rec.update({
                        "p_clean": trace.p_clean,
                        "p_corrupted": trace.p_corrupted,
                        "effects": class_effects(trace),
                    })
            done[key] = rec
            if sink is not None:
                sink.write(json.dumps(rec) + "\n")
                sink.flush()
    finally:
        if sink is not None:
            sink.close()
    keys = {f"{f.known_id}|{f.prompt}|{f.subject}" for f in facts}
    traced = [r for k, r in done.items() if k in keys and "skipped" not in r]
    return summarize_records(traced)
