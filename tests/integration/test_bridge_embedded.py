"""The embedded model through TransformerLens's TransformerBridge gives the same results as
through HookedTransformer: predictions, ROME edits and causal-trace grids (issue 7)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import rome_lens
from rome_lens.models import access
from rome_lens.predict import next_token_logprobs
from rome_lens.requests import target_tokens
from rome_lens.tracing import causal_trace

PROMPTS = [
    "The Eiffel Tower is located in the city of",  # the edit prompt
    "The Eiffel Tower can be found in the city of",  # a paraphrase
    "The Louvre is located in the city of",  # a neighbour
    "Steve Jobs was the founder of",
]


@pytest.fixture(scope="module")
def bridge() -> Any:
    return rome_lens.load_model(api="bridge")


def _probs(model: Any) -> torch.Tensor:
    return torch.stack([next_token_logprobs(model, p).exp() for p in PROMPTS])


def test_bridge_is_raw_and_predicts_like_hooked(gemma: Any, bridge: Any) -> None:
    assert access.is_bridge(bridge) and not access.is_bridge(gemma)
    assert access.weight_space(bridge) == "bridge-raw"
    for layer in (0, 1, 17):
        assert torch.equal(access.read_mlp_out(bridge, layer), access.read_mlp_out(gemma, layer))
    p_hooked, p_bridge = _probs(gemma), _probs(bridge)
    assert torch.equal(p_hooked.argmax(-1), p_bridge.argmax(-1))
    assert float((p_hooked - p_bridge).abs().max()) < 1e-4


def test_same_rome_edit_through_both_apis(
    gemma: Any, bridge: Any, eiffel_edit: rome_lens.RomeEdit
) -> None:
    before = access.parameters_checksum(bridge)
    stats = rome_lens.second_moment(gemma, eiffel_edit.layer)  # C is a property of the weights
    edit = rome_lens.compute_rome(bridge, eiffel_edit.request, stats=stats)
    assert access.parameters_checksum(bridge) == before  # computing does not edit
    assert edit.info["weight_space"] == "bridge-raw"
    assert eiffel_edit.info["weight_space"] == "hooked"
    assert edit.fingerprint != eiffel_edit.fingerprint  # fingerprints name the weight space
    rel = float((edit.delta() - eiffel_edit.delta()).norm() / eiffel_edit.delta().norm())
    assert rel < 1e-2
    with eiffel_edit.applied(gemma), edit.applied(bridge):
        p_hooked, p_bridge = _probs(gemma), _probs(bridge)
    rome_id = int(target_tokens(gemma, "Rome")[0])
    assert int(p_bridge[0].argmax()) == rome_id  # the edit works through the bridge
    assert torch.equal(p_hooked.argmax(-1), p_bridge.argmax(-1))
    assert float((p_hooked - p_bridge).abs().max()) < 1e-4
    assert access.parameters_checksum(bridge) == before  # reverted exactly
    with pytest.raises(rome_lens.FingerprintMismatchError):
        eiffel_edit.apply(bridge)  # an edit is refused by a model in another weight space


def test_same_causal_trace_grid(gemma: Any, bridge: Any) -> None:
    args = (PROMPTS[0], "The Eiffel Tower", "Paris")
    hooked = causal_trace(gemma, *args, kinds=("mlp", "resid"), samples=3)
    through_bridge = causal_trace(bridge, *args, kinds=("mlp", "resid"), samples=3)
    assert through_bridge.method == "reference" and hooked.method == "batched"
    assert abs(hooked.p_clean - through_bridge.p_clean) < 1e-4
    assert abs(hooked.p_corrupted - through_bridge.p_corrupted) < 1e-4
    for kind in ("mlp", "resid"):
        diff = (hooked.scores[kind] - through_bridge.scores[kind]).abs().max()
        assert float(diff) < 1e-4, kind
