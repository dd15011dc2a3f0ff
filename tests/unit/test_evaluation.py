from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from _support import one_thread

from rome_lens import EditRequest, InvalidRequestError, RomeLensError
from rome_lens.evaluation import (
    CounterFactRecord,
    RecordScores,
    harmonic_mean,
    known_records,
    load_counterfact,
    parse_record,
    prefers_new,
    score_record,
    score_records,
    summarize,
)
from rome_lens.predict import target_logprob, target_logprobs

FLAT = {
    "case_id": 7,
    "prompt": "{} is located in the city of",
    "subject": "The Eiffel Tower",
    "target_new": "Rome",
    "ground_truth": "Paris",
    "rephrase_prompt": "Where is The Eiffel Tower? It is in",
    "locality_prompt": ["The Louvre is located in the city of", "Notre Dame is in"],
    "locality_ground_truth": "Paris",
}
NESTED = {
    "case_id": 7,
    "requested_rewrite": {
        "prompt": "{} is located in the city of",
        "subject": "The Eiffel Tower",
        "target_new": {"str": "Rome", "id": "Q220"},
        "target_true": {"str": "Paris", "id": "Q90"},
    },
    "paraphrase_prompts": ["Where is The Eiffel Tower? It is in"],
    "neighborhood_prompts": ["The Louvre is located in the city of", "Notre Dame is in"],
}


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    with one_thread():
        yield


# ---------------------------------------------------------------- parsing


def test_flat_and_nested_records_parse_equal() -> None:
    flat, nested = parse_record(FLAT), parse_record(NESTED)
    expected = EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome", "Paris")
    assert flat.request == nested.request == expected
    assert flat.request.text == "The Eiffel Tower is located in the city of"
    assert flat.target_true == nested.target_true == "Paris"
    assert flat.target_new == nested.target_new == "Rome"
    assert flat.case_id == nested.case_id == 7
    assert flat.paraphrase_prompts == nested.paraphrase_prompts == [
        "Where is The Eiffel Tower? It is in"
    ]
    assert flat.neighborhood_prompts == nested.neighborhood_prompts == [
        "The Louvre is located in the city of", "Notre Dame is in"
    ]
    assert flat == nested


def test_flat_record_optional_fields() -> None:
    rec = {k: FLAT[k] for k in ("prompt", "subject", "target_new", "ground_truth")}
    parsed = parse_record(rec)
    assert parsed.case_id == -1
    assert parsed.paraphrase_prompts == [] and parsed.neighborhood_prompts == []
    parsed = parse_record(dict(rec, locality_prompt="Notre Dame is in",
                               rephrase_prompt=["a", "b"]))
    assert parsed.neighborhood_prompts == ["Notre Dame is in"]
    assert parsed.paraphrase_prompts == ["a", "b"]


def test_unknown_layout_and_invalid_records_raise() -> None:
    with pytest.raises(RomeLensError, match="no known CounterFact layout"):
        parse_record({"prompt": "x {}", "subject": "y"})
    bad = json.loads(json.dumps(NESTED))
    bad["requested_rewrite"]["target_new"]["str"] = "Paris"
    with pytest.raises(InvalidRequestError):
        parse_record(bad)


def test_load_counterfact_mixed_layouts_skips_invalid(tmp_path: Path) -> None:
    invalid = dict(FLAT, case_id=8, target_new="Paris")  # new == true
    path = tmp_path / "cf.json"
    path.write_text(json.dumps([FLAT, invalid, NESTED, {"junk": 1}]))
    records = load_counterfact(path)
    assert len(records) == 2
    assert records[0] == records[1] == parse_record(FLAT)


# ---------------------------------------------------------------- harmonic mean / summary


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([100, 100, 100], 100.0),
        ([50, 100, 100], 75.0),
        ([1, 2, 4], 12 / 7),
        ([40, 60], 48.0),
        ([0, 100, 100], 0.0),
        ([100, 0.0, 100], 0.0),
        ([100, 100, -5], 0.0),
    ],
)
def test_harmonic_mean(values: list[float], expected: float) -> None:
    assert harmonic_mean(values) == pytest.approx(expected, rel=1e-12)


def _scores() -> list[RecordScores]:
    return [
        RecordScores(
            case_id=0, efficacy=[True], paraphrase=[True, False],
            neighborhood=[True, True, False, False], efficacy_magnitude=[0.2],
            paraphrase_magnitude=[0.1, -0.3], neighborhood_magnitude=[0.05], seconds=1.0,
        ),
        RecordScores(
            case_id=1, efficacy=[False], paraphrase=[True, True],
            neighborhood=[True, True, True, True], efficacy_magnitude=[-0.1],
            paraphrase_magnitude=[0.2, 0.4], neighborhood_magnitude=[0.15], seconds=3.0,
        ),
    ]


def test_summarize_known_values() -> None:
    summary = summarize(_scores())
    assert summary["n"] == 2.0
    assert summary["ES"] == pytest.approx(50.0)      # mean(1, 0)
    assert summary["PS"] == pytest.approx(75.0)      # mean(1/2, 1)
    assert summary["NS"] == pytest.approx(75.0)      # mean(2/4, 4/4)
    assert summary["S"] == pytest.approx(3 / (1 / 50 + 2 / 75))  # 64.2857...
    assert summary["S"] == pytest.approx(64.285714, abs=1e-5)
    assert summary["EM"] == pytest.approx(5.0)       # 100 * mean(0.2, -0.1)
    assert summary["PM"] == pytest.approx(10.0)      # 100 * mean(-0.1, 0.3)
    assert summary["NM"] == pytest.approx(10.0)      # 100 * mean(0.05, 0.15)
    assert summary["seconds_per_edit"] == pytest.approx(2.0)


def test_summarize_weights_records_equally_and_skips_empty_lists() -> None:
    scores = _scores() + [
        RecordScores(case_id=2, efficacy=[True], paraphrase=[], neighborhood=[False]),
    ]
    summary = summarize(scores)
    assert summary["n"] == 3.0
    assert summary["ES"] == pytest.approx(200 / 3)
    assert summary["PS"] == pytest.approx(75.0)      # record 2 has no paraphrases
    assert summary["NS"] == pytest.approx(50.0)      # mean(0.5, 1, 0)
    assert summary["EM"] == pytest.approx(5.0)       # record 2 has no magnitudes


def test_summarize_perfect_and_zero() -> None:
    perfect = RecordScores(case_id=0, efficacy=[True], paraphrase=[True], neighborhood=[True])
    s = summarize([perfect])
    assert (s["ES"], s["PS"], s["NS"], s["S"]) == (100.0, 100.0, 100.0, 100.0)
    broken = RecordScores(case_id=0, efficacy=[True], paraphrase=[True], neighborhood=[False])
    assert summarize([broken])["S"] == 0.0
    empty = summarize([])
    assert empty["n"] == 0.0 and math.isnan(empty["ES"])


# ---------------------------------------------------------------- scoring on a model


def test_score_record_matches_target_logprobs(model) -> None:
    rec = parse_record({
        "prompt": "{} lives in", "subject": "Alice", "target_new": "Rome",
        "ground_truth": "Oslo", "rephrase_prompt": ["Alice has a home in", "Alice is from"],
        "locality_prompt": ["Bob lives in"],
    })
    scores = score_record(model, rec)

    def wins(prompt: str) -> bool:
        return target_logprob(model, prompt, "Rome") > target_logprob(model, prompt, "Oslo")

    assert scores.efficacy == [wins("Alice lives in")]
    assert scores.paraphrase == [wins("Alice has a home in"), wins("Alice is from")]
    assert scores.neighborhood == [not wins("Bob lives in")]
    new_wins, margin = prefers_new(model, "Bob lives in", "Rome", "Oslo")
    lp_new = target_logprob(model, "Bob lives in", "Rome")
    lp_true = target_logprob(model, "Bob lives in", "Oslo")
    assert margin == pytest.approx(math.exp(lp_new) - math.exp(lp_true), rel=1e-6)
    assert new_wins == (lp_new > lp_true) == (margin > 0)
    # score_record runs all its pairs in one padded batch: equal up to float rounding.
    assert scores.neighborhood_magnitude == [pytest.approx(-margin, abs=1e-6)]


def test_target_logprob_matches_full_forward_pass(model) -> None:
    prompt, target = "Alice lives in", "Rome"
    tokens = model.to_tokens(prompt + " " + target)  # character level: BOS + characters
    with torch.no_grad():
        logp = model(tokens)[0].log_softmax(-1)
    n = 1 + len(prompt)
    ids = tokens[0, n:]
    expected = logp[n - 1 : n - 1 + ids.shape[0]].gather(-1, ids[:, None]).mean()
    assert target_logprob(model, prompt, target) == pytest.approx(float(expected), abs=1e-5)


# ---------------------------------------------------------------- batched scoring

# Prompts and targets of different lengths (every target is several characters, so several
# tokens); a prompt shared by two records; one record with no paraphrase, one with a target
# that already starts with a space; both layouts.
BATCH_RECORDS = [
    dict(FLAT, case_id=1),
    {"case_id": 2, "prompt": "{} speaks", "subject": "Bo", "target_new": "Swedish language",
     "ground_truth": "Greek", "locality_prompt": ["Al speaks", "The old king of Norway speaks",
                                                  "Notre Dame is in"]},
    {"case_id": 3, "prompt": "The mother tongue of {} is", "subject": "Carol Jean Smith",
     "target_new": " Dutch", "ground_truth": "French (Quebec)",
     "rephrase_prompt": ["Carol Jean Smith was born in Lyon. The mother tongue of Carol Jean "
                         "Smith is", "Carol Jean Smith speaks"],
     "locality_prompt": "Bob is"},
    dict(NESTED, case_id=4, paraphrase_prompts=[]),
]


def _reference(model, rec: CounterFactRecord) -> RecordScores:
    """Scores from one unbatched target_logprob per (prompt, target): the definition."""
    new, true = rec.target_new, rec.target_true
    es = [prefers_new(model, rec.request.text, new, true)]
    ps = [prefers_new(model, p, new, true) for p in rec.paraphrase_prompts]
    ns = [prefers_new(model, p, new, true) for p in rec.neighborhood_prompts]
    return RecordScores(
        case_id=rec.case_id,
        efficacy=[a for a, _ in es], paraphrase=[a for a, _ in ps],
        neighborhood=[not a for a, _ in ns], efficacy_magnitude=[m for _, m in es],
        paraphrase_magnitude=[m for _, m in ps], neighborhood_magnitude=[-m for _, m in ns],
    )


def _assert_same(got: list[RecordScores], want: list[RecordScores], tol: float) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert a.case_id == b.case_id
        assert (a.efficacy, a.paraphrase, a.neighborhood) == (
            b.efficacy, b.paraphrase, b.neighborhood)
        for name in ("efficacy_magnitude", "paraphrase_magnitude", "neighborhood_magnitude"):
            assert getattr(a, name) == pytest.approx(getattr(b, name), abs=tol), name


@pytest.fixture
def batch_records() -> list[CounterFactRecord]:
    return [parse_record(r) for r in BATCH_RECORDS]


def test_score_records_equals_unbatched_definition(model, batch_records) -> None:
    want = [_reference(model, rec) for rec in batch_records]
    got = score_records(model, batch_records, progress=False)
    _assert_same(got, want, tol=1e-6)
    _assert_same([score_record(model, rec) for rec in batch_records], want, tol=1e-6)
    assert [len(s.neighborhood) for s in got] == [2, 3, 1, 2]
    assert [len(s.paraphrase) for s in got] == [1, 0, 2, 0]


def test_score_records_batch_size_does_not_change_results(model, batch_records) -> None:
    one = score_records(model, batch_records, batch_size=1, progress=False)
    for batch_size in (3, 64):
        _assert_same(score_records(model, batch_records, batch_size=batch_size,
                                   progress=False), one, tol=1e-6)


def test_target_logprobs_matches_target_logprob_in_any_batch(model) -> None:
    pairs = [("Alice lives in", "Rome"), ("A", "Swedish language"), ("Alice lives in", " Oslo"),
             ("The mother tongue of Carol Jean Smith is", "French"), ("A", "Swedish language")]
    want = [target_logprob(model, p, t) for p, t in pairs]
    for batch_size in (1, 2, 64):
        got = target_logprobs(model, pairs, batch_size=batch_size)
        assert got == pytest.approx(want, abs=1e-5)
    assert got[1] == got[4]  # a repeated pair is one row


def test_pairs_of_one_prompt_share_forward_rows(model, monkeypatch) -> None:
    import rome_lens.predict as predict

    prompt = "The mother tongue of Carol Jean Smith is"
    targets = ["French", "Swedish language", "Swedish", "Swedish language of Sweden", "Rome"]
    pairs = [(prompt, t) for t in targets]
    pairs += [("Alice lives in", "Rome"), ("Alice lives in", "Oslo")]
    lengths = {t: len(predict.target_tokens(model, t)) for t in targets}
    run_rows: list[int] = []
    real = predict.access.final_residual

    def counting(model, tokens, **kwargs):
        run_rows.append(int(tokens.shape[0]))
        return real(model, tokens, **kwargs)

    monkeypatch.setattr(predict.access, "final_residual", counting)
    got = predict.target_token_scores(model, pairs, batch_size=64)
    for (p, t), score in zip(pairs, got, strict=True):
        assert score.mean_logprob == pytest.approx(target_logprob(model, p, t), abs=1e-5)
        assert score.ids.tolist() == predict.target_tokens(model, t).tolist()
    # one-token targets ride on any row of their prompt; a target whose head is another's
    # prefix rides on that row: fewer rows than pairs, never fewer than the distinct heads
    heads = {tuple(predict.target_tokens(model, t)[:-1].tolist()) for t in targets
             if lengths[t] > 1}
    assert len(heads) <= run_rows[0] < len(pairs)


def test_target_logprobs_bad_arguments(model) -> None:
    with pytest.raises(ValueError, match="batch_size"):
        target_logprobs(model, [("Alice lives in", "Rome")], batch_size=0)
    with pytest.raises(InvalidRequestError):
        target_logprobs(model, [("Alice lives in", "Rome"), ("Bob is", " ")])
    assert target_logprobs(model, []) == []


def test_known_records_matches_one_prompt_at_a_time(model, batch_records) -> None:
    records = batch_records * 3
    known = [r for r in records if not prefers_new(
        model, r.request.text, r.target_new, r.target_true)[0]]
    for n in (1, 2, len(records)):
        for batch_size in (2, 5, 64):
            assert known_records(model, records, n, batch_size=batch_size) == known[:n]
