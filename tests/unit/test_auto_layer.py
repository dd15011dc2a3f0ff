"""compute_rome(layer="auto") takes the layer of the strongest MLP effect from a causal trace."""

from __future__ import annotations

import torch

import rome_lens
from rome_lens._typing import Model as HookedTransformer
from rome_lens.tracing import causal_trace


def test_auto_layer_follows_the_mlp_trace(
    model: HookedTransformer, hparams: rome_lens.RomeHyperParams
) -> None:
    request = rome_lens.EditRequest("{} sat on the mat", "The big cat", "dog")
    edit = rome_lens.compute_rome(model, request, layer="auto", hparams=hparams)
    trace = causal_trace(model, request.text, request.subject, kinds=("mlp",))
    ie = trace.indirect_effect("mlp")[:, trace.last_subject_token]
    assert edit.layer == int(ie.argmax())
    assert edit.info["auto_layer"]["layer"] == edit.layer
    assert torch.allclose(torch.tensor(edit.info["auto_layer"]["mlp_indirect_effect"]), ie)


def test_other_strings_are_not_layers(
    model: HookedTransformer, hparams: rome_lens.RomeHyperParams
) -> None:
    request = rome_lens.EditRequest("{} sat on the mat", "The big cat", "dog")
    try:
        rome_lens.compute_rome(model, request, layer="middle", hparams=hparams)  # type: ignore[arg-type]
    except rome_lens.LayerOutOfRangeError as exc:
        assert "int" in str(exc)
    else:
        raise AssertionError("a string layer other than 'auto' must be refused")
