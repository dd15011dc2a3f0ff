from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch
from _support import cached_edit, one_thread

from rome_lens import EditRequest, SubjectNotFoundError
from rome_lens.errors import RomeLensError
from rome_lens.evaluation import (
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
from rome_lens.models import access
from rome_lens.predict import target_logprob
from rome_lens.requests import target_tokens

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data" / "zsre-dev.json"
RECORD = {
    "subject": "Alice Smith",
    "src": "Where does Alice Smith live?",
    "rephrase": "Which city is Alice Smith living in?",
    "alt": "Paris",
    "answers": ["Rome"],
    "loc": "nq question: who wrote hamlet",
    "loc_ans": "Shakespeare",
}


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    with one_thread():
        yield


def _logits(argmax: list[int], vocab: int = 10) -> torch.Tensor:
    """Logits whose argmax at position p is argmax[p] (and a runner-up elsewhere)."""
    logits = torch.randn(len(argmax), vocab, generator=torch.Generator().manual_seed(0))
    logits[torch.arange(len(argmax)), argmax] = 10.0
    return logits


# ------------------------------------------------------------- metrics on hand-made logits


def test_answer_predictions_read_the_positions_before_each_answer_token() -> None:
    # Sequence: 3 prompt tokens + answer [7, 8, 9]. Position p predicts token p + 1, so the
    # answer is predicted at positions 2, 3, 4; the last position (5) predicts what follows.
    logits = _logits([0, 1, 7, 8, 9, 4])
    assert answer_predictions(logits, 3).tolist() == [7, 8, 9]
    assert answer_predictions(logits, 1).tolist() == [9]
    for bad in (0, 6):
        with pytest.raises(ValueError, match="n_answer"):
            answer_predictions(logits, bad)


def test_token_accuracy_of_a_multi_token_answer() -> None:
    answer = torch.tensor([7, 8, 9])
    assert token_accuracy(answer_predictions(_logits([0, 1, 7, 8, 9, 4]), 3), answer) == 1.0
    # The second answer token is mispredicted: teacher forcing still feeds the true token, so
    # the third is judged on its own.
    got = answer_predictions(_logits([0, 1, 7, 3, 9, 4]), 3)
    assert token_accuracy(got, answer) == pytest.approx(2 / 3)
    assert token_accuracy(torch.tensor([1]), torch.tensor([2])) == 0.0
    with pytest.raises(ValueError, match="shape"):
        token_accuracy(torch.tensor([1, 2]), torch.tensor([1]))
    with pytest.raises(ValueError, match="shape"):
        token_accuracy(torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long))


def test_locality_is_agreement_with_the_unedited_model_not_correctness() -> None:
    loc_answer = torch.tensor([5, 6, 7, 8])
    before = answer_predictions(_logits([0, 1, 2, 3, 4, 0]), 4)   # all wrong: [1, 2, 3, 4]
    after = answer_predictions(_logits([0, 1, 2, 9, 4, 0]), 4)    # one position changed
    assert token_accuracy(before, loc_answer) == 0.0
    assert locality(before, before) == 1.0
    assert locality(after, before) == 0.75
    # A change towards the right answer is still a change.
    fixed = answer_predictions(_logits([0, 5, 2, 3, 4, 0]), 4)
    assert locality(fixed, before) == 0.75


def test_pairwise_rule_compares_mean_token_log_probabilities() -> None:
    # The new answer has two tokens: its sum (-4) is below the true one's (-3), its mean is not.
    assert pairwise_success(torch.tensor([-1.0, -3.0]), torch.tensor([-3.0]))
    assert not pairwise_success(torch.tensor([-2.0]), torch.tensor([-1.0, -2.0]))
    assert not pairwise_success(torch.tensor([-2.0]), torch.tensor([-2.0]))  # a tie is a loss


def test_summary_averages_per_record_and_skips_missing_values() -> None:
    scores = [
        ZsreScores(0, 1.0, 2 / 3, 1.0, True, False),
        ZsreScores(1, 0.5, 0.0, 0.5, None, None, seconds=2.0),
    ]
    got = summarize_zsre(scores)
    assert got["n"] == 2
    assert got["Reliability"] == 75.0
    assert got["Generalisation"] == pytest.approx(100 / 3)
    assert got["Locality"] == 75.0
    assert got["pairwise"] == 100.0 and got["pairwise_rephrase"] == 0.0
    assert got["n_pairwise"] == 1
    assert got["seconds_per_edit"] == 1.0
    no_reference = summarize_zsre([ZsreScores(0, 1.0, 1.0, None, None, None)])
    assert math.isnan(no_reference["Locality"]) and math.isnan(no_reference["pairwise"])
    assert repr(scores[1]) == "ZsreScores(#1 rel 0.50 gen 0.00 loc 0.50 pairwise None)"


# ------------------------------------------------------------- loader


def test_parse_record_makes_an_edit_request_on_the_question() -> None:
    rec = parse_zsre(RECORD, index=4)
    assert rec.request == EditRequest("Where does Alice Smith live?", "Alice Smith", "Paris",
                                      "Rome")
    assert rec.request.template == "Where does {} live?"
    assert (rec.question, rec.rephrase, rec.loc, rec.loc_answer) == (
        RECORD["src"], RECORD["rephrase"], RECORD["loc"], RECORD["loc_ans"])
    assert repr(rec) == "ZsreRecord(#4 'Where does Alice Smith live?' -> 'Paris', true 'Rome')"


def test_true_answer_is_the_first_that_differs_from_the_new_one() -> None:
    same = parse_zsre({**RECORD, "answers": ["Paris"]})
    assert same.target_true is None and same.answers == ("Paris",)
    assert repr(same) == "ZsreRecord(#0 'Where does Alice Smith live?' -> 'Paris')"
    other = parse_zsre({**RECORD, "answers": ["Paris", "Oslo"]})
    assert other.target_true == "Oslo"


def test_subject_is_located_verbatim_or_ignoring_case() -> None:
    assert locate_subject("Who founded the Beatles?", "The Beatles") == "the Beatles"
    rec = parse_zsre({**RECORD, "subject": "alice SMITH"})
    assert rec.request.subject == "Alice Smith"
    with pytest.raises(SubjectNotFoundError):
        parse_zsre({**RECORD, "subject": "Bob Jones"})
    with pytest.raises(RomeLensError, match="empty"):
        parse_zsre({**RECORD, "alt": ""})
    with pytest.raises(RomeLensError, match="lacks"):
        parse_zsre({k: v for k, v in RECORD.items() if k != "loc"})


def test_loader_skips_and_counts_records_it_cannot_edit(tmp_path, caplog) -> None:
    path = tmp_path / "zsre.json"
    bad = [{**RECORD, "alt": ""}, {**RECORD, "subject": "Bob Jones"}]
    path.write_text(json.dumps([RECORD, *bad, {**RECORD, "alt": "Oslo"}]))
    with caplog.at_level(logging.WARNING, logger="rome_lens.evaluation.zsre"):
        records = load_zsre(path)
    assert [r.index for r in records] == [0, 3]  # indices in the file
    assert "skipped 2 of 4" in caplog.text
    assert "missing or empty field: 1" in caplog.text
    assert "subject not in the question: 1" in caplog.text


@pytest.mark.skipif(not SHARED.exists(), reason="shared data not present")
def test_loader_on_the_shared_file(tmp_path) -> None:
    raw = json.loads(SHARED.read_text())[:5]
    path = tmp_path / "head.json"
    path.write_text(json.dumps(raw))
    records = load_zsre(path)
    assert len(records) == 5
    first = records[0]
    assert first.request.subject == "UniFirst"
    assert first.question == "What is the product made by UniFirst?"
    assert (first.target_new, first.target_true) == ("unmanned aircraft", "uniform")
    assert first.loc.startswith("nq question: ")
    for rec, row in zip(records, raw, strict=True):
        assert rec.request.subject in rec.question
        assert rec.rephrase == row["rephrase"] and rec.loc_answer == row["loc_ans"]


@pytest.mark.skipif(not SHARED.exists(), reason="shared data not present")
def test_whole_shared_file_loads_all_but_the_record_without_a_new_answer() -> None:
    records = load_zsre(SHARED)
    assert len(records) == 599
    assert 534 not in {r.index for r in records}  # its "alt" is empty
    assert sum(r.target_true is None for r in records) == 13  # alt is the only true answer


# ------------------------------------------------------------- scoring a tiny model

RECORDS = [
    parse_zsre(RECORD, index=0),
    parse_zsre({**RECORD, "subject": "Bob Jones", "src": "What does Bob Jones play?",
                "rephrase": "Which sport is Bob Jones known for?", "alt": "chess",
                "answers": ["chess"], "loc": "nq question: capital of peru",
                "loc_ans": "Lima"}, index=1),
    parse_zsre({**RECORD, "answers": ["Rome", "Oslo"], "loc_ans": "William Shakespeare"},
               index=2),
]


def _definition(model, prompt: str, answer: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(argmax predictions, answer log-probs) from the full logits of one unpadded sequence."""
    ids = target_tokens(model, answer)
    tokens = torch.cat([access.to_tokens(model, prompt), ids])[None]
    with torch.no_grad():
        logits = access.decode_residual(model, access.final_residual(model, tokens)[0])
    logp = logits.log_softmax(-1)[-len(ids) - 1 : -1].gather(-1, ids[:, None])[:, 0]
    return answer_predictions(logits, len(ids)), logp


def test_scores_equal_the_definition_on_full_logits(model) -> None:
    before = score_zsre(model, RECORDS, progress=False)
    for rec, got in zip(RECORDS, before, strict=True):
        edit_pred, edit_lp = _definition(model, rec.question, rec.target_new)
        para_pred, para_lp = _definition(model, rec.rephrase, rec.target_new)
        loc_pred, _ = _definition(model, rec.loc, rec.loc_answer)
        assert got.reliability == token_accuracy(edit_pred, target_tokens(model, rec.target_new))
        assert got.generalisation == token_accuracy(para_pred, target_tokens(model, rec.target_new))
        assert got.loc_predicted == loc_pred.tolist()
        assert got.locality is None
        if rec.target_true is None:
            assert got.pairwise is None and got.pairwise_rephrase is None
        else:
            _, true_lp = _definition(model, rec.question, rec.target_true)
            assert got.pairwise == pairwise_success(edit_lp, true_lp)
    for batch_size in (1, 4):
        again = score_zsre(model, RECORDS, batch_size=batch_size, progress=False)
        assert [repr(s) for s in again] == [repr(s) for s in before]


def test_an_edit_scored_against_the_unedited_model(model, hparams) -> None:
    before = score_zsre(model, RECORDS, progress=False)
    unchanged = score_zsre(model, RECORDS, reference=before, progress=False)
    assert [s.locality for s in unchanged] == [1.0, 1.0, 1.0]
    rec = RECORDS[0]
    lp_before = target_logprob(model, rec.question, rec.target_new)
    edit = cached_edit(model, rec.request, hparams.layer, hparams)
    with edit.applied(model):
        after = score_zsre(model, [rec], reference=before[:1], progress=False)[0]
        assert target_logprob(model, rec.question, rec.target_new) > lp_before
    assert 0.0 <= after.locality <= 1.0
    assert after.reliability >= before[0].reliability
    assert after.pairwise is not None
    summary = summarize_zsre([after])
    assert summary["Reliability"] == 100 * after.reliability
    with pytest.raises(ValueError, match="same records"):
        score_zsre(model, RECORDS[:1], reference=before[1:2], progress=False)


def test_record_type_is_frozen() -> None:
    with pytest.raises(AttributeError):
        RECORDS[0].rephrase = "x"  # type: ignore[misc]
    assert isinstance(RECORDS[0], ZsreRecord)
