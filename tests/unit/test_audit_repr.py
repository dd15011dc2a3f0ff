"""Notebook reprs of audit values: a few informative lines, never tensors or raw rows."""

from __future__ import annotations

from _support import STATS_CORPUS, cached_edit

from rome_lens import EditRequest
from rome_lens._typing import Model as HookedTransformer
from rome_lens.audit import (
    ProbeReport,
    TunedLens,
    TunedLensConfig,
    VerdictRule,
    probe_edit,
    train_tuned_lens,
)

REQUEST = EditRequest("{} lives in", "Alice Smith", "Paris", "Rome")


def _assert_short(text: str, max_lines: int) -> None:
    assert "tensor" not in text
    assert "{'condition'" not in text  # no raw records
    lines = text.splitlines()
    assert 1 <= len(lines) <= max_lines
    assert max(len(line) for line in lines) <= 120


def test_probe_report_repr_is_a_short_digest(model: HookedTransformer, hparams) -> None:
    edit = cached_edit(model, REQUEST, 1, hparams)
    top = model(REQUEST.text)[0, -1].topk(2).indices.tolist()
    lens = TunedLens.identity(model)
    report = probe_edit(model, edit, lenses=("logit", "tuned"), lens=lens, n_contexts=1,
                        object_tokens=(top[0], top[1]))
    assert len(report.records) > 100
    text = repr(report)
    _assert_short(text, max_lines=8)
    for part in (report.verdict, "layer 1", "'Alice Smith'", "'{} lives in'", "'Rome'",
                 "'Paris'", "logit", "tuned", "head_projection", "probability_delta",
                 "@20", "structural check", "bit-identical"):
        assert part in text, part
    best = report.best_rank("old", lens="tuned")
    assert f"tuned {best} (" in text


def test_probe_report_repr_of_a_bare_report() -> None:
    report = ProbeReport(REQUEST, 2, "ERASURE", VerdictRule(), records=[], attacks={},
                         structural={})
    text = repr(report)
    _assert_short(text, max_lines=5)
    assert "ERASURE at layer 2" in text and "not run" in text


def test_tuned_lens_repr(model: HookedTransformer) -> None:
    identity = TunedLens.identity(model)
    text = repr(identity)
    _assert_short(text, max_lines=1)
    assert f"layers={model.cfg.n_layers}" in text and f"d_model={model.cfg.d_model}" in text
    assert identity.fingerprint[:8] in text and identity.fingerprint not in text
    assert "untrained" in text
    config = TunedLensConfig(sequences=2, steps=1, batch_tokens=16)
    trained = train_tuned_lens(model, corpus=STATS_CORPUS, config=config, progress=False)
    text = repr(trained)
    _assert_short(text, max_lines=1)
    assert repr(trained.info["corpus"]) in text and "steps=1" in text


def test_verdict_rule_repr_is_short() -> None:
    _assert_short(repr(VerdictRule()), max_lines=1)
