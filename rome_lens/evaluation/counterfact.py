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

:func:`score_records` scores many records at once: every (prompt, target) pair of every record
goes through right-padded batches, one forward pass per ``batch_size`` pairs rather than one
per pair (~26 per record). :func:`score_record` is the same for one record.

Example (one record written out; ``load_counterfact`` reads a file of them):
    >>> records = load_counterfact("counterfact-dev.json")[:10]  # doctest: +SKIP
    >>> records = [parse_record({
    ...     "prompt": "{} lives in", "subject": "Alice Smith", "target_new": "Paris",
    ...     "ground_truth": "Rome", "rephrase_prompt": "Where does Alice Smith live? In",
    ...     "locality_prompt": "Bob Jones lives in", "locality_ground_truth": "Rome"})]
    >>> before, after = evaluate_rome(model, records)   # RecordScores lists: unedited, edited
    >>> scores = score_records(model, records, progress=False)  # the model as it is now
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
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from rome_lens._typing import Model
from rome_lens.errors import RomeLensError
from rome_lens.predict import target_logprob, target_logprobs
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
    return _compare(target_logprob(model, prompt, new), target_logprob(model, prompt, true))


def _compare(lp_new: float, lp_true: float) -> tuple[bool, float]:
    """``(new wins, p_new - p_true)`` from the two mean log-probabilities."""
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

    All of the record's prompts and targets go through one padded forward pass
    (:func:`score_records` of one record).

    Args:
        model: the model, edited or not.
        record: the CounterFact case.
        generation: also generate (seeded) and score fluency and mentions of the objects.
        gen_prompts: generations per record: the record's generation prompts (original layout)
            or else the edit prompt and its paraphrases (the flat layout has none).
        gen_tokens: tokens per generation (the paper used 100).
    """
    return score_records(
        model, [record], generation=generation, gen_prompts=gen_prompts,
        gen_tokens=gen_tokens, progress=False,
    )[0]


def score_records(
    model: Model,
    records: Sequence[CounterFactRecord],
    *,
    batch_size: int = 64,
    generation: bool = False,
    gen_prompts: int = 2,
    gen_tokens: int = 50,
    progress: bool = True,
) -> list[RecordScores]:
    """Score many records on the model as it is now, in padded batches.

    Every (prompt, target) pair of every record (edit prompt, paraphrases and neighbours, each
    with the new and the true object) is teacher-forced in right-padded batches of
    ``batch_size`` rows (:func:`rome_lens.predict.target_logprobs`), instead of one forward
    pass per pair. The result equals ``[score_record(model, r) for r in records]`` up to float
    rounding of the magnitudes.

    Args:
        model: the model, edited or not.
        records: the CounterFact cases.
        batch_size: rows per forward pass; lower it if memory is short.
        generation: also generate and score fluency and mentions (one record at a time; see
            :func:`score_record`).
        gen_prompts: generations per record.
        gen_tokens: tokens per generation.
        progress: show tqdm bars.

    Returns:
        One :class:`RecordScores` per record, in order (``seconds`` is 0).

    Example:
        >>> rec = parse_record({"prompt": "{} lives in", "subject": "Alice", "target_new": "Rome",
        ...                     "ground_truth": "Oslo", "rephrase_prompt": "Alice is from"})
        >>> scores = score_records(model, [rec, rec], progress=False)
        >>> len(scores), len(scores[0].paraphrase)
        (2, 1)
        >>> scores[0].efficacy == score_record(model, rec).efficacy
        True
    """
    records = list(records)
    pairs = [
        (prompt, target)
        for rec in records
        for prompt in _scored_prompts(rec)
        for target in (rec.target_new, rec.target_true)
    ]
    logprobs = dict(zip(
        pairs, target_logprobs(model, pairs, batch_size=batch_size, progress=progress),
        strict=True,
    ))
    out = [_record_scores(rec, logprobs) for rec in records]
    if generation:
        for rec, scores in zip(
            tqdm(records, desc="generation", disable=not progress), out, strict=True
        ):
            prompts = rec.generation_prompts or [rec.request.text, *rec.paraphrase_prompts]
            gen = generation_metrics(
                model, prompts[:gen_prompts], rec.target_new, rec.target_true, n_tokens=gen_tokens
            )
            scores.fluency = gen["fluency"]
            scores.mentions_new = gen["mentions_new"]
            scores.mentions_true = gen["mentions_true"]
    return out


def _scored_prompts(record: CounterFactRecord) -> list[str]:
    """The edit prompt, the paraphrases and the neighbours of a record."""
    return [record.request.text, *record.paraphrase_prompts, *record.neighborhood_prompts]


def _record_scores(
    record: CounterFactRecord, logprobs: dict[tuple[str, str], float]
) -> RecordScores:
    """A record's scores from the log-probabilities of its (prompt, target) pairs."""

    def compare(prompt: str) -> tuple[bool, float]:
        return _compare(
            logprobs[prompt, record.target_new], logprobs[prompt, record.target_true]
        )

    es = [compare(record.request.text)]
    ps = [compare(p) for p in record.paraphrase_prompts]
    ns = [compare(p) for p in record.neighborhood_prompts]
    return RecordScores(
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
    model: Model, records: Sequence[CounterFactRecord], n: int, *, batch_size: int = 64
) -> list[CounterFactRecord]:
    """The first ``n`` records the unedited model gets right (p(true) > p(new) on the prompt).

    Records are checked ``batch_size // 2`` at a time (two rows each), in order.
    """
    out: list[CounterFactRecord] = []
    step = max(1, batch_size // 2)
    for start in range(0, len(records), step):
        chunk = records[start : start + step]
        pairs = [(r.request.text, t) for r in chunk for t in (r.target_new, r.target_true)]
        lps = target_logprobs(model, pairs, batch_size=batch_size)
        for i, rec in enumerate(chunk):
            new_wins, _ = _compare(lps[2 * i], lps[2 * i + 1])
            if not new_wins:
                out.append(rec)
            if len(out) >= n:
                return out
    return out


def evaluate_rome(
    model: Model,
    records: list[CounterFactRecord],
    layer: int | None = None,
    progress: bool = True,
    **compute_kwargs: Any,
) -> tuple[list[RecordScores], list[RecordScores]]:
    """Edit each record with ROME (one at a time, reverted in between) and score it.

    The unedited model scores all records in one batched pass (:func:`score_records`); each
    edited model scores its own record.

    Returns:
        ``(unedited scores, edited scores)``: two lists of :class:`RecordScores`, one per
        record; :func:`summarize` turns either into ES/PS/NS/S.
    """
    from rome_lens.rome import compute_rome

    before = score_records(model, records, progress=progress)
    after = []
    for rec in tqdm(records, desc="CounterFact", disable=not progress):
        t0 = time.perf_counter()
        edit = compute_rome(model, rec.request, layer=layer, **compute_kwargs)
        seconds = time.perf_counter() - t0
        with edit.applied(model):
            scores = score_record(model, rec)
        scores.seconds = seconds
        after.append(scores)
    return before, after
