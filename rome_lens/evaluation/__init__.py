"""Evaluation of edits on the benchmarks the field reports: one module per dataset.

* :mod:`rome_lens.evaluation.counterfact`: CounterFact (ES / PS / NS / S, fluency), the
  ROME paper's pairwise comparisons of mean token log-probabilities.

Every public name of the dataset modules is importable from here
(``from rome_lens.evaluation import score_records``), as it was when evaluation was one module.
"""

from rome_lens.evaluation.counterfact import (
    CounterFactRecord,
    RecordScores,
    evaluate_rome,
    generation_metrics,
    harmonic_mean,
    known_records,
    load_counterfact,
    n_gram_entropy,
    parse_record,
    prefers_new,
    score_record,
    score_records,
    summarize,
)

__all__ = [
    "CounterFactRecord",
    "RecordScores",
    "evaluate_rome",
    "generation_metrics",
    "harmonic_mean",
    "known_records",
    "load_counterfact",
    "n_gram_entropy",
    "parse_record",
    "prefers_new",
    "score_record",
    "score_records",
    "summarize",
]
