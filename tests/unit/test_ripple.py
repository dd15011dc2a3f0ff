"""Ripple evaluation: the relation table, case generation on a tiny model that knows a planted
table of facts (cases kept only where it knows both hops), JSONL round trips, and scoring."""

from __future__ import annotations

import doctest
import json
import math
from collections import Counter
from pathlib import Path

import pytest
import torch
from _knowing import knowing_model
from _support import one_thread
from tiny import HAS_HOOKED, tiny_model

from rome_lens.evaluation import (
    CRITERIA,
    RELATIONS,
    SECOND_HOPS,
    Accuracy,
    CaseResult,
    Query,
    RippleCase,
    assign_relations,
    bootstrap_ci,
    build_cases,
    hops_from,
    index_records,
    load_counterfact,
    parse_record,
    read_answers,
    read_cases,
    relations_of_template,
    score_cases,
    summarize_ripple,
    write_cases,
)
from rome_lens.evaluation import relations as relations_module
from rome_lens.evaluation import ripple as ripple_module
from rome_lens.predict import target_logprob

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
needs_hooked = pytest.mark.skipif(not HAS_HOOKED, reason="trains a tiny HookedTransformer")

# What the tiny model is taught (prompt -> answer). Each edit below tests one reason to keep or
# drop a compositional case:
#   #0 Zog: Rome -> Oslo   knows both hops (Italy / Norway) and Zog's country: KEPT
#   #1 Qux: Paris -> Lima  believes Lima is in Chile, the data says Peru: dropped
#   #2 Vex: Paris -> Rome  its two-hop answer (Italy) is not f(Paris) = France: dropped
#   #3 Wim: Rome -> Milan  f(Rome) = f(Milan) = Italy, nothing to change: dropped
#   #4 Kip: twin city Oslo -> Lima (one-to-many): preservation of Rome, forgetfulness of Oslo
FACTS = {
    "Zog is within": "Rome", "Zog can be found in": "Rome", "Zogo is within": "Rome",
    "Zog is located in the country of": "Italy", "The official language of Zog is": "Latin",
    "Rome is located in the country of": "Italy", "Oslo is located in the country of": "Norway",
    "Qux is within": "Paris", "Qux is located in the country of": "France",
    "Paris is located in the country of": "France", "Lima is located in the country of": "Chile",
    "Vex is within": "Paris", "Vex is located in the country of": "Italy",
    "Wim is within": "Rome", "Wim is located in the country of": "Italy",
    "Milan is located in the country of": "Italy",
    "Kip is a twin city of": "Oslo", "The twin city of Kip is": "Rome",
}


def _record(case_id: int, prompt: str, subject: str, new: str, true: str, **extra: str):
    return parse_record({"case_id": case_id, "prompt": prompt, "subject": subject,
                         "target_new": new, "ground_truth": true, **extra})


EDITS = [
    _record(0, "Zog is within", "Zog", "Oslo", "Rome", rephrase_prompt="Zog can be found in"),
    _record(1, "Qux is within", "Qux", "Lima", "Paris"),
    _record(2, "Vex is within", "Vex", "Rome", "Paris"),
    _record(3, "Wim is within", "Wim", "Milan", "Rome"),
    _record(4, "Kip is a twin city of", "Kip", "Lima", "Oslo"),
]
POOL = [
    _record(10, "The official language of Zog is", "Zog", "Dutch", "Latin"),
    _record(11, "Lima is located in the country of", "Lima", "Chile", "Peru"),
    _record(12, "The twin city of Kip is", "Kip", "Paris", "Rome"),
    _record(13, "Bo is a citizen of", "Bo", "Norway", "Italy"),
    _record(14, "Cy is a citizen of", "Cy", "Peru", "France"),
]


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def knowing():
    if not HAS_HOOKED:
        pytest.skip("trains a tiny HookedTransformer")
    return knowing_model(FACTS, steps=200)


@pytest.fixture(scope="module")
def cases(knowing) -> list[RippleCase]:
    return build_cases(knowing, EDITS, pool=POOL, aliases={"Zog": ["Zogo"]}, progress=False)


def _of(cases: list[RippleCase], criterion: str) -> list[RippleCase]:
    return [case for case in cases if case.criterion == criterion]


# ----------------------------------------------------------------------------- the table


def test_table_rows_are_well_formed() -> None:
    for rid, relation in RELATIONS.items():
        assert rid == relation.id and rid.startswith("P")
        assert len(set(relation.templates)) == len(relation.templates)
        assert all(t.count("{}") == 1 for t in relation.templates)
    for hop in SECOND_HOPS:
        assert hop.first in RELATIONS and set(hop.answers_from) <= set(RELATIONS)
        assert hop.composite.count("{}") == 1 and hop.on_object.count("{}") == 1
    assert len({(h.first, h.second) for h in SECOND_HOPS}) == len(SECOND_HOPS)


def test_templates_name_their_relation_and_shared_ones_are_settled_by_objects() -> None:
    assert relations_of_template("{} is a citizen of") == ("P27",)
    assert set(relations_of_template("{} plays")) == {"P136", "P641", "P1303"}
    recs = [
        _record(0, "A plays the instrument", "A", "piano", "guitar"),
        _record(1, "B is known for performing", "B", "opera", "jazz"),
        _record(2, "C plays", "C", "guitar", "piano"),
        _record(3, "D plays", "D", "jazz", "opera"),
        _record(4, "E plays", "E", "chess", "tennis"),  # objects of no candidate: unassigned
        _record(5, "F hums along to", "F", "x", "y"),  # no relation has the template
    ]
    assert assign_relations(recs) == {0: "P1303", 1: "P136", 2: "P1303", 3: "P136"}


@pytest.mark.skipif(not (DATA / "known_1000.json").exists(), reason="shared data not here")
def test_templates_agree_with_the_relation_ids_of_known_1000() -> None:
    known = json.loads((DATA / "known_1000.json").read_text())
    disagree = [
        (row["template"], row["relation_id"]) for row in known
        if relations_of_template(row["template"])
        and row["relation_id"] not in relations_of_template(row["template"])
    ]
    assert disagree == []


@pytest.mark.skipif(not (DATA / "counterfact-dev.json").exists(), reason="shared data not here")
def test_the_table_covers_counterfact() -> None:
    records = load_counterfact(DATA / "counterfact-dev.json")
    found = assign_relations(records)
    assert len(found) >= 0.97 * len(records)
    counts = Counter(found.values())
    data = index_records(records)
    for hop in SECOND_HOPS:
        assert counts[hop.first] > 0, hop
        assert data.candidates(hop), hop
    assert {hop.first for hop in SECOND_HOPS} >= {"P17", "P27", "P131", "P159", "P495"}
    assert [h.second for h in hops_from("P17")] == ["P30", "P36", "P37"]


# ---------------------------------------------------------------------- case generation


@needs_hooked
def test_the_planted_model_knows_its_facts(knowing) -> None:
    queries = [Query(p, tuple(sorted(set(FACTS.values())))) for p in FACTS]
    answers = read_answers(knowing, queries)
    assert {q.prompt: answers[q] for q in queries} == FACTS


@needs_hooked
def test_compositional_cases_are_kept_only_where_the_model_knows_both_hops(cases) -> None:
    (case,) = _of(cases, "compositionality_i")
    assert case.case_id == 0 and case.relation == "P131"
    assert case.prompt == "Zog is located in the country of"
    assert case.expected == ("Norway",) and case.against == ("Italy",)
    assert [(h.entity, h.answer) for h in case.hops] == [
        ("Zog", "Rome"), ("Rome", "Italy"), ("Oslo", "Norway"), ("Zog", "Italy")]


@needs_hooked
def test_other_criteria_are_built_from_the_data_and_kept_where_known(cases) -> None:
    aliasing = _of(cases, "subject_aliasing")
    assert [(c.case_id, c.prompt, c.expected, c.against) for c in aliasing] == [
        (0, "Zog can be found in", ("Oslo",), ("Rome",)),
        (0, "Zogo is within", ("Oslo",), ("Rome",))]
    (specific,) = _of(cases, "relation_specificity")
    assert (specific.case_id, specific.expected, specific.against) == (0, ("Latin",), ("Dutch",))
    assert specific.hops[0].relation == "P37"
    (kept,) = _of(cases, "preservation")
    assert (kept.case_id, kept.prompt, kept.expected) == (4, "The twin city of Kip is", ("Rome",))
    (forget,) = _of(cases, "forgetfulness")
    assert (forget.case_id, forget.expected, forget.against) == (4, ("Oslo",), ("Paris",))


@needs_hooked
def test_strict_cases_rank_the_new_answer_against_every_candidate(knowing) -> None:
    strict = build_cases(knowing, EDITS[:1], pool=POOL, strict=True, progress=False)
    (case,) = _of(strict, "compositionality_i")
    assert set(case.against) == {"Chile", "France", "Italy", "Peru"}


@needs_hooked
def test_blocks_sharing_an_answer_cache_build_the_same_cases(knowing, cases, monkeypatch) -> None:
    answers: dict[Query, str] = {}
    blocks = [build_cases(knowing, EDITS[:2], pool=POOL, aliases={"Zog": ["Zogo"]},
                          answers=answers, progress=False)]
    asked: list[Query] = []
    real = ripple_module.read_answers

    def spy(model, queries, **kwargs):
        asked.extend(queries)
        return real(model, queries, **kwargs)

    monkeypatch.setattr(ripple_module, "read_answers", spy)
    before = set(answers)
    blocks.append(build_cases(knowing, EDITS[2:], pool=POOL, answers=answers, progress=False))
    assert blocks[0] + blocks[1] == cases
    assert asked and not set(asked) & before  # nothing asked twice
    assert "Rome is located in the country of" not in {q.prompt for q in asked}


def test_jsonl_round_trip(tmp_path: Path) -> None:
    case = RippleCase("compositionality_i", 7, "Zog is located in the country of",
                      ("Norway",), ("Italy",), "Zog", "P131",
                      (ripple_module.Hop("Rome", "P17", "Rome is located in", "Italy"),))
    path = tmp_path / "cases.jsonl"
    write_cases(path, [case, case])
    lines = path.read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[0])["hops"][0]["answer"] == "Italy"
    assert read_cases(path) == [case, case]
    assert repr(case) == ("RippleCase(compositionality_i #7 'Zog is located in the country of' "
                          "-> 'Norway' over 1 other)")


# ------------------------------------------------------------------------------ scoring


@needs_hooked
def test_scoring_follows_the_definition(knowing, cases) -> None:
    results = score_cases(knowing, cases, progress=False)
    for result in results:
        case = result.case
        best = max(target_logprob(knowing, case.prompt, a) for a in case.expected)
        worst = max(target_logprob(knowing, case.prompt, a) for a in case.against)
        assert math.isclose(result.expected_logprob, best, abs_tol=1e-4)
        assert math.isclose(result.against_logprob, worst, abs_tol=1e-4)
        assert result.correct == (best > worst)
    # On the unedited model: nothing has changed yet, everything that should stay stays.
    changes = {"compositionality_i", "subject_aliasing"}
    assert all(r.correct != (r.case.criterion in changes) for r in results)
    summary = summarize_ripple(results)
    assert summary["compositionality_i"].accuracy == 0.0
    assert summary["relation_specificity"].accuracy == 100.0
    assert summary["all"].n == len(cases) and set(summary) <= {"all", *CRITERIA}


def test_bootstrap_ci_is_deterministic_and_brackets_the_mean() -> None:
    values = [1.0] * 30 + [0.0] * 10
    low, high = bootstrap_ci(values, seed=3)
    assert (low, high) == bootstrap_ci(values, seed=3)
    assert low < 0.75 < high and 0.0 <= low and high <= 1.0
    assert all(math.isnan(x) for x in bootstrap_ci([]))
    with pytest.raises(ValueError, match="level"):
        bootstrap_ci(values, level=1.5)
    case = RippleCase("preservation", 0, "p", ("a",), ("b",), "s", "P190")
    summary = summarize_ripple([CaseResult(case, True, -1.0, -2.0)] * 3
                               + [CaseResult(case, False, -3.0, -2.0)])
    assert summary["preservation"].n == 4 and summary["preservation"].accuracy == 75.0
    assert repr(Accuracy(4, 75.0, 25.0, 100.0)) == "Accuracy(75.0% [25.0, 100.0], n=4)"


def test_a_query_needs_candidates() -> None:
    with pytest.raises(ValueError, match="no candidate"):
        read_answers(object(), [Query("Zog is within", ())])  # type: ignore[arg-type]


# ---------------------------------------------------------------- the modules' examples


@pytest.mark.parametrize("module", [relations_module, ripple_module])
def test_docstring_examples_run(module, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    model = tiny_model("gemma" if HAS_HOOKED else "bridge")
    globs = {**vars(module), "model": model, "tmp": tmp_path, "torch": torch}
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in finder.find(module, module.__name__, globs=globs):
        runner.run(test)
    assert runner.tries > 0 and runner.failures == 0
