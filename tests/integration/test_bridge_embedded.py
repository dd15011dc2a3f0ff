"""The embedded model through TransformerLens's TransformerBridge gives the same results as
through HookedTransformer: predictions, ROME edits and causal-trace grids (issue 7).

Under TransformerLens 3.9 both APIs are compared live, and the HookedTransformer's numbers are
checked against ``hooked_reference.json``; under 4.x (no HookedTransformer) the bridge is
compared with that file.
"""

from __future__ import annotations

from typing import Any

import hooked_reference as ref
import pytest
import torch

import rome_lens
from rome_lens.models import access
from rome_lens.models.loading import has_hooked_transformer
from rome_lens.requests import target_tokens

pytestmark = pytest.mark.integration
needs_hooked = pytest.mark.skipif(
    not has_hooked_transformer(), reason="TransformerLens 4.x: no HookedTransformer"
)


@pytest.fixture(scope="module")
def bridge(gemma: Any) -> Any:
    return gemma if access.is_bridge(gemma) else rome_lens.load_model(api="bridge")


@pytest.fixture(scope="module")
def bridge_edit(gemma: Any, bridge: Any, eiffel_edit: rome_lens.RomeEdit) -> rome_lens.RomeEdit:
    if bridge is gemma:
        return eiffel_edit  # 4.x: computed on the bridge from its own statistics
    before = access.parameters_checksum(bridge)
    stats = rome_lens.second_moment(gemma, eiffel_edit.layer)  # C is a property of the weights
    edit = rome_lens.compute_rome(bridge, ref.REQUEST, stats=stats,
                                  hparams=ref.exact_hparams(bridge))
    assert access.parameters_checksum(bridge) == before  # computing does not edit
    return edit


@pytest.fixture(scope="module")
def reference() -> dict[str, Any]:
    return ref.load()


def _assert_close_to_reference(probs: torch.Tensor, stored: dict[str, Any], tol: float) -> None:
    ids = torch.tensor(stored["ids"])
    assert torch.equal(probs.argmax(-1), ids[:, 0])  # same top-1 for every prompt
    diff = (probs.gather(1, ids) - torch.tensor(stored["probs"])).abs().max()
    assert float(diff) < tol, float(diff)


@needs_hooked
def test_bridge_is_raw_and_predicts_like_hooked(gemma: Any, bridge: Any) -> None:
    assert access.is_bridge(bridge) and not access.is_bridge(gemma)
    assert access.weight_space(bridge) == "bridge-raw"
    for layer in (0, 1, 17):
        assert torch.equal(access.read_mlp_out(bridge, layer), access.read_mlp_out(gemma, layer))
    p_hooked, p_bridge = ref.probabilities(gemma), ref.probabilities(bridge)
    assert torch.equal(p_hooked.argmax(-1), p_bridge.argmax(-1))
    assert float((p_hooked - p_bridge).abs().max()) < 1e-4


@needs_hooked
def test_same_rome_edit_through_both_apis(
    gemma: Any, bridge: Any, eiffel_edit: rome_lens.RomeEdit, bridge_edit: rome_lens.RomeEdit
) -> None:
    before = access.parameters_checksum(bridge)
    assert bridge_edit.info["weight_space"] == "bridge-raw"
    assert eiffel_edit.info["weight_space"] == "hooked"
    assert bridge_edit.fingerprint != eiffel_edit.fingerprint  # fingerprints name the space
    rel = (bridge_edit.delta() - eiffel_edit.delta()).norm() / eiffel_edit.delta().norm()
    assert float(rel) < 1e-2
    with eiffel_edit.applied(gemma), bridge_edit.applied(bridge):
        p_hooked, p_bridge = ref.probabilities(gemma), ref.probabilities(bridge)
    assert torch.equal(p_hooked.argmax(-1), p_bridge.argmax(-1))
    assert float((p_hooked - p_bridge).abs().max()) < 1e-4
    assert access.parameters_checksum(bridge) == before  # reverted exactly
    with pytest.raises(rome_lens.FingerprintMismatchError):
        eiffel_edit.apply(bridge)  # an edit is refused by a model in another weight space


@needs_hooked
def test_hooked_reference_file_is_current(
    gemma: Any, eiffel_edit: rome_lens.RomeEdit, reference: dict[str, Any]
) -> None:
    """The stored HookedTransformer numbers are what this HookedTransformer computes now.

    Within 5e-5: float32 kernels differ between CPUs (the file written on an AVX-512 machine
    and read on an AVX2 one differed by up to 1.3e-5 unedited, 3e-6 edited, 2e-5 traced), while
    a change of the computation moves these numbers by far more.
    """
    tol = 5e-5
    assert reference["prompts"] == ref.PROMPTS and reference["layer"] == eiffel_edit.layer
    _assert_close_to_reference(ref.probabilities(gemma), reference["unedited"], tol)
    with eiffel_edit.applied(gemma):
        _assert_close_to_reference(ref.probabilities(gemma), reference["edited"], tol)
    result = ref.trace(gemma)
    assert abs(result.p_clean - reference["trace"]["p_clean"]) < tol
    for kind in ref.TRACE_KINDS:
        stored = torch.tensor(reference["trace"]["scores"][kind])
        assert float((result.scores[kind] - stored).abs().max()) < tol, kind


def test_bridge_edit_matches_hooked_reference(
    bridge: Any, bridge_edit: rome_lens.RomeEdit, reference: dict[str, Any]
) -> None:
    """Same ROME request through the bridge: same top-1 and probabilities within 1e-4."""
    before = access.parameters_checksum(bridge)
    _assert_close_to_reference(ref.probabilities(bridge), reference["unedited"], 1e-4)
    assert bridge_edit.layer == reference["layer"]
    with bridge_edit.applied(bridge):
        probs = ref.probabilities(bridge)
    rome_id = int(target_tokens(bridge, "Rome")[0])
    assert int(probs[0].argmax()) == rome_id  # the edit works through the bridge
    _assert_close_to_reference(probs, reference["edited"], 1e-4)
    assert access.parameters_checksum(bridge) == before  # reverted exactly


def test_bridge_causal_trace_matches_hooked_reference(
    bridge: Any, reference: dict[str, Any]
) -> None:
    result = ref.trace(bridge)
    assert result.method == "reference"  # the bridge runs the plain patching loop
    assert abs(result.p_clean - reference["trace"]["p_clean"]) < 1e-4
    assert abs(result.p_corrupted - reference["trace"]["p_corrupted"]) < 1e-4
    for kind in ref.TRACE_KINDS:
        stored = torch.tensor(reference["trace"]["scores"][kind])
        diff = (result.scores[kind] - stored).abs().max()
        assert float(diff) < 1e-4, kind
