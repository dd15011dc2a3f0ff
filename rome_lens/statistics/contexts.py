"""Context prefixes for ROME's key and value computation.

ROME averages the subject's key over the prompt preceded by short texts the model itself writes
(reference: 10 of 5 tokens and 10 of 10 tokens, top-5 sampling from BOS), so that the edit fires
for the subject in any context, not just at the start of a sentence. The prefixes are seeded and
cached on disk per BASE-model fingerprint and always written by the unedited weights (via the edit
registry), so every edit of a model uses the same ones, whatever edits are applied.
"""

from __future__ import annotations

import json
import logging
from typing import Protocol

from rome_lens._cache import cache_dir, write_json
from rome_lens._typing import Model
from rome_lens.edits import base_fingerprint, base_weights
from rome_lens.sampling import sample_tokens

logger = logging.getLogger(__name__)


class ContextSpec(Protocol):
    """Numbers, lengths, top-k and seed of the context prefixes (ROME's hyperparameters)."""

    @property
    def n_contexts_short(self) -> int: ...  # noqa: D102

    @property
    def context_len_short(self) -> int: ...  # noqa: D102

    @property
    def n_contexts_long(self) -> int: ...  # noqa: D102

    @property
    def context_len_long(self) -> int: ...  # noqa: D102

    @property
    def context_top_k(self) -> int: ...  # noqa: D102

    @property
    def seed(self) -> int: ...  # noqa: D102


def context_templates(model: Model, hparams: ContextSpec) -> list[str]:
    """``["{}", "<ctx 1>. {}", ...]``: the bare prompt slot and the context-prefixed ones.

    Args:
        model: the model that writes the contexts.
        hparams: numbers, lengths, top-k and seed of the contexts.

    Returns:
        Templates with one ``{}`` slot each, the bare ``"{}"`` first.
    """
    spec = (
        f"{hparams.n_contexts_short}x{hparams.context_len_short}+"
        f"{hparams.n_contexts_long}x{hparams.context_len_long}-k{hparams.context_top_k}"
        f"-s{hparams.seed}"
    )
    path = cache_dir("contexts") / f"{base_fingerprint(model)}-{spec}.json"
    if path.exists():
        return list(json.loads(path.read_text()))
    with base_weights(model):
        templates = _sample_templates(model, hparams)
    write_json(path, templates)
    logger.info("cached %d context templates at %s", len(templates), path)
    return templates


def _sample_templates(model: Model, hparams: ContextSpec) -> list[str]:
    assert model.tokenizer is not None
    templates = ["{}"]
    for i, (n, length) in enumerate(
        [
            (hparams.n_contexts_short, hparams.context_len_short),
            (hparams.n_contexts_long, hparams.context_len_long),
        ]
    ):
        if n <= 0:
            continue
        tokens = sample_tokens(
            model, n, length, top_k=hparams.context_top_k, seed=hparams.seed + i, batch_size=n
        )
        for row in tokens:
            text = str(model.tokenizer.decode(row, skip_special_tokens=True))
            text = text.replace("{", " ").replace("}", " ")
            templates.append(f"{text}. {{}}")
    return templates
