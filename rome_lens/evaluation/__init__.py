"""Evaluation of edits on the benchmarks the field reports: one module per dataset.

* :mod:`rome_lens.evaluation.counterfact`: CounterFact (ES / PS / NS / S, fluency), the
  ROME paper's pairwise comparisons of mean token log-probabilities.
* :mod:`rome_lens.evaluation.zsre`: zsRE in the MEND layout (Reliability / Generalisation /
  Locality as teacher-forced token accuracy, MEND and EasyEdit's convention).
* :mod:`rome_lens.evaluation.ripple`: RippleEdits' criteria (Compositionality I, subject
  aliasing, relation specificity, preservation, forgetfulness) built for CounterFact edits from
  the unedited model's knowledge; :mod:`rome_lens.evaluation.relations` is the table of
  CounterFact relations and second hops they use; :mod:`rome_lens.evaluation.stats` the 2x2
  tables and odds ratios that relate an edit's probe verdict to its ripple failures.

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
from rome_lens.evaluation.relations import (
    RELATIONS,
    SECOND_HOPS,
    Relation,
    SecondHop,
    assign_relations,
    hops_from,
    relation_objects,
    relations_of_template,
)
from rome_lens.evaluation.ripple import (
    CRITERIA,
    Accuracy,
    CaseResult,
    Hop,
    Query,
    RippleCase,
    RippleData,
    bootstrap_ci,
    build_cases,
    index_records,
    read_answers,
    read_cases,
    score_cases,
    summarize_ripple,
    write_cases,
)
from rome_lens.evaluation.stats import (
    ContingencyTable,
    OddsRatio,
    fisher_exact,
    odds_ratio,
    odds_ratio_test,
    rank_auc,
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
    "Accuracy",
    "CRITERIA",
    "CaseResult",
    "ContingencyTable",
    "CounterFactRecord",
    "Hop",
    "OddsRatio",
    "Query",
    "RELATIONS",
    "RecordScores",
    "Relation",
    "RippleCase",
    "RippleData",
    "SECOND_HOPS",
    "SecondHop",
    "ZsreRecord",
    "ZsreScores",
    "answer_predictions",
    "assign_relations",
    "bootstrap_ci",
    "build_cases",
    "evaluate_rome",
    "fisher_exact",
    "generation_metrics",
    "harmonic_mean",
    "hops_from",
    "index_records",
    "known_records",
    "load_counterfact",
    "load_zsre",
    "locality",
    "locate_subject",
    "n_gram_entropy",
    "odds_ratio",
    "odds_ratio_test",
    "pairwise_success",
    "parse_record",
    "parse_zsre",
    "prefers_new",
    "rank_auc",
    "read_answers",
    "read_cases",
    "relation_objects",
    "relations_of_template",
    "score_cases",
    "score_record",
    "score_records",
    "score_zsre",
    "summarize",
    "summarize_ripple",
    "summarize_zsre",
    "token_accuracy",
    "write_cases",
]
