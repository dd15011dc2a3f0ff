"""Measure: fluency (n-gram entropy), generation checks, and the FT-L baseline."""

from __future__ import annotations

import math

import pytest
import torch
from _support import one_thread

import rome_lens
from rome_lens import EditRequest, InvalidRequestError
from rome_lens.baselines import DenseEdit, FTLHyperParams, compute_ft_l
from rome_lens.evaluation import generation_metrics, n_gram_entropy, parse_record, score_record
from rome_lens.models import access
from rome_lens.predict import target_logprob


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    with one_thread():
        yield


def test_n_gram_entropy_known_values() -> None:
    # 4 distinct bigrams out of 4 (2 bits), 3 distinct trigrams out of 3 (log2 3 bits)
    text = "a b c d e"
    expected = (2 / 3 * 2.0 + 4 / 3 * math.log2(3)) / 2
    assert n_gram_entropy(text) == pytest.approx(expected)
    # a repeated bigram: "x y x y x": bigrams xy, yx, xy, yx -> 1 bit; trigrams xyx, yxy, xyx
    h3 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert n_gram_entropy("x y x y x") == pytest.approx((2 / 3 * 1.0 + 4 / 3 * h3) / 2)
    assert n_gram_entropy("same same same same same same") == 0.0
    assert n_gram_entropy("one") == 0.0
    # punctuation is a unit, case is ignored
    assert n_gram_entropy("A, b. C") == n_gram_entropy("a , b . c")


def test_generation_metrics_are_seeded_and_bounded(model) -> None:
    a = generation_metrics(model, ["Alice lives in", "Bob is"], "Rome", "Oslo", n_tokens=12)
    b = generation_metrics(model, ["Alice lives in", "Bob is"], "Rome", "Oslo", n_tokens=12)
    assert a == b
    assert 0.0 <= a["mentions_new"] <= 1.0 and 0.0 <= a["mentions_true"] <= 1.0
    assert a["fluency"] > 0.0


def test_score_record_with_generation(model) -> None:
    rec = parse_record({"prompt": "{} lives in", "subject": "Alice", "target_new": "Rome",
                        "ground_truth": "Oslo", "rephrase_prompt": "Alice is from"})
    scores = score_record(model, rec, generation=True, gen_tokens=8)
    assert scores.fluency is not None and scores.fluency >= 0
    summary = rome_lens.evaluation.summarize([scores])
    assert summary["GE"] == pytest.approx(100 * scores.fluency)


def test_ft_l_respects_the_norm_bound_and_raises_the_target(model, tmp_path) -> None:
    request = EditRequest("{} lives in", "Alice Smith", "Paris", "Rome")
    before = access.parameters_checksum(model)
    lp_before = target_logprob(model, request.text, "Paris")
    hp = FTLHyperParams(steps=10, lr=5e-3, norm_bound=5e-3)
    edit = compute_ft_l(model, request, layer=1, hparams=hp)
    assert isinstance(edit, DenseEdit)
    assert access.parameters_checksum(model) == before  # computing does not modify the model
    delta = edit.delta()
    assert float(delta.abs().max()) <= hp.norm_bound + 1e-9
    assert float(delta.abs().max()) == pytest.approx(hp.norm_bound)  # the bound is active
    assert torch.linalg.matrix_rank(delta.double()) > 1  # a dense change, not rank one
    w0 = access.mlp_out_weight(model, 1).detach().clone()
    with edit.applied(model):
        torch.testing.assert_close(access.mlp_out_weight(model, 1).detach(), w0 + delta)
        lp_after = target_logprob(model, request.text, "Paris")
    assert lp_after > lp_before
    assert edit.info["losses"][-1] < edit.info["losses"][0]
    assert access.parameters_checksum(model) == before  # reverted exactly
    # dense edits save and load like every edit (the first release could not save them)
    loaded = rome_lens.load_edit(edit.save(tmp_path / "ftl"), model=model)
    assert loaded.id == edit.id and loaded.method == "ft-l"
    assert torch.equal(loaded.delta(), delta)


def test_ft_l_stacks_with_rome_and_reverts_exactly(model, hparams) -> None:
    from _support import cached_edit

    before = access.parameters_checksum(model)
    rome = cached_edit(model, EditRequest("{} lives in", "Alice Smith", "Paris", "Rome"), 1,
                       hparams)
    ft = compute_ft_l(model, EditRequest("{} is from", "Bob Jones", "Oslo"), layer=1,
                      hparams=FTLHyperParams(steps=3, lr=1e-3, norm_bound=1e-3))
    rome.apply(model)
    ft.apply(model)
    rome.revert(model)
    ft.revert(model)
    assert access.parameters_checksum(model) == before


def test_ft_l_bad_input(model) -> None:
    request = EditRequest("{} lives in", "Alice Smith", "Paris")
    with pytest.raises(InvalidRequestError):
        compute_ft_l(model, request, layer=1, hparams=FTLHyperParams(norm_bound=0.0))
    with pytest.raises(rome_lens.LayerOutOfRangeError):
        compute_ft_l(model, request, layer=99)
    with pytest.raises(InvalidRequestError):
        compute_ft_l(model, "not a request")  # type: ignore[arg-type]
