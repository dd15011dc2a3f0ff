"""Shared fixtures: tiny random models with a character-level tokenizer.

The ``model`` fixture runs each test on a HookedTransformer with GPT-2 layout ("gpt2"), one
with Gemma layout ("gemma") and a TransformerBridge around a Hugging Face Gemma 3 ("bridge"),
so every feature is checked through both model APIs.
"""

from __future__ import annotations

import os

import pytest
from tiny import (  # noqa: F401  (re-exported)
    CHARS,
    HAS_HOOKED,
    char_tokenizer,
    tiny_bridge,
    tiny_model,
)

from rome_lens import RomeHyperParams
from rome_lens._typing import Model as HookedTransformer

# Tests fix torch's threads: results must not depend on what else the machine runs
# (rome_lens.threads; tests/unit/test_threads.py checks the adaptive policy itself).
os.environ.setdefault("ROME_LENS_THREADS", "torch")

# TransformerLens 4.x has no HookedTransformer: there the suite runs on the bridge only.
KINDS = ["gpt2", "gemma", "bridge"] if HAS_HOOKED else ["bridge"]


@pytest.fixture(params=KINDS)
def model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
          monkeypatch: pytest.MonkeyPatch) -> HookedTransformer:
    monkeypatch.setenv("ROME_LENS_CACHE", str(tmp_path_factory.mktemp("cache")))
    if request.param == "bridge":
        return tiny_bridge()
    return tiny_model(request.param)


@pytest.fixture
def hparams() -> RomeHyperParams:
    """Small settings so a tiny edit takes well under a second."""
    return RomeHyperParams(
        layer=1, v_num_grad_steps=8, n_contexts_short=2, context_len_short=3,
        n_contexts_long=2, context_len_long=5, stats_sequences=64, stats_seq_len=32,
        mom2_ridge=1e-3,
    )
