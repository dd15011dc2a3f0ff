"""The copy-free MLP forward gives the same activations and hooks as TransformerLens's own."""

from __future__ import annotations

import pytest
import torch

from rome_lens.models.speed import install_fast_mlp
from tests.tiny import HAS_HOOKED, tiny_model

pytestmark = pytest.mark.skipif(
    not HAS_HOOKED, reason="TransformerLens 4.x: no HookedTransformer to speed up"
)


def test_fast_mlp_matches_transformerlens_forward_and_hooks() -> None:
    model = tiny_model("gemma", seed=3)
    tokens = model.to_tokens("The Eiffel Tower is in Paris")
    names = ("blocks.1.mlp.hook_pre", "blocks.1.mlp.hook_post", "blocks.2.hook_mlp_out")
    with torch.no_grad():
        ref_logits, ref_cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
        assert install_fast_mlp(model) == model.cfg.n_layers
        assert install_fast_mlp(model) == model.cfg.n_layers  # idempotent
        logits, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    for name in names:
        torch.testing.assert_close(cache[name], ref_cache[name], rtol=1e-5, atol=1e-5)
    # Gradients still reach W_out through the new forward.
    model.blocks[1].mlp.W_out.grad = None
    model(tokens).sum().backward()
    assert model.blocks[1].mlp.W_out.grad is not None
    assert float(model.blocks[1].mlp.W_out.grad.abs().sum()) > 0


def test_fast_mlp_leaves_non_gated_models_alone() -> None:
    model = tiny_model("gpt2")
    assert install_fast_mlp(model) == 0
