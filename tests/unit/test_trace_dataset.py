"""trace_dataset: token classes, averaging and resumable output."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from rome_lens._typing import Model as HookedTransformer
from rome_lens.tracing import TOKEN_CLASSES, Fact, causal_trace, trace_dataset
from rome_lens.tracing.dataset import class_effects, token_class_of


def test_token_classes() -> None:
    # BOS, T, h, e, ' ', [b, i, g], ' ', s, a, t  (subject span 5..8, 12 tokens)
    classes = [token_class_of(p, (5, 8), 12) for p in range(12)]
    assert classes[:5] == ["before subject"] * 5
    assert classes[5:8] == ["first subject token", "middle subject tokens", "last subject token"]
    assert classes[8] == "first subsequent token"
    assert classes[9:11] == ["further tokens"] * 2
    assert classes[11] == "last token"
    # a one-token subject is "last subject token", not "first"
    assert token_class_of(3, (3, 4), 6) == "last subject token"


def test_class_effects_average_the_right_columns(model: HookedTransformer) -> None:
    trace = causal_trace(model, "The big cat sat", "big", samples=2, window=2)
    effects = class_effects(trace)
    ie = trace.indirect_effect("mlp")
    assert torch.allclose(torch.tensor(effects["mlp"]["last token"]), ie[:, -1])
    assert torch.allclose(torch.tensor(effects["mlp"]["middle subject tokens"]), ie[:, 6])
    assert set(effects["mlp"]) == set(TOKEN_CLASSES)


def test_trace_dataset_resumes(model: HookedTransformer, tmp_path: Path) -> None:
    facts = [Fact("The big cat sat", "big cat", "x", 0), Fact("A red dog ran", "red dog", "y", 1)]
    out = tmp_path / "traces.jsonl"
    kw = dict(samples=2, window=2, only_known=False, progress=False)
    first = trace_dataset(model, facts[:1], out=out, **kw)
    assert first.n_facts == 1
    assert len(out.read_text().splitlines()) == 1
    both = trace_dataset(model, facts, out=out, **kw)
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(lines) == 2  # the first fact was not traced again
    assert both.n_facts == 2
    expected = (lines[0]["p_clean"] + lines[1]["p_clean"]) / 2
    assert abs(both.p_clean - expected) < 1e-9
    layer, value = both.peak("mlp")
    assert 0 <= layer < model.cfg.n_layers
    assert value == float(both.effects["mlp"]["last subject token"].max())
    assert len(both.to_dataframe()) == 3 * 6 * model.cfg.n_layers
    text = repr(both)
    assert text.startswith("TraceSummary(n_facts=2, ") and "tensor" not in text
    assert f"layers={model.cfg.n_layers}" in text and "classes=6" in text
    fig = both.plot(str(tmp_path / "summary.png"))
    assert (tmp_path / "summary.png").stat().st_size > 1000
    rows = [label.get_text() for label in fig.axes[0].get_yticklabels()]
    assert rows == list(TOKEN_CLASSES)  # the paper's order, not the order of the records


def test_unknown_facts_are_skipped(model: HookedTransformer, tmp_path: Path) -> None:
    facts = [Fact("The big cat sat", "big cat", "zzz", 0), Fact("A red dog ran", "red dog", "q", 1)]
    out = tmp_path / "t.jsonl"
    try:
        trace_dataset(model, facts, out=out, samples=2, progress=False)
    except ValueError as exc:  # a random model knows none of them: nothing to summarise
        assert "no traced facts" in str(exc)
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert all(rec.get("skipped") == "not known" for rec in lines)
