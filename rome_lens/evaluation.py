"""CounterFact-style evaluation of edits (REFERENCE.md §3).

For each record, the comparison quantity is the mean per-token log-probability of
``" " + target`` after a prompt. Efficacy (ES) is the fraction of edit prompts where the new
object beats the true one, paraphrase (PS) the same on paraphrases, neighbourhood (NS) the
fraction of neighbour prompts (other subjects sharing the true object) where the true object still
wins, and S is the harmonic mean of ES, PS and NS.

Records may be in the flat EasyEdit layout of ``counterfact-dev.json`` (prompt, subject,
target_new, ground_truth, rephrase_prompt, locality_prompt, locality_ground_truth) or the
original nested CounterFact layout (requested_rewrite, paraphrase_prompts,
neighborhood_prompts); :func:`load_counterfact` reads both.

Example (one record written out; ``load_counterfact`` reads a file of them):
    >>> records = load_counterfact("counterfact-dev.json")[:10]  # doctest: +SKIP
    >>> records = [parse_record({
    ...     "prompt": "{} lives in", "subject": "Alice Smith", "target_new": "Paris",
    ...     "ground_truth": "Rome", "rephrase_prompt": "Where does Alice Smith live? In",
    ...     "locality_prompt": "Bob Jones lives in", "locality_ground_truth": "Rome"})]
    >>> before, after = evaluate_rome(model, records)   # RecordScores lists: unedited, edited
    >>> summarize(after)
    {'n': 1.0, 'ES': ..., 'PS': ..., 'NS': ..., 'S': ..., 'EM': ..., ...}
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from rome_lens._typing import Model
from rome_lens.errors import RomeLensError
from rome_lens.predict import target_logprob
from rome_lens.requests import EditRequest

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CounterFactRecord:
    """One CounterFact case in a layout-independent form."""

    case_id: int
    request: EditRequest
    paraphrase_prompts: list[str]
    neighborhood_prompts: list[str]
    target_true: str
    generation_prompts: list[str] = field(default_factory=list)

    @property
    def target_new(self) -> str:
        """The new object."""
        return self.request.target_new


def _from_flat(rec: dict[str, Any]) -> CounterFactRecord:
    request = EditRequest(
        prompt=rec["prompt"],
        subject=rec["subject"],
        target_new=rec["target_new"],
        target_true=rec["ground_truth"],
    )
    para = rec.get("rephrase_prompt") or []
    neigh = rec.get("locality_prompt") or []
    return CounterFactRecord(
        case_id=int(rec.get("case_id", -1)),
        request=request,
        paraphrase_prompts=[para] if isinstance(para, str) else list(para),
        neighborhood_prompts=[neigh] if isinstance(neigh, str) else list(neigh),
        target_true=rec["ground_truth"],
    )


def _from_nested(rec: dict[str, Any]) -> CounterFactRecord:
    rw = rec["requested_rewrite"]
    true = rw["target_true"]["str"]
    request = EditRequest(
        prompt=rw["prompt"],
        subject=rw["subject"],
        target_new=rw["target_new"]["str"],
        target_true=true,
    )
    return CounterFactRecord(
        case_id=int(rec.get("case_id", -1)),
        request=request,
        paraphrase_prompts=list(rec.get("paraphrase_prompts", [])),
        neighborhood_prompts=list(rec.get("neighborhood_prompts", [])),
        target_true=true,
        generation_prompts=list(rec.get("generation_prompts", [])),
    )


def parse_record(rec: dict[str, Any]) -> CounterFactRecord:
    """Parse one record of either layout.

    Raises:
        RomeLensError: if the record matches neither layout or its request is invalid.
    """
    if "requested_rewrite" in rec:
        return _from_nested(rec)
    if {"prompt", "subject", "target_new", "ground_truth"} <= rec.keys():
        return _from_flat(rec)
    raise RomeLensError(f"record is in no known CounterFact layout: keys {sorted(rec)}")


def load_counterfact(path: str | os.PathLike[str]) -> list[CounterFactRecord]:
    """Load CounterFact records (flat or nested layout); invalid records are skipped, logged."""
    raw = json.loads(Path(path).read_text())
    records = []
    for rec in raw:
        try:
            records.append(parse_record(rec))
        except RomeLensError as exc:
            logger.warning("skipping CounterFact record %s: %s", rec.get("case_id"), exc)
    return records


def prefers_new(model: Model, prompt: str, new: str, true: str) -> tuple[bool, float]:
    """Whether ``new`` is more likely than ``true`` after ``prompt`` (mean per-token NLL).

    Returns:
        ``(new wins, p_new - p_true)`` with p = exp(mean token log-prob).
    """
    lp_new = target_logprob(model, prompt, new)
    lp_true = target_logprob(model, prompt, true)
    return lp_new > lp_true, math.exp(lp_new) - math.exp(lp_true)


@dataclass
class RecordScores:
    """Scores of one record: booleans per prompt and magnitudes."""

    case_id: int
    efficacy: list[bool]
    paraphrase: list[bool]
    neighborhood: list[bool]
    efficacy_magnitude: list[float] = field(default_factory=list)
    paraphrase_magnitude: list[float] = field(default_factory=list)
    neighborhood_magnitude: list[float] = field(default_factory=list)
    seconds: float = 0.0
    fluency: float | None = None
    mentions_new: float | None = None
    mentions_true: float | None = None


def score_record(
    model: Model,
    record: CounterFactRecord,
    generation: bool = False,
    gen_prompts: int = 2,
    gen_tokens: int = 50,
) -> RecordScores:
    """Score one record on the model as it is now (edited or not).

    Args:
        model: the model, edited or not.
        record: the CounterFact case.
        generation: also generate (seeded) and score fluency and mentions of the objects.
        gen_prompts: generations per record: the record's generation prompts (original layout)
            or else the edit prompt and its paraphrases (the flat layout has none).
        gen_tokens: tokens per generation (the paper used 100).
    """
    new, true = record.target_new, record.target_true
    es = [prefers_new(model, record.request.text, new, true)]
    ps = [prefers_new(model, p, new, true) for p in record.paraphrase_prompts]
    ns = [prefers_new(model, p, new, true) for p in record.neighborhood_prompts]
    gen: dict[str, float] = {}
    if generation:
        prompts = record.generation_prompts or [record.request.text, *record.paraphrase_prompts]
        gen = generation_metrics(model, prompts[:gen_prompts], new, true, n_tokens=gen_tokens)
    return RecordScores(
        fluency=gen.get("fluency"),
        mentions_new=gen.get("mentions_new"),
        mentions_true=gen.get("mentions_true"),
        case_id=record.case_id,
        efficacy=[a for a, _ in es],
        paraphrase=[a for a, _ in ps],
        neighborhood=[not a for a, _ in ns],
        efficacy_magnitude=[m for _, m in es],
        paraphrase_magnitude=[m for _, m in ps],
        neighborhood_magnitude=[-m for _, m in ns],
    )


_WORD = re.compile(r"\w+|[^\w\s]")


def n_gram_entropy(
    text: str, ns: tuple[int, ...] = (2, 3), weights: tuple[float, ...] = (2 / 3, 4 / 3)
) -> float:
    """The ROME paper's fluency measure of one text: mean of weighted n-gram entropies (bits).

    Words and punctuation are the units; the entropy of the empirical n-gram distribution is
    taken for each n and multiplied by its weight, and the weighted values are averaged (the
    paper's GE is this times 100, averaged over generations). Repetitive text scores low.

    Example:
        >>> n_gram_entropy("a b a b a b a b") < n_gram_entropy("the cat sat on a warm mat today")
        True
    """
    words = _WORD.findall(text.lower())
    values = []
    for n, w in zip(ns, weights, strict=True):
        grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
        if not grams:
            values.append(0.0)
            continue
        counts = Counter(grams)
        total = len(grams)
        values.append(w * -sum(c / total * math.log2(c / total) for c in counts.values()))
    return statistics.fmean(values)


def generation_metrics(
    model: Model,
    prompts: list[str],
    target_new: str,
    target_true: str | None = None,
    n_tokens: int = 50,
    seed: int = 0,
) -> dict[str, float]:
    """Fluency and a simple consistency check on seeded generations (top-k 5 sampling).

    Returns:
        ``{"fluency": mean n_gram_entropy, "mentions_new": fraction of generations that
        mention target_new, "mentions_true": ... target_true}``.
    """
    from rome_lens.sampling import sample_tokens

    texts = []
    for i, prompt in enumerate(prompts):
        ids = sample_tokens(model, 1, n_tokens, top_k=5, seed=seed + i, prompt=prompt)
        texts.append(str(model.to_string(ids[0])))
    def mentions(target: str | None) -> float:
        if target is None:
            return float("nan")
        return statistics.fmean(target.strip().lower() in t.lower() for t in texts)

    return {
        "fluency": statistics.fmean(n_gram_entropy(t) for t in texts),
        "mentions_new": mentions(target_new),
        "mentions_true": mentions(target_true),
    }


def _mean_pct(values: list[list[bool]]) -> float:
    per_record = [statistics.fmean(v) for v in values if v]
    return 100.0 * statistics.fmean(per_record) if per_record else float("nan")


def harmonic_mean(values: list[float]) -> float:
    """Harmonic mean (0 if any value is 0)."""
    if any(v <= 0 for v in values):
        return 0.0
    return len(values) / sum(1.0 / v for v in values)


def summarize(scores: list[RecordScores]) -> dict[str, float]:
    """ES, PS, NS, S (percentages), EM/PM/NM (probability differences x 100) and timing."""
    es = _mean_pct([s.efficacy for s in scores])
    ps = _mean_pct([s.paraphrase for s in scores])
    ns = _mean_pct([s.neighborhood for s in scores])

    def mag(name: str) -> float:
        vals = [statistics.fmean(getattr(s, name)) for s in scores if getattr(s, name)]
        return 100.0 * statistics.fmean(vals) if vals else float("nan")

    return {
        "n": float(len(scores)),
        "ES": es,
        "PS": ps,
        "NS": ns,
        "S": harmonic_mean([es, ps, ns]),
        "EM": mag("efficacy_magnitude"),
        "PM": mag("paraphrase_magnitude"),
        "NM": mag("neighborhood_magnitude"),
        "GE": _mean_opt([s.fluency for s in scores], 100.0),
        "mentions_new": _mean_opt([s.mentions_new for s in scores], 100.0),
        "mentions_true": _mean_opt([s.mentions_true for s in scores], 100.0),
        "seconds_per_edit": statistics.fmean([s.seconds for s in scores]) if scores else 0.0,
    }


def _mean_opt(values: list[float | None], scale: float) -> float:
    kept = [v for v in values if v is not None and not math.isnan(v)]
    return scale * statistics.fmean(kept) if kept else float("nan")


def known_records(
    model: Model, records: list[CounterFactRecord], n: int
) -> list[CounterFactRecord]:
    """The first ``n`` records the unedited model gets right (p(true) > p(new) on the prompt)."""
    out = []
    for rec in records:
        new_wins, _ = prefers_new(model, rec.request.text, rec.target_new, rec.target_true)
        if not new_wins:
            out.append(rec)
        if len(out) >= n:
            break
    return out


def evaluate_rome(
    model: Model,
    records: list[CounterFactRecord],
    layer: int | None = None,
    progress: bool = True,
    **compute_kwargs: Any,
) -> tuple[list[RecordScores], list[RecordScores]]:
    """Edit each record with ROME (one at a time, reverted in between) and score it.

    Returns:
        ``(unedited scores, edited scores)``: two lists of :class:`RecordScores`, one per
        record; :func:`summarize` turns either into ES/PS/NS/S.
    """
    from rome_lens.rome import compute_rome

    before, after = [], []
    for rec in tqdm(records, desc="CounterFact", disable=not progress):
        before.append(score_record(model, rec))
        t0 = time.perf_counter()
        edit = compute_rome(model, rec.request, layer=layer, **compute_kwargs)
        seconds = time.perf_counter() - t0
        with edit.applied(model):
            scores = score_record(model, rec)
        scores.seconds = seconds
        after.append(scores)
    return before, after
