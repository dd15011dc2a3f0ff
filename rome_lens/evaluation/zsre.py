"""zsRE evaluation of edits as MEND and EasyEdit report it (REFERENCE.md §7).

A zsRE record (MEND layout) is a question about a subject (``src``), its true answers
(``answers``), a new answer to edit in (``alt``), a paraphrase of the question (``rephrase``)
and an unrelated Natural Questions question with its answer (``loc``, ``loc_ans``). The
question is edited as an :class:`~rome_lens.requests.EditRequest`: the question is the
prompt, the subject is located in it, the answer follows after a space.

The field's metrics are token-level and teacher-forced: the answer is appended to the prompt,
and at each answer position the model's most likely next token (argmax, given the prompt and
the previous answer tokens) is compared with the answer's token there.

* **Reliability**: the fraction of the new answer's tokens predicted on the question;
* **Generalisation**: the same on the paraphrase;
* **Locality**: the fraction of the ``loc`` answer's positions whose argmax prediction is
  the same as the unedited model's (not whether it is right: an edit should change nothing
  there);
* **pairwise**: CounterFact's rule, p(new) > p(true) in mean token log-probability, on the
  question and the paraphrase, where the record has a true answer other than the new one.

Each is averaged per record, then over records (percentages in :func:`summarize_zsre`). The
metric math is in pure functions of logits and token ids (:func:`answer_predictions`,
:func:`token_accuracy`, :func:`locality`, :func:`pairwise_success`); :func:`score_zsre`
gets what they need from the model in padded batches
(:func:`rome_lens.predict.target_token_scores`).

Example:
    >>> records = load_zsre("zsre-dev.json")[:10]  # doctest: +SKIP
    >>> records = [parse_zsre({
    ...     "subject": "Alice Smith", "src": "Where does Alice Smith live?",
    ...     "rephrase": "Which city is Alice Smith living in?", "alt": "Paris",
    ...     "answers": ["Rome"], "loc": "nq question: who wrote hamlet",
    ...     "loc_ans": "Shakespeare"})]
    >>> records[0]
    ZsreRecord(#0 'Where does Alice Smith live?' -> 'Paris', true 'Rome')
    >>> before = score_zsre(model, records, progress=False)   # the unedited model
    >>> edit = rome_lens.compute_edit(model, records[0].request, hparams=hp, corpus=corpus)
    >>> with edit.applied(model):
    ...     after = score_zsre(model, records, reference=before, progress=False)
    >>> sorted(summarize_zsre(after))
    ['Generalisation', 'Locality', 'Reliability', 'n', 'n_pairwise', 'pairwise', ...]
"""

from __future__ import annotations

import json
import logging
import os
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int

from rome_lens._typing import Model
from rome_lens.errors import RomeLensError, SubjectNotFoundError
from rome_lens.predict import TargetTokens, target_token_scores
from rome_lens.requests import EditRequest

logger = logging.getLogger(__name__)

_FIELDS = ("subject", "src", "rephrase", "alt", "answers", "loc", "loc_ans")
_SKIP_REASONS = {
    "SubjectNotFoundError": "subject not in the question",
    "RomeLensError": "missing or empty field",
}


@dataclass(frozen=True, repr=False)
class ZsreRecord:
    """One zsRE case: the edit request and the questions it is scored on.

    Attributes:
        index: the record's position in its file (its id in result rows).
        request: the question as the prompt, the subject located in it, ``alt`` as the new
            answer and the first true answer other than ``alt`` (if any) as the true one.
        rephrase: the paraphrased question.
        answers: every true answer the record lists.
        loc: the unrelated question (kept as written: ``"nq question: ..."``).
        loc_answer: its answer.
    """

    index: int
    request: EditRequest
    rephrase: str
    answers: tuple[str, ...]
    loc: str
    loc_answer: str

    @property
    def question(self) -> str:
        """The edited question."""
        return self.request.text

    @property
    def target_new(self) -> str:
        """The new answer."""
        return self.request.target_new

    @property
    def target_true(self) -> str | None:
        """The true answer compared with the new one (``None``: none differs from it)."""
        return self.request.target_true

    def __repr__(self) -> str:
        true = f", true {self.target_true!r}" if self.target_true is not None else ""
        return f"ZsreRecord(#{self.index} {self.question!r} -> {self.target_new!r}{true})"


def parse_zsre(rec: dict[str, Any], index: int = 0) -> ZsreRecord:
    """Parse one record of the MEND zsRE layout.

    Args:
        rec: the record (``subject``, ``src``, ``rephrase``, ``alt``, ``answers``, ``loc``,
            ``loc_ans``; other keys are ignored).
        index: its position in the file.

    Returns:
        The record; when ``alt`` is also the (only) true answer, ``target_true`` is ``None``.

    Raises:
        RomeLensError: a missing or empty field.
        SubjectNotFoundError: the subject does not occur in the question, even ignoring case.

    Example:
        >>> rec = parse_zsre({"subject": "the Nile", "src": "Where does The Nile end?",
        ...                   "rephrase": "The Nile ends where?", "alt": "Lagos",
        ...                   "answers": ["Mediterranean Sea"], "loc": "nq question: x",
        ...                   "loc_ans": "y"}, index=3)
        >>> rec.request.subject, rec.target_true
        ('The Nile', 'Mediterranean Sea')
    """
    missing = [k for k in _FIELDS if k not in rec]
    if missing:
        raise RomeLensError(f"zsRE record lacks {missing}: keys {sorted(rec)}")
    answers = tuple(rec["answers"]) if isinstance(rec["answers"], list) else (rec["answers"],)
    texts = [rec["src"], rec["rephrase"], rec["alt"], rec["loc"], rec["loc_ans"], *answers]
    if not answers or any(not isinstance(t, str) or not t.strip() for t in texts):
        raise RomeLensError(f"zsRE record has an empty field: {rec.get('src')!r}")
    question = rec["src"]
    others = [a for a in answers if a.strip() != rec["alt"].strip()]
    request = EditRequest(
        prompt=question,
        subject=locate_subject(question, rec["subject"]),
        target_new=rec["alt"],
        target_true=others[0] if others else None,
    )
    return ZsreRecord(index, request, rec["rephrase"], answers, rec["loc"], rec["loc_ans"])


def locate_subject(question: str, subject: str) -> str:
    """The subject as it is spelled in the question (verbatim, else ignoring case).

    Raises:
        SubjectNotFoundError: the subject does not occur in the question.

    Example:
        >>> locate_subject("Who founded the Beatles?", "The Beatles")
        'the Beatles'
    """
    if subject and subject in question:
        return subject
    start = question.lower().find(subject.lower()) if subject else -1
    if start < 0:
        raise SubjectNotFoundError(f"subject {subject!r} does not occur in {question!r}")
    return question[start : start + len(subject)]


def load_zsre(path: str | os.PathLike[str]) -> list[ZsreRecord]:
    """Load zsRE records (MEND layout); records that cannot be edited are skipped and counted.

    A record is skipped when a field is missing or empty (e.g. an empty new answer) or its
    subject is not in its question; one warning gives the counts by reason.
    """
    raw = json.loads(Path(path).read_text())
    records, skipped = [], Counter[str]()
    for index, rec in enumerate(raw):
        try:
            records.append(parse_zsre(rec, index))
        except RomeLensError as exc:
            name = type(exc).__name__
            skipped[_SKIP_REASONS.get(name, name)] += 1
            logger.debug("skipping zsRE record %d: %s", index, exc)
    if skipped:
        logger.warning(
            "zsRE: skipped %d of %d records of %s (%s)", sum(skipped.values()), len(raw),
            Path(path).name, ", ".join(f"{k}: {v}" for k, v in sorted(skipped.items())),
        )
    return records


# ------------------------------------------------------------------- metrics (pure)


def answer_predictions(
    logits: Float[torch.Tensor, "pos vocab"], n_answer: int
) -> Int[torch.Tensor, " n_answer"]:
    """Argmax predictions at the positions that predict a sequence's last ``n_answer`` tokens.

    ``logits`` are those of a teacher-forced sequence ``prompt + answer``: position ``p``
    predicts token ``p + 1``, so the answer's tokens are predicted at the ``n_answer``
    positions before the last one.

    Raises:
        ValueError: ``n_answer`` below 1 or not shorter than the sequence.

    Example:
        >>> logits = torch.zeros(4, 5)
        >>> logits[1, 3] = logits[2, 4] = logits[3, 0] = 1.0   # positions 1, 2 predict 3, 4
        >>> answer_predictions(logits, 2)
        tensor([3, 4])
    """
    if not 1 <= n_answer < logits.shape[0]:
        raise ValueError(
            f"n_answer must be in 1..{logits.shape[0] - 1} for {logits.shape[0]} positions, "
            f"got {n_answer}"
        )
    return logits[-n_answer - 1 : -1].argmax(-1)


def token_accuracy(
    predicted: Int[torch.Tensor, " n"], answer: Int[torch.Tensor, " n"]
) -> float:
    """The fraction of answer positions whose prediction is the answer's token.

    Raises:
        ValueError: different lengths or no tokens.

    Example:
        >>> token_accuracy(torch.tensor([5, 7, 9]), torch.tensor([5, 8, 9]))
        0.6666666666666666
    """
    if predicted.shape != answer.shape or predicted.numel() == 0:
        raise ValueError(
            f"predictions and answer need the same non-empty shape, got "
            f"{tuple(predicted.shape)} and {tuple(answer.shape)}"
        )
    return int((predicted == answer).sum()) / predicted.numel()


def locality(
    predicted: Int[torch.Tensor, " n"], unedited: Int[torch.Tensor, " n"]
) -> float:
    """The fraction of the unrelated answer's positions whose argmax is unchanged by the edit.

    Args:
        predicted: argmax tokens at the ``loc`` answer's positions, on the edited model.
        unedited: the same on the unedited model.

    Example:
        >>> locality(torch.tensor([1, 2, 3, 4]), torch.tensor([1, 2, 0, 4]))
        0.75
    """
    return token_accuracy(predicted, unedited)


def pairwise_success(
    logprobs_new: Float[torch.Tensor, " n"], logprobs_true: Float[torch.Tensor, " m"]
) -> bool:
    """CounterFact's rule: the new answer beats the true one in mean token log-probability.

    Example:
        >>> pairwise_success(torch.tensor([-1.0, -3.0]), torch.tensor([-2.5]))
        True
    """
    return bool(logprobs_new.mean() > logprobs_true.mean())


# ------------------------------------------------------------------- scoring a model


@dataclass(repr=False)
class ZsreScores:
    """Scores of one record on one model (fractions in [0, 1]).

    Attributes:
        index: the record's index.
        reliability: token accuracy of the new answer on the question.
        generalisation: the same on the paraphrase.
        locality: fraction of the ``loc`` answer's argmax predictions equal to the reference
            model's (``None`` when scored without a reference).
        pairwise: p(new) > p(true) on the question (``None``: no true answer).
        pairwise_rephrase: the same on the paraphrase.
        loc_predicted: the argmax tokens at the ``loc`` answer's positions: the reference for
            the locality of later scores.
        seconds: time to compute the edit (set by the caller).
    """

    index: int
    reliability: float
    generalisation: float
    locality: float | None
    pairwise: bool | None
    pairwise_rephrase: bool | None
    loc_predicted: list[int] = field(default_factory=list)
    seconds: float = 0.0

    def __repr__(self) -> str:
        loc = "-" if self.locality is None else f"{self.locality:.2f}"
        return (
            f"ZsreScores(#{self.index} rel {self.reliability:.2f} gen "
            f"{self.generalisation:.2f} loc {loc} pairwise {self.pairwise})"
        )


def score_zsre(
    model: Model,
    records: Sequence[ZsreRecord],
    *,
    reference: Sequence[ZsreScores] | None = None,
    batch_size: int = 64,
    progress: bool = True,
) -> list[ZsreScores]:
    """Score records on the model as it is now (edited or not), in padded batches.

    Up to five (prompt, answer) rows per record (question and paraphrase with the new answer,
    ``loc`` with its answer, question and paraphrase with the true answer) go through
    :func:`~rome_lens.predict.target_token_scores`, which decodes only the answer positions.

    Args:
        model: the model, edited or not.
        records: the zsRE cases.
        reference: the same records' scores on the unedited model (their ``loc_predicted``),
            in the same order; without it ``locality`` is ``None``.
        batch_size: rows per forward pass.
        progress: show a tqdm bar.

    Returns:
        One :class:`ZsreScores` per record, in order.

    Raises:
        ValueError: ``reference`` is not the scores of the same records.
        PromptTooLongError: a question and its answer longer than the context window.
    """
    records = list(records)
    if reference is not None and [r.index for r in reference] != [r.index for r in records]:
        raise ValueError("reference must hold the scores of the same records, in order")
    pairs = [pair for rec in records for pair in _rows(rec)]
    scored = dict(zip(
        pairs, target_token_scores(model, pairs, batch_size=batch_size, progress=progress),
        strict=True,
    ))
    refs = reference if reference is not None else [None] * len(records)
    return [_record_scores(rec, scored, ref) for rec, ref in zip(records, refs, strict=True)]


def _rows(record: ZsreRecord) -> list[tuple[str, str]]:
    """The (prompt, answer) pairs a record is scored on."""
    rows = [(record.question, record.target_new), (record.rephrase, record.target_new),
            (record.loc, record.loc_answer)]
    if record.target_true is not None:
        rows += [(record.question, record.target_true), (record.rephrase, record.target_true)]
    return rows


def _record_scores(
    record: ZsreRecord,
    scored: dict[tuple[str, str], TargetTokens],
    reference: ZsreScores | None,
) -> ZsreScores:
    """A record's scores from the teacher-forced predictions of its rows."""
    edit = scored[record.question, record.target_new]
    para = scored[record.rephrase, record.target_new]
    loc = scored[record.loc, record.loc_answer]
    pairwise = pairwise_rephrase = None
    if record.target_true is not None:
        pairwise = pairwise_success(
            edit.logprobs, scored[record.question, record.target_true].logprobs)
        pairwise_rephrase = pairwise_success(
            para.logprobs, scored[record.rephrase, record.target_true].logprobs)
    return ZsreScores(
        index=record.index,
        reliability=token_accuracy(edit.predicted, edit.ids),
        generalisation=token_accuracy(para.predicted, para.ids),
        locality=None if reference is None else locality(
            loc.predicted, torch.tensor(reference.loc_predicted, dtype=loc.predicted.dtype)),
        pairwise=pairwise,
        pairwise_rephrase=pairwise_rephrase,
        loc_predicted=loc.predicted.tolist(),
    )


def summarize_zsre(scores: Sequence[ZsreScores]) -> dict[str, float]:
    """Reliability, Generalisation, Locality and the pairwise rules, as percentages.

    Each is the mean over records of the per-record value; Locality over records scored
    against a reference, the pairwise rules over records with a true answer (``n_pairwise``).
    A metric with no record is NaN.

    Example:
        >>> s = [ZsreScores(0, 1.0, 0.5, 1.0, True, False),
        ...      ZsreScores(1, 0.0, 0.5, 0.5, None, None)]
        >>> summarize_zsre(s)["Reliability"], summarize_zsre(s)["pairwise"]
        (50.0, 100.0)
    """

    def pct(values: Sequence[float | bool | None]) -> float:
        kept = [float(v) for v in values if v is not None]
        return 100.0 * statistics.fmean(kept) if kept else float("nan")

    return {
        "n": float(len(scores)),
        "Reliability": pct([s.reliability for s in scores]),
        "Generalisation": pct([s.generalisation for s in scores]),
        "Locality": pct([s.locality for s in scores]),
        "pairwise": pct([s.pairwise for s in scores]),
        "pairwise_rephrase": pct([s.pairwise_rephrase for s in scores]),
        "n_pairwise": float(sum(s.pairwise is not None for s in scores)),
        "seconds_per_edit": statistics.fmean([s.seconds for s in scores]) if scores else 0.0,
    }
