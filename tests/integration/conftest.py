"""The embedded gemma-3-270m, loaded once per test session (converted and cached on first use).

Integration tests use the normal cache (``$ROME_LENS_CACHE`` or ``~/.cache/rome_lens``) so the
one-time conversion and key statistics are reused across runs on the same machine.
"""

from __future__ import annotations

import pytest
from hooked_reference import exact_hparams

import rome_lens
from rome_lens._typing import Model as HookedTransformer


@pytest.fixture(scope="session")
def gemma() -> HookedTransformer:
    """The embedded model: a HookedTransformer on TransformerLens 3.9, a bridge on 4.x."""
    return rome_lens.load_model()


@pytest.fixture(scope="session")
def eiffel_edit(gemma: HookedTransformer) -> rome_lens.RomeEdit:
    request = rome_lens.EditRequest(
        "{} is located in the city of", "The Eiffel Tower", "Rome", "Paris"
    )
    # float32: the bridge/hooked comparisons check the exact computation (hooked_reference.py)
    return rome_lens.compute_rome(gemma, request, hparams=exact_hparams(gemma))
