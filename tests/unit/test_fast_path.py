"""The optimised value loop must give the same edit as the naive baseline."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import rome_lens
from rome_lens._typing import Model as HookedTransformer
from rome_lens.models import access


@pytest.mark.parametrize("loop", ["prefix_cache", "residual"])
def test_fast_and_naive_value_loops_agree(
    model: HookedTransformer, hparams: rome_lens.RomeHyperParams, loop: str
) -> None:
    # Multi-token target (teacher forcing) and subjects at different depths in each context.
    request = rome_lens.EditRequest("{} is in the city of", "The big cat", "Rome Italy")
    stats = rome_lens.second_moment(model, 1, hparams=hparams)
    fast = rome_lens.compute_rome(model, request, hparams=hparams, stats=stats, loop=loop)
    naive = rome_lens.compute_rome(model, request, hparams=hparams, stats=stats, loop="naive")
    # The bridge has no TransformerLens key-value cache: prefix_cache runs as residual there.
    expected = "residual" if access.is_bridge(model) else loop
    assert fast.info["loop"] == expected and naive.info["loop"] == "naive"
    assert len(fast.info["losses"]) == len(naive.info["losses"])
    assert torch.allclose(
        torch.tensor(fast.info["losses"]), torch.tensor(naive.info["losses"]), rtol=1e-4
    )
    assert torch.allclose(fast.right, naive.right, atol=1e-4 * naive.right.norm())
    assert torch.allclose(fast.k_star, naive.k_star)


def test_unknown_loop_is_refused(
    model: HookedTransformer, hparams: rome_lens.RomeHyperParams
) -> None:
    request = rome_lens.EditRequest("{} is in the city of", "The big cat", "Rome")
    with pytest.raises(rome_lens.InvalidRequestError, match="loop"):
        rome_lens.compute_rome(model, request, hparams=hparams, loop="fastest")  # type: ignore[arg-type]


def test_optimisation_reduces_loss_and_respects_clamp(
    model: HookedTransformer, hparams: rome_lens.RomeHyperParams
) -> None:
    # A random model's MLP outputs are tiny: allow a large delta so the NLL can move.
    hparams = dataclasses.replace(
        hparams, clamp_norm_factor=100.0, v_num_grad_steps=15, v_weight_decay=0.0
    )
    request = rome_lens.EditRequest("{} is in the city of", "The big cat", "Rome")
    edit = rome_lens.compute_rome(model, request, hparams=hparams)
    losses = edit.info["losses"]
    assert min(losses) < losses[0] - 1e-3
    v_orig = access.mlp_value(model, edit.layer, edit.k_star)
    assert edit.right.norm() <= hparams.clamp_norm_factor * v_orig.norm() * (1 + 1e-5)
