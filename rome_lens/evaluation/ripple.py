"""Ripple effects of an edit (RippleEdits' criteria, REFERENCE.md §7): do its consequences follow?

An edit ``(s, r, o -> o*)`` changes one answer; RippleEdits (Cohen et al. 2024) asks what else
should change with it, and what should not. This module builds such test cases for CounterFact
edits from the dataset and from the UNEDITED model's own knowledge, writes them to JSONL so a
person can read what was tested, and scores them on a model (edited or not).

The model's knowledge ``f`` is read by ranking candidate answers: the answer to a question is
the candidate with the highest mean per-token log-probability after it (the CounterFact
comparison quantity, :func:`rome_lens.predict.target_logprobs`). The candidates of a relation
are the CounterFact objects (true and new) of the relations a row of
:data:`~rome_lens.evaluation.relations.SECOND_HOPS` names: a closed set is robust where greedy
generation of a 270M model wanders ("the country of... the United"). The criteria:

* **Compositionality I** (``"compositionality_i"``): for each second hop ``r2`` of ``r``, the
  two-hop question "s, r then r2" should answer ``f(o*)`` after the edit rather than ``f(o)``.
  A case is kept only where the unedited model knows the first hop (``o`` beats ``o*``), its
  two-hop answer for ``s`` is ``f(o)``, ``f(o*) != f(o)``, neither hop maps an object to itself,
  and ``f(o)``/``f(o*)`` agree with the dataset where it states them (a record with ``o`` as
  subject and relation ``r2``).
* **Subject aliasing** (``"subject_aliasing"``): the edit holds on the record's paraphrases and
  on the edit prompt with the subject's other names (``aliases``; CounterFact has none): ``o*``
  beats ``o``. Kept where the unedited model preferred ``o``.
* **Relation specificity** (``"relation_specificity"``): ``s``'s facts of OTHER relations
  (other CounterFact records of the same subject) keep their true object over the record's
  counterfactual one. Kept where the unedited model answered them correctly.
* **Preservation** (``"preservation"``): for a one-to-many relation (twin cities, instruments),
  ``s``'s other true objects of ``r`` (other records of ``s`` and ``r``) stay.
* **Forgetfulness** (``"forgetfulness"``): for a one-to-many relation, the old object ``o``
  still beats the relation's other objects on the edit prompt (``o*`` aside): the edit added an
  object without erasing ``o`` from what ``s`` has.

Every case is correct when its best expected answer scores above all of its ``against``
answers (:func:`score_cases`); :func:`summarize_ripple` gives accuracy per criterion with a
percentile bootstrap CI (:func:`bootstrap_ci`, seeded).

Example:
    >>> from rome_lens.evaluation import parse_record
    >>> records = [parse_record({
    ...     "case_id": 0, "prompt": "Zog is within", "subject": "Zog",
    ...     "target_new": "Oslo", "ground_truth": "Rome",
    ...     "rephrase_prompt": "Zog can be found in"})]
    >>> cases = build_cases(model, records, progress=False)  # unedited model
    >>> write_cases(tmp / "cases.jsonl", cases)
    >>> read_cases(tmp / "cases.jsonl") == cases
    True
    >>> results = score_cases(model, cases, progress=False)   # with an edit applied: after
    >>> summarize_ripple(results)["all"]
    Accuracy(...)
"""

from __future__ import annotations

import json
import logging
import math
import os
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rome_lens._typing import Model
from rome_lens.evaluation.counterfact import CounterFactRecord
from rome_lens.evaluation.relations import (
    RELATIONS,
    SECOND_HOPS,
    SecondHop,
    assign_relations,
    hops_from,
    relation_objects,
)
from rome_lens.predict import target_logprobs

logger = logging.getLogger(__name__)

CRITERIA = (
    "compositionality_i",
    "subject_aliasing",
    "relation_specificity",
    "preservation",
    "forgetfulness",
)


# ----------------------------------------------------------------------------- cases as values


@dataclass(frozen=True)
class Hop:
    """One fact the unedited model was asked while a case was built.

    Attributes:
        entity: whom the question is about (an object for a second hop, else the subject).
        relation: the relation id asked ("" where unknown).
        prompt: the question as asked.
        answer: the unedited model's answer (the best-ranked candidate).
    """

    entity: str
    relation: str
    prompt: str
    answer: str


@dataclass(frozen=True, repr=False)
class RippleCase:
    """One test of an edit's ripple: a prompt and the answers that should (not) win after it.

    Attributes:
        criterion: one of :data:`CRITERIA`.
        case_id: the CounterFact record whose edit this tests.
        prompt: the prompt scored.
        expected: answers that should win (the best of them is compared).
        against: answers that should lose to the best expected one.
        subject: the edited subject ``s``.
        relation: the edited relation ``r`` ("" where no relation was found).
        hops: what the unedited model answered when the case was built (why it was kept).
    """

    criterion: str
    case_id: int
    prompt: str
    expected: tuple[str, ...]
    against: tuple[str, ...]
    subject: str
    relation: str
    hops: tuple[Hop, ...] = ()

    def __repr__(self) -> str:
        return (
            f"RippleCase({self.criterion} #{self.case_id} {self.prompt!r} -> "
            f"{'/'.join(self.expected)!r} over {len(self.against)} other)"
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (lists for tuples); :meth:`from_dict` inverts it."""
        return {
            "criterion": self.criterion, "case_id": self.case_id, "prompt": self.prompt,
            "expected": list(self.expected), "against": list(self.against),
            "subject": self.subject, "relation": self.relation,
            "hops": [vars(hop) for hop in self.hops],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RippleCase:
        """The case a :meth:`to_dict` dict describes."""
        return cls(
            criterion=data["criterion"], case_id=int(data["case_id"]), prompt=data["prompt"],
            expected=tuple(data["expected"]), against=tuple(data["against"]),
            subject=data["subject"], relation=data["relation"],
            hops=tuple(Hop(**hop) for hop in data.get("hops", ())),
        )


def write_cases(path: str | os.PathLike[str], cases: Iterable[RippleCase]) -> None:
    """Write cases as JSONL, one case per line (readable; :func:`read_cases` reads it back)."""
    lines = [json.dumps(case.to_dict(), ensure_ascii=False) for case in cases]
    Path(path).write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def read_cases(path: str | os.PathLike[str]) -> list[RippleCase]:
    """Read cases written by :func:`write_cases`."""
    text = Path(path).read_text(encoding="utf-8")
    return [RippleCase.from_dict(json.loads(line)) for line in text.splitlines() if line.strip()]


# ------------------------------------------------------------------- the model's knowledge f


@dataclass(frozen=True)
class Query:
    """A question to the model and the candidate answers ranked for it."""

    prompt: str
    candidates: tuple[str, ...]


def read_answers(
    model: Model, queries: Iterable[Query], *, batch_size: int = 64, progress: bool = False
) -> dict[Query, str]:
    """The model's answer to each query: its candidate of highest mean token log-probability.

    All (prompt, candidate) pairs go through :func:`rome_lens.predict.target_logprobs` at once
    (padded batches, only the positions of answer tokens decoded). Ties go to the candidate
    listed first.

    Args:
        model: the model as it is now (the unedited one when cases are built).
        queries: the questions; each needs at least one candidate.
        batch_size: rows per forward pass.
        progress: show a progress bar over the pairs.

    Returns:
        ``{query: answer}``.

    Raises:
        ValueError: a query without candidates.

    Example:
        >>> query = Query("Zog is within", ("Rome", "Oslo"))
        >>> read_answers(model, [query])[query] in ("Rome", "Oslo")
        True
    """
    unique = list(dict.fromkeys(queries))
    for query in unique:
        if not query.candidates:
            raise ValueError(f"query {query.prompt!r} has no candidate answers")
    pairs = [(q.prompt, c) for q in unique for c in q.candidates]
    scores = iter(target_logprobs(model, pairs, batch_size=batch_size, progress=progress))
    answers = {}
    for query in unique:
        values = [next(scores) for _ in query.candidates]
        answers[query] = query.candidates[values.index(max(values))]
    return answers


# ----------------------------------------------------------------- what the dataset states


@dataclass(frozen=True, repr=False)
class RippleData:
    """What a pool of CounterFact records states, indexed for building cases.

    Attributes:
        relations: ``{case_id: relation id}`` (:func:`~.relations.assign_relations`).
        objects: per relation id, its records' true and new objects (candidate answers).
        by_subject: per subject, its records.
        facts: ``{(subject, relation id): true object}`` (checks the model's second hops).
    """

    relations: Mapping[int, str]
    objects: Mapping[str, tuple[str, ...]]
    by_subject: Mapping[str, tuple[CounterFactRecord, ...]]
    facts: Mapping[tuple[str, str], str]

    def __repr__(self) -> str:
        return (
            f"RippleData({len(self.relations)} records with a relation, "
            f"{len(self.objects)} relations, {len(self.by_subject)} subjects)"
        )

    def relation(self, record: CounterFactRecord) -> str:
        """The record's relation id, "" where none was found."""
        return self.relations.get(record.case_id, "")

    def candidates(self, hop: SecondHop) -> tuple[str, ...]:
        """The candidate answers of a second hop (sorted)."""
        found = {obj for rid in hop.answers_from for obj in self.objects.get(rid, ())}
        return tuple(sorted(found))


def index_records(records: Iterable[CounterFactRecord]) -> RippleData:
    """Index a pool of records (e.g. all of counterfact-train and -dev) for :func:`build_cases`.

    Example:
        >>> from rome_lens.evaluation import parse_record
        >>> index_records([parse_record({"case_id": 1, "prompt": "Ada is a citizen of",
        ...     "subject": "Ada", "target_new": "Peru", "ground_truth": "Chile"})])
        RippleData(1 records with a relation, 1 relations, 1 subjects)
    """
    records = list({rec.case_id: rec for rec in records}.values())
    relations = assign_relations(records)
    by_subject: dict[str, list[CounterFactRecord]] = defaultdict(list)
    facts: dict[tuple[str, str], str] = {}
    for rec in records:
        by_subject[rec.request.subject].append(rec)
        if rec.case_id in relations:
            facts.setdefault((rec.request.subject, relations[rec.case_id]), rec.target_true)
    return RippleData(
        relations=relations,
        objects=relation_objects(records, relations),
        by_subject={s: tuple(recs) for s, recs in by_subject.items()},
        facts=facts,
    )


# ------------------------------------------------------------------------- building cases


@dataclass(frozen=True)
class _Draft:
    """A case in waiting: the questions it needs and how it is decided from their answers."""

    queries: tuple[Query, ...]
    decide: Callable[[Mapping[Query, str]], RippleCase | None]


@dataclass(frozen=True)
class _Settings:
    hops: Sequence[SecondHop] = SECOND_HOPS
    aliases: Mapping[str, Sequence[str]] = field(default_factory=dict)
    strict: bool = False
    n_distractors: int = 3


def build_cases(
    model: Model,
    records: Sequence[CounterFactRecord],
    *,
    pool: Iterable[CounterFactRecord] = (),
    hops: Sequence[SecondHop] = SECOND_HOPS,
    aliases: Mapping[str, Sequence[str]] | None = None,
    strict: bool = False,
    n_distractors: int = 3,
    batch_size: int = 64,
    progress: bool = True,
    answers: MutableMapping[Query, str] | None = None,
) -> list[RippleCase]:
    """Ripple cases of the edits of ``records``, kept by what the UNEDITED ``model`` knows.

    Call it on the unedited model; score the cases with :func:`score_cases` on the edited one.
    Every question the criteria need (module docstring) is asked in one batched pass.

    Args:
        model: the unedited model (its answers decide which cases are kept).
        records: the edits, as CounterFact records.
        pool: more records the dataset states (other facts of the same subjects, objects of
            each relation, facts of the objects); ``records`` are always part of it.
        hops: the Compositionality I table (default :data:`~.relations.SECOND_HOPS`).
        aliases: other names of subjects (``{subject: [name, ...]}``), if known.
        strict: a compositional case's ``against`` is every other candidate answer, not only
            ``f(o)`` (the new answer must be the model's top candidate).
        n_distractors: other objects of the relation a forgetfulness case ranks ``o`` against.
        batch_size: rows per forward pass.
        progress: show a progress bar.
        answers: the unedited model's answers read so far (:func:`read_answers`): queries found
            here are not asked again, and new answers are added, so records built in several
            calls (blocks) share the questions about common objects. Keep one mapping per
            model and pool.

    Returns:
        The kept cases, in the order of ``records`` and, per record, of :data:`CRITERIA`.

    Example:
        >>> from rome_lens.evaluation import parse_record
        >>> rec = parse_record({"case_id": 3, "prompt": "Zog is within", "subject": "Zog",
        ...                     "target_new": "Oslo", "ground_truth": "Rome"})
        >>> [case.criterion for case in build_cases(model, [rec], progress=False)]
        [...]
    """
    data = index_records([*records, *pool])
    settings = _Settings(hops, dict(aliases or {}), strict, n_distractors)
    drafts = [draft for rec in records for draft in _drafts(rec, data, settings)]
    known = answers if answers is not None else {}
    queries = [query for draft in drafts for query in draft.queries if query not in known]
    if queries:
        known.update(read_answers(model, queries, batch_size=batch_size, progress=progress))
    cases = [case for draft in drafts if (case := draft.decide(known)) is not None]
    logger.info("ripple: %d cases kept of %d drafted for %d records",
                len(cases), len(drafts), len(records))
    return cases


def _drafts(rec: CounterFactRecord, data: RippleData, settings: _Settings) -> list[_Draft]:
    drafts = [
        _compositional(rec, data, hop, settings.strict)
        for hop in hops_from(data.relation(rec), settings.hops)
        if data.candidates(hop)
    ]
    drafts += _aliasing(rec, data, settings.aliases.get(rec.request.subject, ()))
    drafts += _specificity(rec, data)
    if data.relation(rec) and RELATIONS[data.relation(rec)].one_to_many:
        drafts += _preservation(rec, data)
        drafts += _forgetfulness(rec, data, settings.n_distractors)
    return drafts


def _first_hop(rec: CounterFactRecord) -> Query:
    return Query(rec.request.text, (rec.target_true, rec.target_new))


def _compositional(
    rec: CounterFactRecord, data: RippleData, hop: SecondHop, strict: bool
) -> _Draft:
    s, old, new = rec.request.subject, rec.target_true, rec.target_new
    candidates = data.candidates(hop)
    first = _first_hop(rec)
    on_old = Query(hop.on_object.format(old), candidates)
    on_new = Query(hop.on_object.format(new), candidates)
    two_hop = Query(hop.composite.format(s), candidates)

    def decide(answers: Mapping[Query, str]) -> RippleCase | None:
        f_old, f_new = answers[on_old], answers[on_new]
        if answers[first] != old or answers[two_hop] != f_old or f_old == f_new:
            return None
        if f_old == old or f_new == new or not _agrees(data, hop.second, old, f_old, new, f_new):
            return None
        against = tuple(c for c in candidates if c != f_new) if strict else (f_old,)
        hops = (
            Hop(s, data.relation(rec), first.prompt, old),
            Hop(old, hop.second, on_old.prompt, f_old),
            Hop(new, hop.second, on_new.prompt, f_new),
            Hop(s, f"{hop.first}>{hop.second}", two_hop.prompt, f_old),
        )
        return RippleCase("compositionality_i", rec.case_id, two_hop.prompt, (f_new,), against,
                          s, data.relation(rec), hops)

    return _Draft((first, on_old, on_new, two_hop), decide)


def _agrees(data: RippleData, relation: str, *pairs: str) -> bool:
    """Whether each (entity, answer) pair matches the dataset's fact, where it states one."""
    for entity, answer in zip(pairs[::2], pairs[1::2], strict=True):
        truth = data.facts.get((entity, relation))
        if truth is not None and truth != answer:
            return False
    return True


def _kept_if_known(
    criterion: str, rec: CounterFactRecord, data: RippleData, query: Query, known: str,
    expected: tuple[str, ...], against: tuple[str, ...], hop_relation: str,
) -> _Draft:
    """A case kept where the unedited model answers ``query`` with ``known``."""

    def decide(answers: Mapping[Query, str]) -> RippleCase | None:
        if answers[query] != known:
            return None
        hop = Hop(rec.request.subject, hop_relation, query.prompt, known)
        return RippleCase(criterion, rec.case_id, query.prompt, expected, against,
                          rec.request.subject, data.relation(rec), (hop,))

    return _Draft((query,), decide)


def _aliasing(
    rec: CounterFactRecord, data: RippleData, aliases: Sequence[str]
) -> list[_Draft]:
    prompts = [*rec.paraphrase_prompts, *(rec.request.template.format(a) for a in aliases)]
    old, new = rec.target_true, rec.target_new
    return [
        _kept_if_known("subject_aliasing", rec, data, Query(p, (old, new)), old, (new,), (old,),
                       data.relation(rec))
        for p in dict.fromkeys(prompts)
    ]


def _same_subject(rec: CounterFactRecord, data: RippleData) -> list[CounterFactRecord]:
    return [o for o in data.by_subject.get(rec.request.subject, ()) if o.case_id != rec.case_id]


def _specificity(rec: CounterFactRecord, data: RippleData) -> list[_Draft]:
    relation = data.relation(rec)
    others = [o for o in _same_subject(rec, data) if data.relation(o) != relation or not relation]
    return [
        _kept_if_known("relation_specificity", rec, data, _first_hop(o), o.target_true,
                       (o.target_true,), (o.target_new,), data.relation(o))
        for o in others
        if data.relation(o) or o.request.template != rec.request.template
    ]


def _preservation(rec: CounterFactRecord, data: RippleData) -> list[_Draft]:
    relation = data.relation(rec)
    skip = {rec.target_true, rec.target_new}
    others = [
        o for o in _same_subject(rec, data)
        if data.relation(o) == relation and not {o.target_true, o.target_new} & skip
    ]
    return [
        _kept_if_known("preservation", rec, data, _first_hop(o), o.target_true,
                       (o.target_true,), (o.target_new,), relation)
        for o in others
    ]


def _forgetfulness(rec: CounterFactRecord, data: RippleData, n: int) -> list[_Draft]:
    relation = data.relation(rec)
    true_objects = {o.target_true for o in data.by_subject.get(rec.request.subject, ())}
    skip = true_objects | {rec.target_true, rec.target_new}
    pool = [obj for obj in data.objects.get(relation, ()) if obj not in skip]
    # A fixed pseudo-random choice per record: deterministic, and not always the same objects.
    pool.sort(key=lambda obj: zlib.crc32(f"{rec.case_id}:{obj}".encode()))
    distractors = tuple(pool[:n])
    if not distractors:
        return []
    old = rec.target_true
    query = Query(rec.request.text, (old, *distractors))
    return [_kept_if_known("forgetfulness", rec, data, query, old, (old,), distractors,
                           relation)]


# ------------------------------------------------------------------------------- scoring


@dataclass(frozen=True, repr=False)
class CaseResult:
    """A case scored on a model.

    Attributes:
        case: the case.
        correct: the best expected answer beat every ``against`` answer.
        expected_logprob: the best expected answer's mean token log-probability.
        against_logprob: the best ``against`` answer's mean token log-probability.
    """

    case: RippleCase
    correct: bool
    expected_logprob: float
    against_logprob: float

    def __repr__(self) -> str:
        mark = "ok" if self.correct else "FAIL"
        return f"CaseResult({mark} {self.case.criterion} #{self.case.case_id})"


def score_cases(
    model: Model,
    cases: Sequence[RippleCase],
    *,
    batch_size: int = 64,
    progress: bool = True,
) -> list[CaseResult]:
    """Score cases on the model as it is now (edited or not), all pairs in padded batches.

    Args:
        model: the model, edited or not.
        cases: the cases (:func:`build_cases` or :func:`read_cases`).
        batch_size: rows per forward pass.
        progress: show a progress bar over the pairs.

    Returns:
        One :class:`CaseResult` per case, in order.

    Example:
        >>> case = RippleCase("subject_aliasing", 0, "Zog can be found in", ("Oslo",),
        ...                   ("Rome",), "Zog", "P131")
        >>> score_cases(model, [case], progress=False)
        [CaseResult(... subject_aliasing #0)]
    """
    pairs = [(c.prompt, a) for c in cases for a in (*c.expected, *c.against)]
    scores = iter(target_logprobs(model, pairs, batch_size=batch_size, progress=progress))
    results = []
    for case in cases:
        expected = max(next(scores) for _ in case.expected)
        against = max((next(scores) for _ in case.against), default=-math.inf)
        results.append(CaseResult(case, expected > against, expected, against))
    return results


@dataclass(frozen=True, repr=False)
class Accuracy:
    """Accuracy of a group of cases, in percent, with a bootstrap confidence interval.

    Attributes:
        n: the number of cases.
        accuracy: the percentage correct (nan for no cases).
        low: the interval's lower end (percent).
        high: the interval's upper end (percent).
    """

    n: int
    accuracy: float
    low: float
    high: float

    def __repr__(self) -> str:
        return f"Accuracy({self.accuracy:.1f}% [{self.low:.1f}, {self.high:.1f}], n={self.n})"


def bootstrap_ci(
    values: Sequence[float], *, resamples: int = 1000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (deterministic per ``seed``).

    Args:
        values: per-case values (1.0 correct, 0.0 not, or any numbers).
        resamples: bootstrap resamples.
        level: the interval's coverage, in (0, 1).
        seed: the resampling seed.

    Returns:
        ``(low, high)``; ``(nan, nan)`` for no values.

    Raises:
        ValueError: ``level`` outside (0, 1) or ``resamples`` below 1.

    Example:
        >>> bootstrap_ci([1.0, 0.0, 1.0, 1.0], seed=0) == bootstrap_ci([1.0, 0.0, 1.0, 1.0])
        True
    """
    if not 0.0 < level < 1.0 or resamples < 1:
        raise ValueError(f"need 0 < level < 1 and resamples >= 1, got {level}, {resamples}")
    if not values:
        return math.nan, math.nan
    data = torch.tensor(values, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    index = torch.randint(len(values), (resamples, len(values)), generator=gen)
    means = data[index].mean(dim=1)
    tail = (1.0 - level) / 2
    quantiles = torch.quantile(means, torch.tensor([tail, 1.0 - tail], dtype=torch.float64))
    return float(quantiles[0]), float(quantiles[1])


def summarize_ripple(
    results: Sequence[CaseResult], *, resamples: int = 1000, level: float = 0.95, seed: int = 0
) -> dict[str, Accuracy]:
    """Accuracy per criterion (those with cases) and over all cases (``"all"``), with CIs.

    Example:
        >>> case = RippleCase("preservation", 0, "p", ("a",), ("b",), "s", "P190")
        >>> summarize_ripple([CaseResult(case, True, -1.0, -2.0)])
        {'all': Accuracy(100.0% [100.0, 100.0], n=1), 'preservation': Accuracy(...)}
    """
    groups: dict[str, list[float]] = {"all": [float(r.correct) for r in results]}
    for criterion in CRITERIA:
        values = [float(r.correct) for r in results if r.case.criterion == criterion]
        if values:
            groups[criterion] = values
    summary = {}
    for name, values in groups.items():
        low, high = bootstrap_ci(values, resamples=resamples, level=level, seed=seed)
        mean = 100.0 * sum(values) / len(values) if values else math.nan
        summary[name] = Accuracy(len(values), mean, 100.0 * low, 100.0 * high)
    return summary
