"""Insertion vs. erasure on the embedded model: the Eiffel Tower edit, probed."""

from __future__ import annotations

import pytest

import rome_lens
from rome_lens._typing import Model as HookedTransformer
from rome_lens.audit import ERASURE, INSERTION, probe_edit

PARAPHRASES = ["The Eiffel Tower, a famous landmark, is in the city of"]


@pytest.fixture(scope="module")
def insertion_report(gemma: HookedTransformer, eiffel_edit: rome_lens.RomeEdit):
    return probe_edit(gemma, eiffel_edit, paraphrases=PARAPHRASES, n_contexts=1,
                      lenses=("logit",))


def test_rome_edit_is_an_insertion(insertion_report) -> None:
    report = insertion_report
    assert report.structural["identical"]
    assert report.output["pre_old"] > 0.5 and report.output["post_new"] > 0.9
    # the override wins at the output, yet " Paris" is still in the top 10 downstream of L
    assert report.verdict == INSERTION
    assert 1 <= report.best_rank("old") <= 10
    df = report.to_dataframe()
    pre_out = df[(df.condition == "pre") & (df.layer == 17) & (df.position == "last")
                 & (df.object == "old") & (df.prompt_kind == "edit")]
    assert int(pre_out["rank"].iloc[0]) == 1


def test_erasure_objective_removes_paris_from_the_edit_prompt(
    gemma: HookedTransformer, eiffel_edit: rome_lens.RomeEdit
) -> None:
    edit = rome_lens.compute_rome(gemma, eiffel_edit.request, objective="erasure")
    report = probe_edit(gemma, edit, paraphrases=PARAPHRASES, n_contexts=1, lenses=("logit",))
    assert report.output["post_old"] < 0.01 * report.output["pre_old"]
    df = report.to_dataframe()
    edit_prompt = df[(df.condition == "post") & (df.object == "old") & (df.layer >= edit.layer)
                     & (df.prompt_kind == "edit")]
    assert int(edit_prompt["rank"].min()) > report.rule.top_k
    # the new object does not win, so it is never called an insertion
    assert report.output["post_new"] < report.output["post_old"] or report.verdict != INSERTION
    assert report.verdict in (ERASURE, "PARTIAL")
