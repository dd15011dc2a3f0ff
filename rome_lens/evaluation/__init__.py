"""Evaluation of edits on the benchmarks the field reports: one module per dataset.

* :mod:`rome_lens.evaluation.counterfact`: CounterFact (ES / PS / NS / S, fluency), the
  ROME paper's pairwise comparisons of mean token log-probabilities.
* :mod:`rome_lens.evaluation.zsre`: zsRE in the MEND layout (Reliability / Generalisation /
  Locality as teacher-forced token accuracy, MEND and EasyEdit's convention).

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
from rome_lens.evaluation.zsre import (
    ZsreRecord,
    ZsreScores,
    answer_predictions,
    load_zsre,
    locality,
    locate_subject,
    pairwise_success,
    parse_zsre,
    score_zsre,
    summarize_zsre,
    token_accuracy,
)

__all__ = [
    "CounterFactRecord",
    "RecordScores",
    "ZsreRecord",
    "ZsreScores",
    "answer_predictions",
    "evaluate_rome",
    "generation_metrics",
    "harmonic_mean",
    "known_records",
    "load_counterfact",
    "load_zsre",
    "locality",
    "locate_subject",
    "n_gram_entropy",
    "pairwise_success",
    "parse_record",
    "parse_zsre",
    "prefers_new",
    "score_record",
    "score_records",
    "score_zsre",
    "summarize",
    "summarize_zsre",
    "token_accuracy",
]
