from __future__ import annotations

import pytest
import torch
from _support import cached_edit, key_stats, model_kind, one_thread, tiny_model

import rome_lens
from rome_lens import EditRequest, EditStateError, FingerprintMismatchError
from rome_lens.edits import base_fingerprint
from rome_lens.models import access

checksum = access.parameters_checksum

# Three subjects edited at the same layer (1), and two more at layers 0 and 2.
SAME_LAYER = [
    EditRequest("{} lives in", "Alice Smith", "Paris", "Rome"),
    EditRequest("{} works as a", "Bob Jones", "pilot", "baker"),
    EditRequest("The favourite food of {} is", "Carol", "soup", "rice"),
]
OTHER_LAYERS = [
    (0, EditRequest("{} plays", "Dave", "tennis", "chess")),
    (2, EditRequest("{} was born in", "Eve Adams", "Oslo", "Lima")),
]


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    with one_thread():
        yield


def w_out(model, layer: int = 1) -> torch.Tensor:
    return access.mlp_out_weight(model, layer).detach().clone()


def same_layer_edits(model, hparams) -> list[rome_lens.RomeEdit]:
    return [cached_edit(model, r, 1, hparams) for r in SAME_LAYER]


def other_layer_edits(model, hparams) -> list[rome_lens.RomeEdit]:
    return [cached_edit(model, r, layer, hparams) for layer, r in OTHER_LAYERS]


def fresh_copy(model):
    """A new instance of the same tiny model (same seed, so bit-identical weights)."""
    return tiny_model(model_kind(model))


# ---------------------------------------------------------------- computing


def test_compute_does_not_change_parameters(model, hparams) -> None:
    before = checksum(model)
    # default statistics path (model-sampled corpus) and the precomputed one
    edit = rome_lens.compute_rome(model, SAME_LAYER[0], hparams=hparams)
    assert checksum(model) == before
    edit2 = rome_lens.compute_rome(model, SAME_LAYER[0], hparams=hparams,
                                   stats=key_stats(model, 1, hparams))
    assert checksum(model) == before
    assert rome_lens.applied_edits(model) == []
    for e in (edit, edit2):
        assert e.layer == 1
        assert e.left.shape == (model.cfg.d_mlp,)
        assert e.right.shape == (model.cfg.d_model,)
        assert e.k_star.shape == (model.cfg.d_mlp,)
        assert e.v_star.shape == (model.cfg.d_model,)
        assert e.fingerprint == base_fingerprint(model)
        assert e.request == SAME_LAYER[0]
        assert e.hparams.layer == 1
        assert torch.isfinite(e.delta()).all()
        assert 1 <= len(e.info["losses"]) <= hparams.v_num_grad_steps
        assert e.delta().abs().max() > 0


def test_compute_is_deterministic(model, hparams) -> None:
    a = cached_edit(model, SAME_LAYER[1], 1, hparams)
    b = rome_lens.compute_rome(model, SAME_LAYER[1], hparams=hparams,
                               stats=key_stats(model, 1, hparams))
    assert torch.equal(a.left, b.left)
    assert torch.equal(a.right, b.right)
    assert a.id == b.id
    other = cached_edit(model, SAME_LAYER[2], 1, hparams)
    assert other.id != a.id


def test_layer_argument_overrides_hparams(model, hparams) -> None:
    edit = cached_edit(model, OTHER_LAYERS[1][1], 2, hparams)
    assert edit.layer == 2 and edit.hparams.layer == 2
    assert edit.weight_name == "blocks.2.mlp.W_out"
    neg = rome_lens.compute_rome(model, OTHER_LAYERS[1][1], layer=-1, hparams=hparams,
                                 stats=key_stats(model, 2, hparams))
    assert neg.layer == 2
    assert torch.equal(neg.left, edit.left) and torch.equal(neg.right, edit.right)


def test_left_is_normalised_against_k_star(model, hparams) -> None:
    edit = cached_edit(model, SAME_LAYER[0], 1, hparams)
    assert float(edit.left @ edit.k_star) == pytest.approx(1.0, abs=1e-5)
    # right = v* - v(k*) on the unedited weights
    v_orig = access.mlp_value(model, 1, edit.k_star).detach()
    torch.testing.assert_close(v_orig + edit.right, edit.v_star, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- one edit


def test_apply_is_rank_one_and_equals_delta(model, hparams) -> None:
    edit = cached_edit(model, SAME_LAYER[0], 1, hparams)
    before = w_out(model)
    others = {layer: w_out(model, layer) for layer in (0, 2)}
    edit.apply(model)
    diff = (w_out(model) - before).double()
    s = torch.linalg.svdvals(diff)
    assert s[0] > 1e-3
    assert s[1] / s[0] < 1e-5
    assert torch.linalg.matrix_rank(diff, rtol=1e-5) == 1
    scale = float(edit.delta().abs().max())
    torch.testing.assert_close(diff.float(), edit.delta(), atol=1e-6 * max(scale, 1.0), rtol=0)
    for layer, w in others.items():
        assert torch.equal(w_out(model, layer), w)
    assert rome_lens.applied_edits(model) == [edit]
    assert edit.is_applied(model)
    # the edit keeps the fingerprint of the unedited weights
    assert base_fingerprint(model) == edit.fingerprint
    assert access.weights_fingerprint(model) != edit.fingerprint


def test_edited_mlp_maps_k_star_to_v_star(model, hparams) -> None:
    # give b_out non-zero values so that the bias path of the value is exercised
    bias = access.mlp_out_bias(model, 1)
    assert (bias is None) == access.is_bridge(model)  # Hugging Face Gemma 3 has no MLP bias
    if bias is not None:
        with torch.no_grad():
            bias.copy_(torch.linspace(-0.5, 0.5, bias.shape[0]))
    edit = cached_edit(model, SAME_LAYER[2], 1, hparams)
    v_before = access.mlp_value(model, 1, edit.k_star).detach()
    assert (v_before - edit.v_star).norm() > 1e-2  # the edit has something to do
    with edit.applied(model):
        v_after = access.mlp_value(model, 1, edit.k_star).detach()
    tol = 1e-4 * float(edit.v_star.norm())
    assert (v_after - edit.v_star).abs().max() < tol


def test_mlp_value_is_the_raw_mlp_output(model) -> None:
    """access.mlp_value(key) is what the MLP module actually outputs (before any post-norm)."""
    bias = access.mlp_out_bias(model, 1)
    if bias is not None:
        with torch.no_grad():
            bias.copy_(torch.linspace(-1, 1, model.cfg.d_model))
    seen: list[torch.Tensor] = []
    tokens = model.to_tokens("Alice Smith lives in")
    with access.raw_mlp_output_hook(model, 1, lambda out: seen.append(out.detach())):
        _, cache = model.run_with_cache(tokens, names_filter=access.key_hook_name(1))
    keys = cache[access.key_hook_name(1)]
    torch.testing.assert_close(access.mlp_value(model, 1, keys).detach(), seen[0],
                               atol=1e-5, rtol=1e-5)


def test_revert_is_bit_exact(model, hparams) -> None:
    before_sum, before_w = checksum(model), w_out(model)
    edit = cached_edit(model, SAME_LAYER[0], 1, hparams)
    edit.apply(model)
    assert checksum(model) != before_sum
    edit.revert(model)
    assert checksum(model) == before_sum
    assert torch.equal(w_out(model), before_w)
    assert rome_lens.applied_edits(model) == []
    assert not edit.is_applied(model)
    # and it can be applied again afterwards, giving the same weights
    edit.apply(model)
    applied_w = w_out(model)
    edit.revert(model)
    edit.apply(model)
    assert torch.equal(w_out(model), applied_w)


def test_applied_context_manager_restores(model, hparams) -> None:
    before = checksum(model)
    edit = cached_edit(model, SAME_LAYER[1], 1, hparams)
    with edit.applied(model) as m:
        assert m is model
        assert edit.is_applied(model)
        assert checksum(model) != before
    assert checksum(model) == before
    assert rome_lens.applied_edits(model) == []


def test_applied_context_manager_restores_on_exception(model, hparams) -> None:
    before, before_w = checksum(model), w_out(model)
    edit = cached_edit(model, SAME_LAYER[1], 1, hparams)
    with pytest.raises(RuntimeError, match="boom"), edit.applied(model):
        assert not torch.equal(w_out(model), before_w)
        raise RuntimeError("boom")
    assert checksum(model) == before
    assert torch.equal(w_out(model), before_w)
    assert rome_lens.applied_edits(model) == []


def test_edit_changes_model_output(model, hparams) -> None:
    edit = cached_edit(model, SAME_LAYER[0], 1, hparams)
    tokens = model.to_tokens(SAME_LAYER[0].text)
    with torch.no_grad():
        before = model(tokens)
        with edit.applied(model):
            during = model(tokens)
        after = model(tokens)
    assert torch.equal(before, after)
    assert (during[0, -1] - before[0, -1]).abs().max() > 1e-6


# ---------------------------------------------------------------- stacking


def test_stack_same_layer_revert_in_reverse_order(model, hparams) -> None:
    edits = same_layer_edits(model, hparams)
    orig_sum, orig_w = checksum(model), w_out(model)
    steps = [orig_w]
    for e in edits:
        e.apply(model)
        steps.append(w_out(model))
    assert rome_lens.applied_edits(model) == edits
    total = sum(e.delta() for e in edits)
    torch.testing.assert_close(steps[-1] - orig_w, total, atol=1e-6, rtol=0)
    assert torch.linalg.matrix_rank((steps[-1] - orig_w).double(), rtol=1e-5) == 3
    for i in reversed(range(3)):
        edits[i].revert(model)
        assert torch.equal(w_out(model), steps[i]), f"after reverting edit {i}"
    assert checksum(model) == orig_sum
    assert rome_lens.applied_edits(model) == []


def test_stack_same_layer_revert_middle_first(model, hparams) -> None:
    e1, e2, e3 = same_layer_edits(model, hparams)
    orig_sum = checksum(model)
    for e in (e1, e2, e3):
        e.apply(model)
    e2.revert(model)
    assert rome_lens.applied_edits(model) == [e1, e3]

    reference = fresh_copy(model)
    assert checksum(reference) == orig_sum
    e1.apply(reference)
    e3.apply(reference)
    assert torch.equal(w_out(model), w_out(reference))
    assert checksum(model) == checksum(reference)

    e1.revert(model)
    only3 = fresh_copy(model)
    e3.apply(only3)
    assert torch.equal(w_out(model), w_out(only3))
    e3.revert(model)
    assert checksum(model) == orig_sum


def test_stack_different_layers_mixed_order(model, hparams) -> None:
    a, b, _ = same_layer_edits(model, hparams)
    (d, e) = other_layer_edits(model, hparams)
    orig = {layer: w_out(model, layer) for layer in range(3)}
    orig_sum = checksum(model)
    order = [a, d, b, e]  # layers 1, 0, 1, 2
    for x in order:
        x.apply(model)
    for x in (d, e):
        torch.testing.assert_close(w_out(model, x.layer) - orig[x.layer], x.delta(),
                                   atol=1e-6, rtol=0)

    # revert the layer-1 edit applied first: layer 1 = original + b only, others untouched
    a.revert(model)
    reference = fresh_copy(model)
    for x in (d, b, e):
        x.apply(reference)
    for layer in range(3):
        assert torch.equal(w_out(model, layer), w_out(reference, layer)), f"layer {layer}"
    assert checksum(model) == checksum(reference)

    # revert the layer-0 edit: layer 0 is bit-exact original again
    d.revert(model)
    assert torch.equal(w_out(model, 0), orig[0])
    assert rome_lens.applied_edits(model) == [b, e]

    b.revert(model)
    assert torch.equal(w_out(model, 1), orig[1])
    assert not torch.equal(w_out(model, 2), orig[2])
    e.revert(model)
    assert checksum(model) == orig_sum


def test_revert_all_restores_everything(model, hparams) -> None:
    orig_sum = checksum(model)
    edits = same_layer_edits(model, hparams) + other_layer_edits(model, hparams)
    for x in edits:
        x.apply(model)
    assert len(rome_lens.applied_edits(model)) == 5
    rome_lens.revert_all(model)
    assert checksum(model) == orig_sum
    assert rome_lens.applied_edits(model) == []
    assert not any(x.is_applied(model) for x in edits)
    # revert_all on a clean model is a no-op
    rome_lens.revert_all(model)
    assert checksum(model) == orig_sum
    # edits can be applied again after revert_all
    edits[0].apply(model)
    assert rome_lens.applied_edits(model) == [edits[0]]


# ---------------------------------------------------------------- state errors


def test_apply_same_edit_twice_raises(model, hparams) -> None:
    edit = cached_edit(model, SAME_LAYER[0], 1, hparams)
    edit.apply(model)
    after_once = checksum(model)
    with pytest.raises(EditStateError, match="already applied"):
        edit.apply(model)
    assert checksum(model) == after_once
    assert rome_lens.applied_edits(model) == [edit]


def test_revert_not_applied_raises(model, hparams) -> None:
    e1, e2, _ = same_layer_edits(model, hparams)
    orig_sum = checksum(model)
    with pytest.raises(EditStateError, match="not applied"):
        e1.revert(model)
    assert checksum(model) == orig_sum

    e1.apply(model)
    applied_sum = checksum(model)
    with pytest.raises(EditStateError, match="not applied"):
        e2.revert(model)
    assert checksum(model) == applied_sum
    assert rome_lens.applied_edits(model) == [e1]

    e1.revert(model)
    with pytest.raises(EditStateError):
        e1.revert(model)
    assert checksum(model) == orig_sum


def test_apply_to_other_model_raises_fingerprint_mismatch(model, hparams) -> None:
    edit = cached_edit(model, SAME_LAYER[0], 1, hparams)
    other = tiny_model(model_kind(model), seed=1)
    other_sum = checksum(other)
    with pytest.raises(FingerprintMismatchError, match="fingerprint"):
        edit.apply(other)
    assert checksum(other) == other_sum
    assert rome_lens.applied_edits(other) == []
    # FingerprintMismatchError is an EditStateError
    with pytest.raises(EditStateError):
        edit.apply(other)
    # a model with fewer layers than the edit's layer
    layer2 = cached_edit(model, OTHER_LAYERS[1][1], 2, hparams)
    short = tiny_model(model_kind(model), seed=0, n_layers=2)
    short_sum = checksum(short)
    with pytest.raises(FingerprintMismatchError):
        layer2.apply(short)
    assert checksum(short) == short_sum


def test_hand_modified_weight_then_revert_raises(model, hparams) -> None:
    edit, second, _ = same_layer_edits(model, hparams)
    edit.apply(model)
    with torch.no_grad():
        access.mlp_out_weight(model, 1)[3, 5] += 1.0
    tampered = w_out(model)
    tampered_sum = checksum(model)
    with pytest.raises(EditStateError, match="changed outside"):
        edit.revert(model)
    # the hand change is not silently overwritten, and the edit is still recorded
    assert torch.equal(w_out(model), tampered)
    assert checksum(model) == tampered_sum
    assert rome_lens.applied_edits(model) == [edit]
    with pytest.raises(EditStateError, match="changed outside"):
        second.apply(model)
    with pytest.raises(EditStateError, match="changed outside"):
        rome_lens.revert_all(model)
    assert checksum(model) == tampered_sum
