"""Every bad input raises its named error and leaves the model's parameters untouched."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from _support import key_stats, one_thread

import rome_lens
from rome_lens import (
    EditRequest,
    InvalidRequestError,
    LayerOutOfRangeError,
    NonFiniteError,
    PromptTooLongError,
    RomeHyperParams,
    RomeLensError,
    SubjectNotFoundError,
)
from rome_lens.models import access

checksum = access.parameters_checksum
GOOD = EditRequest("{} lives in", "Alice Smith", "Paris", "Rome")


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    with one_thread():
        yield


def _raises_and_untouched(model, error: type[RomeLensError], fn, match: str | None = None):
    before = checksum(model)
    with pytest.raises(error, match=match) as info:
        fn()
    assert checksum(model) == before
    assert rome_lens.applied_edits(model) == []
    return info


def test_subject_missing(model, hparams) -> None:
    _raises_and_untouched(
        model, SubjectNotFoundError,
        lambda: rome_lens.compute_rome(
            model, EditRequest("Alice Smith lives in", "Bob", "Paris"), hparams=hparams),
        match="Bob",
    )


@pytest.mark.parametrize("target", ["", "   "], ids=["empty", "whitespace"])
def test_empty_or_whitespace_target(model, hparams, target: str) -> None:
    _raises_and_untouched(
        model, InvalidRequestError,
        lambda: rome_lens.compute_rome(model, EditRequest("{} lives in", "Alice", target),
                                       hparams=hparams),
    )


def test_target_new_equals_target_true(model, hparams) -> None:
    _raises_and_untouched(
        model, InvalidRequestError,
        lambda: rome_lens.compute_rome(
            model, EditRequest("{} lives in", "Alice", "Paris", "Paris"), hparams=hparams),
        match="equals target_true",
    )


def test_request_of_wrong_type(model, hparams) -> None:
    _raises_and_untouched(
        model, InvalidRequestError,
        lambda: rome_lens.compute_rome(model, GOOD.to_dict(), hparams=hparams),  # type: ignore
    )


@pytest.mark.parametrize("layer", [99, -99, 3, -4])
def test_layer_out_of_range(model, hparams, layer: int) -> None:
    _raises_and_untouched(
        model, LayerOutOfRangeError,
        lambda: rome_lens.compute_rome(model, GOOD, layer=layer, hparams=hparams),
        match=str(layer),
    )


def test_layer_out_of_range_via_hparams(model, hparams) -> None:
    bad = dataclasses.replace(hparams, layer=99)
    _raises_and_untouched(
        model, LayerOutOfRangeError, lambda: rome_lens.compute_rome(model, GOOD, hparams=bad)
    )


def test_layer_of_wrong_type(model, hparams) -> None:
    for layer in (True, 1.0):
        _raises_and_untouched(
            model, LayerOutOfRangeError,
            lambda layer=layer: rome_lens.compute_rome(model, GOOD, layer=layer, hparams=hparams),
        )


def test_prompt_longer_than_context(model, hparams) -> None:
    prompt = "{} lives in " + "a" * (model.cfg.n_ctx + 2)
    _raises_and_untouched(
        model, PromptTooLongError,
        lambda: rome_lens.compute_rome(model, EditRequest(prompt, "Alice", "Paris"),
                                       hparams=hparams, stats=key_stats(model, 1, hparams)),
        match=str(model.cfg.n_ctx),
    )


def test_prompt_plus_target_longer_than_context(model, hparams) -> None:
    # the prompt alone fits (1 BOS + 124 characters = 125 tokens), but prompt + " Paris"
    # (minus the last target token) is 130 tokens
    prompt = "Alice " + "b" * 118
    assert len(prompt) + 1 <= model.cfg.n_ctx < len(prompt) + 1 + len(" Paris") - 1
    _raises_and_untouched(
        model, PromptTooLongError,
        lambda: rome_lens.compute_rome(model, EditRequest(prompt, "Alice", "Paris"),
                                       hparams=hparams, stats=key_stats(model, 1, hparams)),
    )


def test_kl_prompt_longer_than_context(model, hparams) -> None:
    # "{subject} x" plus " X" fits (127 tokens), "{subject} is a" does not (129 tokens)
    subject = "S" * 123
    no_ctx = dataclasses.replace(hparams, n_contexts_short=0, n_contexts_long=0)
    _raises_and_untouched(
        model, PromptTooLongError,
        lambda: rome_lens.compute_rome(model, EditRequest("{} x", subject, "X"),
                                       hparams=no_ctx, stats=key_stats(model, 1, hparams)),
        match="129 tokens",
    )


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_stats_not_finite(model, hparams, bad: float) -> None:
    stats = key_stats(model, 1, hparams)
    stats[3, 7] = bad
    _raises_and_untouched(
        model, NonFiniteError,
        lambda: rome_lens.compute_rome(model, GOOD, hparams=hparams, stats=stats),
    )


@pytest.mark.parametrize("shape", [(32, 32), (64, 63), (64,), (2, 64, 64)])
def test_stats_wrong_shape(model, hparams, shape: tuple[int, ...]) -> None:
    stats = torch.ones(shape)
    _raises_and_untouched(
        model, InvalidRequestError,
        lambda: rome_lens.compute_rome(model, GOOD, hparams=hparams, stats=stats),
        match="stats must be",
    )


@pytest.mark.parametrize("kind", ["zero", "negative"])
def test_degenerate_stats(model, hparams, kind: str) -> None:
    """A second moment that cannot be whitened by (singular, or negative definite) is bad input:
    NonFiniteError, as rank_one_factors documents, never a raw torch error."""
    d_mlp = model.cfg.d_mlp
    stats = torch.zeros(d_mlp, d_mlp) if kind == "zero" else -torch.eye(d_mlp)
    no_ridge = dataclasses.replace(hparams, mom2_ridge=0.0)
    _raises_and_untouched(
        model, NonFiniteError,
        lambda: rome_lens.compute_rome(model, GOOD, hparams=no_ridge, stats=stats),
    )


def _with_nan_in_w_out(model, layer: int, fn, error=NonFiniteError, match=None) -> None:
    """Set one NaN into W_out of ``layer``, expect ``error`` from ``fn``, then restore."""
    weight = access.mlp_out_weight(model, layer)
    saved = weight.detach().clone()
    clean_sum = checksum(model)
    try:
        with torch.no_grad():
            weight[2, 3] = float("nan")
        _raises_and_untouched(model, error, fn, match=match)
    finally:
        with torch.no_grad():
            weight.copy_(saved)
    assert checksum(model) == clean_sum


def test_nan_in_w_out_makes_loss_non_finite(model, hparams) -> None:
    """W_out of the edit layer holds a NaN: v(k*) and so the value loss are NaN."""
    stats = key_stats(model, 1, hparams)
    _with_nan_in_w_out(
        model, 1, lambda: rome_lens.compute_rome(model, GOOD, hparams=hparams, stats=stats),
    )


def test_nan_in_w_out_without_context_prefixes(model, hparams) -> None:
    stats = key_stats(model, 1, hparams)
    no_ctx = dataclasses.replace(hparams, n_contexts_short=0, n_contexts_long=0)
    _with_nan_in_w_out(
        model, 1, lambda: rome_lens.compute_rome(model, GOOD, hparams=no_ctx, stats=stats),
        match="loss is not finite",
    )


def test_nan_below_edit_layer_makes_key_non_finite(model, hparams) -> None:
    stats = key_stats(model, 1, hparams)
    no_ctx = dataclasses.replace(hparams, n_contexts_short=0, n_contexts_long=0)
    _with_nan_in_w_out(
        model, 0, lambda: rome_lens.compute_rome(model, GOOD, hparams=no_ctx, stats=stats),
        match="key",
    )


@pytest.mark.parametrize(
    "kwargs",
    [{"v_lr": 0.0}, {"v_num_grad_steps": -1}, {"clamp_norm_factor": 0.0}, {"kl_factor": -1.0},
     {"kl_prompt": "is a"}, {"stats_sequences": 0}, {"stats_seq_len": 1}, {"mom2_ridge": -1.0}],
)
def test_bad_hparams(kwargs: dict) -> None:
    with pytest.raises(InvalidRequestError):
        RomeHyperParams(**kwargs)
