"""The health monitor: norms, weight growth, fluency, disabling edits flagged with a reason."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from _planted import collapse_edit, random_edit
from _support import key_stats, model_kind, one_thread, tiny_model

import rome_lens
from rome_lens import EditRequest, FingerprintMismatchError, InvalidRequestError
from rome_lens.audit import EditHealth, HealthMonitor, generation_entropy, site_health
from rome_lens.audit.health import DEFAULT_PROMPTS, held_out_text, held_out_tokens, perplexity
from rome_lens.models import access
from rome_lens.sampling import sample_tokens

REQUESTS = [
    EditRequest("{} lives in", "Alice Smith", "Paris", "Rome"),
    EditRequest("{} works in", "Bob Jones", "London", "Rome"),
    EditRequest("{} plays", "Carol King", "chess", "golf"),
    EditRequest("{} speaks", "Dave Brown", "Dutch", "French"),
    EditRequest("{} likes", "Erin Gray", "tea", "coffee"),
]


def cheap_monitor(**settings) -> HealthMonitor:
    """A monitor with a shorter fluency check (two prompts, 16 tokens), for tests of norms."""
    return HealthMonitor(prompts=DEFAULT_PROMPTS[:2], n_tokens=16, **settings)


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    with one_thread():
        yield


def test_a_planted_disabling_edit_is_flagged_with_the_reason(model, caplog) -> None:
    monitor = cheap_monitor()
    scales = [0.02, 0.03, 0.025, 1.25, 0.02]  # the fourth is 50x the others
    records = []
    with caplog.at_level(logging.WARNING, logger="rome_lens.audit.health"):
        for i, scale in enumerate(scales):
            edit = random_edit(model, layer=i % 3, scale=scale, seed=i).apply(model)
            records.append(monitor.check(model, edit))
    assert [r.flagged for r in records] == [False, False, False, True, False]
    planted = records[3]
    assert len(planted.reasons) == 2, planted.reasons  # 50x the median, and larger than ||W||
    assert "median of the 3 earlier updates" in planted.reasons[0]
    assert planted.reasons[1].startswith("update norm 1.25 of ||W|| > 1.0")
    assert "FLAGGED" in repr(planted) and monitor.flagged == [planted]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and planted.edit_id in warnings[0].getMessage()
    assert records[0].relative_update == pytest.approx(0.02, rel=1e-4)
    rome_lens.revert_all(model)


def test_a_normal_rome_and_ft_l_sequence_is_not_flagged(model, hparams) -> None:
    monitor = HealthMonitor()
    stats = key_stats(model, 1, hparams)
    for i, request in enumerate(REQUESTS):
        if i % 2:
            edit = rome_lens.compute_edit(model, request, method="ft-l", layer=1)
        else:
            edit = rome_lens.compute_edit(model, request, hparams=hparams, stats=stats)
        monitor.check(model, edit.apply(model))
    assert len(monitor.history) == 5 and not monitor.flagged, monitor.history
    record = monitor.history[-1]
    assert record.fluency.entropy > 0.5 * record.baseline.entropy
    assert record.growth > 1.0  # both edited layers moved away from the base weights
    rome_lens.revert_all(model)


def test_generation_collapse_is_flagged_for_fluency(model) -> None:
    edit, token = collapse_edit(model)
    monitor = HealthMonitor(max_relative_update=None)  # judge fluency alone
    with edit.applied(model):
        record = monitor.check(model, edit)
        # independent of the monitor: the edited model mostly repeats the token
        ids = torch.cat([sample_tokens(model, 1, 30, top_k=5, seed=i, prompt=p)[0]
                         for i, p in enumerate(DEFAULT_PROMPTS)])
        target = int(model.to_tokens(token, prepend_bos=False)[0, 0])
        assert (ids == target).float().mean() > 0.6
    assert record.flagged, record
    assert any(r.startswith("generation collapsing to repetition") for r in record.reasons)
    assert record.fluency.entropy < 0.5 * record.baseline.entropy
    assert not any("update norm" in r for r in record.reasons)


def test_site_norms_are_measured_against_the_weight_before_and_the_base(model) -> None:
    first = random_edit(model, layer=1, scale=0.1, seed=0).apply(model)
    second = random_edit(model, layer=1, scale=0.05, seed=1).apply(model)
    (site,) = site_health(model, second)
    base = access.read_mlp_out(tiny_model(model_kind(model)), 1).float()
    before = base + first.delta()
    now = before + second.delta()
    assert site.name == "blocks.1.mlp.W_out"
    assert site.base_norm == pytest.approx(float(base.norm()), rel=1e-6)
    assert site.weight_norm == pytest.approx(float(before.norm()), rel=1e-5)
    assert site.edited_norm == pytest.approx(float(now.norm()), rel=1e-6)
    assert site.relative_update == pytest.approx(float(second.delta().norm() / before.norm()),
                                                 rel=1e-5)
    assert site.growth == pytest.approx(float(now.norm() / base.norm()), rel=1e-5)
    rome_lens.revert_all(model)


def test_the_baseline_is_the_unedited_model_and_belongs_to_one_model(model) -> None:
    fresh = cheap_monitor().measure(model)
    edit = random_edit(model, layer=2, scale=0.3, seed=3).apply(model)
    checksum = access.parameters_checksum(model)
    monitor = cheap_monitor()
    record = monitor.check(model, edit)
    assert record.baseline == fresh == monitor.baseline  # measured under base_weights
    assert access.parameters_checksum(model) == checksum  # edits restored exactly
    again = cheap_monitor().check(model, edit)
    assert again.fluency == record.fluency  # seeded: the same model state, the same numbers
    other = tiny_model(model_kind(model), seed=1)
    with pytest.raises(FingerprintMismatchError, match="use a new monitor"):
        monitor.check(other, random_edit(other, layer=0, scale=0.01, seed=0))
    rome_lens.revert_all(model)


def test_an_edit_that_is_not_applied_is_applied_for_the_check_only(model) -> None:
    checksum = access.parameters_checksum(model)
    edit = random_edit(model, layer=0, scale=0.01, seed=0)
    record = HealthMonitor(fluency=False).check(model, edit)
    assert not edit.is_applied(model) and access.parameters_checksum(model) == checksum
    assert record.fluency.entropy is None and record.relative_update == pytest.approx(0.01, 1e-4)


def test_records_round_trip_and_render_briefly(model) -> None:
    monitor = cheap_monitor()
    for i in range(3):
        monitor.check(model, random_edit(model, layer=i, scale=0.01 * (i + 1), seed=i)
                      .apply(model))
    record = monitor.history[2]
    assert EditHealth.from_dict(record.to_dict()) == record
    text = repr(record)
    assert text.startswith(f"EditHealth(#2 {record.edit_id[:8]}: update 0.03 of ||W||")
    assert "entropy" in text and "perplexity" in text and len(text) < 160
    assert repr(monitor) == "HealthMonitor(3 edits checked, 0 flagged)"
    frame = monitor.to_dataframe()
    assert list(frame["step"]) == [0, 1, 2] and not frame["flagged"].any()
    monitor.forget(record.edit_id)
    assert len(monitor.history) == 2
    assert HealthMonitor(**monitor.settings()).settings() == monitor.settings()
    rome_lens.revert_all(model)


def test_fluency_helpers(model) -> None:
    assert "market" in held_out_text()
    tokens = held_out_tokens(model)
    assert tokens.shape[0] == min(256, model.cfg.n_ctx)  # the paragraph is cut to fit
    ppl = perplexity(model, tokens)
    assert 1.0 < ppl < math.inf
    assert perplexity(model, tokens, chunk=7) == pytest.approx(ppl, rel=1e-5)
    first = generation_entropy(model, n_tokens=12, seed=3)
    assert first == generation_entropy(model, n_tokens=12, seed=3) and first > 0
    with pytest.raises(InvalidRequestError, match="at least 2 tokens"):
        held_out_tokens(model, "", max_tokens=256)


@pytest.mark.parametrize("settings", [
    {"norm_factor": 1.0}, {"min_history": 0}, {"entropy_fraction": 1.5},
    {"perplexity_factor": 0.5}, {"n_tokens": 1}, {"prompts": ()},
])
def test_bad_thresholds_are_refused(settings) -> None:
    with pytest.raises(InvalidRequestError, match="HealthMonitor needs"):
        HealthMonitor(**settings)
