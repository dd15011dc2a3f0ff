"""Helpers shared by the unit tests: cached key statistics and cached edits.

Edits are cached per (weights fingerprint, request, layer, hyperparameters), so each distinct
edit is computed once per test session even though the ``model`` fixture builds a fresh model
for every test (the tiny models are deterministic, so a fresh model has the same fingerprint).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from tiny import CHARS, tiny_model  # tests/ is on sys.path (rootdir conftest)

import rome_lens
from rome_lens import EditRequest, RomeEdit, RomeHyperParams
from rome_lens._typing import Model as HookedTransformer
from rome_lens.models import access

__all__ = [
    "CHARS",
    "STATS_CORPUS",
    "cached_edit",
    "key_stats",
    "model_kind",
    "one_thread",
    "tiny_model",
]

# Several short texts (only characters of the test tokenizer) so C is well conditioned.
STATS_CORPUS = [
    "The quick brown fox jumps over the lazy dog. ",
    "Pack my box with five dozen liquor jugs! ",
    "How vexingly quick daft zebras jump; 0123456789 ",
    "Sphinx of black quartz, judge my vow? (yes) {no} ",
    "Jackdaws love my big sphinx of quartz - said Alice Smith. ",
    "Bob Jones lives in Paris, Carol lives in Rome: Dave likes tea. ",
] * 6

_STATS: dict[tuple[str, int, RomeHyperParams], torch.Tensor] = {}
_EDITS: dict[tuple[str, EditRequest, int, RomeHyperParams], RomeEdit] = {}


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one thread: the models are tiny, and oversubscribed threads are 100x slower
    on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def model_kind(model: HookedTransformer) -> str:
    """'gpt2', 'gemma' or 'bridge', the kind of a conftest tiny model."""
    if access.is_bridge(model):
        return "bridge"
    return "gpt2" if model.cfg.normalization_type == "LN" else "gemma"


def key_stats(model: HookedTransformer, layer: int, hparams: RomeHyperParams) -> torch.Tensor:
    """Key second moment of ``layer`` over :data:`STATS_CORPUS` (computed once per weights)."""
    key = (access.weights_fingerprint(model), layer, hparams)
    if key not in _STATS:
        _STATS[key] = rome_lens.second_moment(model, layer, corpus=STATS_CORPUS, hparams=hparams)
    return _STATS[key].clone()


def cached_edit(
    model: HookedTransformer, request: EditRequest, layer: int, hparams: RomeHyperParams
) -> RomeEdit:
    """``compute_rome(model, request, layer, hparams, stats=...)``, computed once per weights.

    The model must be unedited (the cache key is the fingerprint of its current weights).
    """
    assert not rome_lens.applied_edits(model), "cached_edit needs an unedited model"
    key = (access.weights_fingerprint(model), request, layer, hparams)
    if key not in _EDITS:
        _EDITS[key] = rome_lens.compute_rome(
            model, request, layer=layer, hparams=hparams, stats=key_stats(model, layer, hparams)
        )
    return _EDITS[key]
