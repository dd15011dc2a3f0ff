"""The general edit value: sites of any rank, dense sites, stacking, files, the method registry."""

from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path

import pytest
import torch
from _support import STATS_CORPUS, cached_edit, one_thread
from safetensors import safe_open
from safetensors.torch import save_file

import rome_lens
from rome_lens import (
    CorruptEditFileError,
    DenseSite,
    Edit,
    EditRequest,
    FingerprintMismatchError,
    InvalidRequestError,
    LowRankSite,
    NonFiniteError,
)
from rome_lens.edits import applied_ids, base_fingerprint, base_weights, combine
from rome_lens.models import access

REQUEST = EditRequest("{} lives in", "Alice Smith", "Paris", "Rome")
OTHER = EditRequest("{} works in", "Bob Jones", "London", "Rome")


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    with one_thread():
        yield


def _three_site_edit(model, seed: int = 0) -> Edit:
    """Rank-2 changes of the MLP output weights of layers 0, 1 and 2."""
    gen = torch.Generator().manual_seed(seed)
    sites = []
    for layer in range(3):
        d_mlp, d_model = access.read_mlp_out(model, layer).shape
        left = torch.randn(d_mlp, 2, generator=gen) * 0.1
        right = torch.randn(2, d_model, generator=gen) * 0.1
        sites.append(LowRankSite(layer, left, right))
    return Edit(sites=tuple(sites), requests=(), method="random", hparams={"seed": seed},
                base_fingerprint=base_fingerprint(model))


def _dense_edit(model, layer: int = 1) -> Edit:
    gen = torch.Generator().manual_seed(7)
    shape = access.read_mlp_out(model, layer).shape
    site = DenseSite(layer, torch.randn(*shape, generator=gen) * 0.01)
    return Edit(sites=(site,), requests=(), method="dense", hparams={},
                base_fingerprint=base_fingerprint(model))


def _weights(model) -> list[torch.Tensor]:
    return [access.read_mlp_out(model, layer).clone() for layer in range(3)]


def _snapshot(edit: Edit) -> tuple[str, str, list[bytes]]:
    tensors = [t for s in edit.sites for t in s.tensors().values()] + list(edit.tensors.values())
    return (edit.id, json.dumps(edit.metadata(), sort_keys=True),
            [t.numpy().tobytes() + str((t.dtype, t.device)).encode() for t in tensors])


def test_three_edits_stack_and_revert_bit_exactly_in_every_order(model, hparams) -> None:
    edits = [_three_site_edit(model), _dense_edit(model), cached_edit(model, REQUEST, 1, hparams)]
    snapshots = [_snapshot(e) for e in edits]
    original = access.parameters_checksum(model)
    base = _weights(model)
    expected_all = None
    for apply_order in itertools.permutations(range(3)):
        for e in (edits[i] for i in apply_order):
            e.apply(model)
        if expected_all is None:  # original + deltas in application order
            expected_all = _weights(model)
            assert not torch.equal(expected_all[1], base[1])
        for layer in range(3):  # the sum does not depend on the order beyond rounding
            torch.testing.assert_close(_weights(model)[layer], expected_all[layer])
        for e in edits:  # every revert order is checked below
            e.revert(model)
        assert access.parameters_checksum(model) == original
    for revert_order in itertools.permutations(range(3)):
        for e in edits:
            e.apply(model)
        for step, i in enumerate(revert_order):
            edits[i].revert(model)
            rest = [edits[j] for j in range(3) if j not in revert_order[: step + 1]]
            # exactly the weights of applying the remaining edits, in their order, to the base
            expected = [w.clone() for w in base]
            for e in rest:
                for site in e.sites:
                    expected[site.layer] += site.delta()
            for layer in range(3):
                assert torch.equal(_weights(model)[layer], expected[layer]), (revert_order, step)
        assert access.parameters_checksum(model) == original
    assert [_snapshot(e) for e in edits] == snapshots  # the edit values never changed


def test_three_site_edit_round_trips_through_a_file(model, tmp_path: Path) -> None:
    edit = _three_site_edit(model)
    assert [s.rank for s in edit.sites] == [2, 2, 2] and edit.layers == (0, 1, 2)
    loaded = rome_lens.load_edit(edit.save(tmp_path / "three"), model=model)
    assert loaded.id == edit.id and loaded.metadata() == edit.metadata()
    for a, b in zip(loaded.sites, edit.sites, strict=True):
        assert torch.equal(a.left, b.left) and torch.equal(a.right, b.right)
    with loaded.applied(model):
        changed = _weights(model)
    with edit.applied(model):
        assert all(torch.equal(a, b) for a, b in zip(changed, _weights(model), strict=True))


def test_dense_edit_round_trips_and_tampering_is_refused(model, tmp_path: Path) -> None:
    edit = _dense_edit(model)
    path = edit.save(tmp_path / "dense.safetensors")
    loaded = rome_lens.load_edit(path, model=model)
    assert torch.equal(loaded.delta(), edit.delta()) and loaded.id == edit.id
    with safe_open(str(path), framework="pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
        header = dict(handle.metadata())
    tensors["site0.change"][3, 4] += 1e-3
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=header)
    with pytest.raises(CorruptEditFileError, match="checksum"):
        rome_lens.load_edit(tmp_path / "bad.safetensors")


def test_three_site_file_with_a_changed_factor_is_refused(model, tmp_path: Path) -> None:
    path = _three_site_edit(model).save(tmp_path / "three")
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x10  # a byte of the last tensor
    (tmp_path / "flip.safetensors").write_bytes(bytes(data))
    with pytest.raises(CorruptEditFileError, match="checksum"):
        rome_lens.load_edit(tmp_path / "flip.safetensors")


def _legacy_file(edit: Edit, path: Path) -> Path:
    """A file as the first release's RomeEdit.save wrote it (format rome_lens.RomeEdit/1)."""
    tensors = {"left": edit.left, "right": edit.right, "k_star": edit.k_star,
               "v_star": edit.v_star}
    meta = json.dumps({
        "format": "rome_lens.RomeEdit/1", "layer": edit.layer,
        "request": edit.request.to_dict(), "hparams": dict(edit.hparams),
        "fingerprint": edit.fingerprint, "model_name": edit.model_name,
        "weight_name": edit.weight_name, "info": dict(edit.info),
    }, sort_keys=True)
    digest = hashlib.sha256(meta.encode())
    for name in ("left", "right", "k_star", "v_star"):
        digest.update(name.encode())
        digest.update(tensors[name].float().numpy().tobytes())
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path),
              metadata={"rome_lens": meta, "sha256": digest.hexdigest()})
    return path


def test_first_release_files_still_load(model, hparams, tmp_path: Path) -> None:
    edit = cached_edit(model, REQUEST, 1, hparams)
    legacy = _legacy_file(edit, tmp_path / "old.safetensors")
    loaded = rome_lens.load_edit(legacy, model=model)
    assert loaded.method == "rome" and loaded.request == REQUEST and loaded.layer == 1
    assert torch.equal(loaded.delta(), edit.delta()) and loaded.id == edit.id
    assert torch.equal(loaded.k_star, edit.k_star) and torch.equal(loaded.v_star, edit.v_star)
    assert loaded.info["file_format"] == "rome_lens.RomeEdit/1"
    data = bytearray(legacy.read_bytes())
    data[-3] ^= 0x01
    (tmp_path / "bad.safetensors").write_bytes(bytes(data))
    with pytest.raises(CorruptEditFileError, match="checksum"):
        rome_lens.load_edit(tmp_path / "bad.safetensors")


def test_edit_values_are_immutable_and_have_a_short_repr(model, hparams) -> None:
    edit = cached_edit(model, REQUEST, 1, hparams)
    with pytest.raises(AttributeError):
        edit.method = "other"  # type: ignore[misc]
    with pytest.raises(TypeError):
        edit.info["losses"] = []  # type: ignore[index]
    with pytest.raises(AttributeError):
        edit.hparams.layer = 3
    assert edit.hparams.layer == edit.hparams["layer"] == 1
    text = repr(edit)
    assert text.startswith("Edit(rome: 'Alice Smith' -> 'Paris'; blocks.1.mlp.W_out rank 1")
    assert len(text) < 120 and "tensor" not in text
    assert repr(_three_site_edit(model)).count("rank 2") == 3


def test_bad_sites_are_refused() -> None:
    with pytest.raises(InvalidRequestError, match="factors"):
        LowRankSite(0, torch.zeros(4, 2), torch.zeros(3, 5))
    with pytest.raises(NonFiniteError):
        DenseSite(0, torch.full((2, 2), float("nan")))
    with pytest.raises(InvalidRequestError, match="weight"):
        DenseSite(0, torch.zeros(2, 2), weight="attn.W_Q")
    site = DenseSite(0, torch.zeros(2, 2))
    with pytest.raises(InvalidRequestError, match="one site per weight"):
        Edit(sites=(site, site), requests=(), method="x", hparams={}, base_fingerprint="f")


def test_bad_edit_leaves_the_model_exactly_as_it_was(model) -> None:
    before = access.parameters_checksum(model)
    d_mlp, d_model = access.read_mlp_out(model, 0).shape
    out_of_range = Edit(sites=(LowRankSite(0, torch.ones(d_mlp, 1), torch.ones(1, d_model)),
                               LowRankSite(9, torch.ones(d_mlp, 1), torch.ones(1, d_model))),
                        requests=(), method="x", hparams={},
                        base_fingerprint=base_fingerprint(model))
    with pytest.raises(FingerprintMismatchError, match="layer 9"):
        out_of_range.apply(model)
    wrong_shape = Edit(sites=(DenseSite(1, torch.ones(d_mlp + 1, d_model)),), requests=(),
                       method="x", hparams={}, base_fingerprint=base_fingerprint(model))
    with pytest.raises(FingerprintMismatchError, match="shape"):
        wrong_shape.apply(model)
    assert access.parameters_checksum(model) == before and rome_lens.applied_edits(model) == []


def test_combine_equals_applying_both(model) -> None:
    a, b = _three_site_edit(model, seed=1), _three_site_edit(model, seed=2)
    both = combine([a, b])
    assert [s.rank for s in both.sites] == [4, 4, 4]
    with both.applied(model):
        combined = _weights(model)
    with a.applied(model), b.applied(model):
        for x, y in zip(combined, _weights(model), strict=True):
            torch.testing.assert_close(x, y)


def test_base_weights_gives_the_unedited_weights_exactly(model) -> None:
    base = _weights(model)
    edit = _three_site_edit(model).apply(model)
    edited = _weights(model)
    with base_weights(model):
        assert all(torch.equal(a, b) for a, b in zip(_weights(model), base, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(_weights(model), edited, strict=True))
    edit.revert(model)


def test_statistics_are_those_of_the_base_model_under_any_edit(model, hparams) -> None:
    base_c = rome_lens.second_moment(model, 2, corpus=STATS_CORPUS, hparams=hparams)
    fingerprint = base_fingerprint(model)
    edit = _three_site_edit(model).apply(model)
    assert base_fingerprint(model) == fingerprint  # the registry knows the base weights
    from rome_lens._cache import cache_dir

    for cached in cache_dir("stats").glob("*"):
        cached.unlink()  # force a recomputation while the edit (layers 0-2) is applied
    edited_c = rome_lens.second_moment(model, 2, corpus=STATS_CORPUS, hparams=hparams)
    assert torch.equal(edited_c, base_c)
    edit.revert(model)


def test_second_edit_samples_no_corpus_and_recomputes_no_statistics(
    model, hparams, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = rome_lens.compute_edit(model, REQUEST, hparams=hparams)  # default corpus, sampled
    first.apply(model)

    def forbidden(*args, **kwargs):
        raise AssertionError("recomputed base-model statistics under an applied edit")

    import rome_lens.statistics.contexts as contexts
    import rome_lens.statistics.corpus as corpus
    import rome_lens.statistics.moments as moments

    monkeypatch.setattr(corpus, "_sample_corpus", forbidden)
    monkeypatch.setattr(moments, "_accumulate", forbidden)
    monkeypatch.setattr(contexts, "_sample_templates", forbidden)
    second = rome_lens.compute_edit(model, OTHER, hparams=hparams)
    assert second.parents == (first.id,) and second.base_fingerprint == first.base_fingerprint
    assert applied_ids(model) == (first.id,)  # computing did not change the stack
    second.apply(model)
    rome_lens.revert_all(model)


def test_compute_edit_dispatches_and_refuses_bad_calls(model, hparams) -> None:
    before = access.parameters_checksum(model)
    assert {"rome", "ft-l"} <= set(rome_lens.available_methods())
    with pytest.raises(InvalidRequestError, match="unknown editing method 'memitt'"):
        rome_lens.compute_edit(model, REQUEST, method="memitt")
    with pytest.raises(InvalidRequestError, match="not take option.s. layr; it takes: .*layer"):
        rome_lens.compute_edit(model, REQUEST, layr=1)
    clash = EditRequest("{} lives in", "Alice Smith", "Berlin", "Rome")
    with pytest.raises(InvalidRequestError, match="conflicting"):
        rome_lens.compute_edit(model, [REQUEST, clash], hparams=hparams)
    with pytest.raises(InvalidRequestError, match="no requests"):
        rome_lens.compute_edit(model, [], hparams=hparams)
    ft = rome_lens.compute_edit(model, REQUEST, method="ft-l", layer=1)
    assert ft.method == "ft-l" and isinstance(ft.sites[0], DenseSite)
    assert access.parameters_checksum(model) == before


def test_a_type_error_inside_a_method_is_not_mistaken_for_a_bad_option(model) -> None:
    def broken(model, requests, **options):
        raise TypeError("f() got an unexpected keyword argument 'x'")  # an internal bug

    rome_lens.register_method("broken", broken, replace=True)
    try:
        with pytest.raises(TypeError, match="unexpected keyword"):
            rome_lens.compute_edit(model, REQUEST, method="broken", anything=1)
    finally:
        rome_lens.methods._METHODS.pop("broken")


def test_rome_with_two_requests_is_two_rank_one_updates(model, hparams) -> None:
    both = rome_lens.compute_edit(model, [REQUEST, OTHER], hparams=hparams)
    assert both.sites[0].rank == 2 and both.requests == (REQUEST, OTHER)
    assert both.k_star.shape[0] == 2 and len(both.info["final_losses"]) == 2
    for i, request in enumerate((REQUEST, OTHER)):
        alone = rome_lens.compute_edit(model, request, hparams=hparams)
        torch.testing.assert_close(both.sites[0].left[:, i], alone.left, rtol=1e-3, atol=1e-5)
        torch.testing.assert_close(both.sites[0].right[i], alone.right, rtol=1e-3, atol=1e-4)


def test_register_method(model, hparams) -> None:
    from rome_lens.methods import _METHODS

    def doubled(model, requests, **options):
        edit = rome_lens.compute_edit(model, requests, **options)
        site = edit.sites[0]
        return Edit(sites=(LowRankSite(site.layer, 2 * site.left, site.right),),
                    requests=edit.requests, method="doubled", hparams=edit.hparams,
                    base_fingerprint=edit.base_fingerprint)

    rome_lens.register_method("doubled", doubled, "ROME, twice as strong")
    try:
        edit = rome_lens.compute_edit(model, REQUEST, method="doubled", hparams=hparams)
        assert edit.method == "doubled"
        with pytest.raises(InvalidRequestError, match="already registered"):
            rome_lens.register_method("doubled", doubled)
    finally:
        _METHODS.pop("doubled")


def test_base_weights_nests_and_refuses_edits_inside(model) -> None:
    edit = _three_site_edit(model).apply(model)
    edited = _weights(model)
    with base_weights(model):
        inner_base = _weights(model)
        with base_weights(model):  # nested: still the base weights, nothing rewritten
            assert all(torch.equal(a, b) for a, b in zip(_weights(model), inner_base,
                                                         strict=True))
        with pytest.raises(rome_lens.EditStateError, match="base_weights"):
            edit.revert(model)
        with pytest.raises(rome_lens.EditStateError, match="base_weights"):
            _dense_edit(model).apply(model)
    assert all(torch.equal(a, b) for a, b in zip(_weights(model), edited, strict=True))
    assert rome_lens.applied_edits(model) == [edit]
    edit.revert(model)


def test_cli_edit_takes_a_method(model, tmp_path: Path, monkeypatch, capsys) -> None:
    from rome_lens import cli

    monkeypatch.setattr(rome_lens, "load_model", lambda name=None: model)
    before = access.parameters_checksum(model)
    args = ["edit", "--prompt", "{} lives in", "--subject", "Alice Smith", "--target-new",
            "Paris", "--method", "ft-l", "--layer", "1", "--json", "--save",
            str(tmp_path / "ftl")]
    assert cli.main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["method"] == "ft-l" and result["layer"] == 1
    loaded = rome_lens.load_edit(result["saved"], model=model)
    assert loaded.id == result["edit_id"] and isinstance(loaded.sites[0], DenseSite)
    assert access.parameters_checksum(model) == before


def test_revert_keeps_the_base_fingerprint_without_rehashing(model, monkeypatch) -> None:
    """After a full revert the weights are the base again: the fingerprint is not recomputed,
    unless another parameter changed meanwhile."""
    before = base_fingerprint(model)
    calls = []
    real = access.weights_fingerprint
    monkeypatch.setattr(access, "weights_fingerprint", lambda m: calls.append(1) or real(m))
    edit = _three_site_edit(model)
    for revert in (lambda: edit.revert(model), lambda: rome_lens.revert_all(model)):
        edit.apply(model)
        revert()
        assert base_fingerprint(model) == before and calls == []
    edit.apply(model)
    with torch.no_grad():
        next(p for p in model.parameters() if p.ndim == 1).add_(1.0)  # changed outside
    edit.revert(model)
    assert base_fingerprint(model) != before and calls == [1]
