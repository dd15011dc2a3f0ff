from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _support import cached_edit, model_kind, one_thread, tiny_model
from safetensors import safe_open
from safetensors.torch import save_file

import rome_lens
from rome_lens import (
    CorruptEditFileError,
    EditRequest,
    EditStateError,
    FingerprintMismatchError,
    load_edit,
)
from rome_lens.models import access

REQUEST = EditRequest("{} lives in", "Alice Smith", "Paris", "Rome")
TENSORS = ("left", "right", "k_star", "v_star")  # attributes of a single rank-one edit


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    with one_thread():
        yield


@pytest.fixture
def edit(model, hparams) -> rome_lens.RomeEdit:
    return cached_edit(model, REQUEST, 1, hparams)


@pytest.fixture
def saved(edit, tmp_path: Path) -> Path:
    return edit.save(tmp_path / "edit.safetensors")


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}, dict(handle.metadata())


def test_round_trip(model, edit, saved: Path) -> None:
    assert saved.exists() and saved.suffix == ".safetensors"
    loaded = load_edit(saved, model=model)
    for name in TENSORS:
        assert torch.equal(getattr(loaded, name), getattr(edit, name)), name
        assert getattr(loaded, name).dtype == getattr(edit, name).dtype
    assert loaded.layer == edit.layer == 1
    assert loaded.request == edit.request == REQUEST
    assert loaded.hparams == edit.hparams
    assert loaded.fingerprint == edit.fingerprint
    assert loaded.model_name == edit.model_name
    assert loaded.info == edit.info
    assert loaded.id == edit.id
    assert torch.equal(loaded.delta(), edit.delta())
    # loading does not touch the model
    assert rome_lens.applied_edits(model) == []


def test_save_appends_suffix(edit, tmp_path: Path) -> None:
    path = edit.save(tmp_path / "sub" / "my_edit")
    assert path == tmp_path / "sub" / "my_edit.safetensors"
    assert path.exists()
    assert load_edit(path).id == edit.id


def test_loaded_edit_applies_like_the_original(model, edit, saved: Path) -> None:
    original_sum = access.parameters_checksum(model)
    loaded = load_edit(saved, model=model)
    loaded.apply(model)
    via_loaded = access.mlp_out_weight(model, 1).detach().clone()
    # the same edit (same id) cannot be applied twice, whichever object it comes from
    with pytest.raises(EditStateError, match="already applied"):
        edit.apply(model)
    loaded.revert(model)
    assert access.parameters_checksum(model) == original_sum

    reference = tiny_model(model_kind(model))
    edit.apply(reference)
    assert torch.equal(via_loaded, access.mlp_out_weight(reference, 1).detach())
    # a loaded copy can revert the edit applied through the original object
    load_edit(saved).revert(reference)
    assert access.parameters_checksum(reference) == original_sum


def test_flipped_tensor_byte_rewritten_with_metadata(saved: Path, tmp_path: Path) -> None:
    tensors, meta = _read(saved)
    raw = tensors["site0.right"].clone().view(torch.int32)
    raw[0, 0] ^= 1  # flip the lowest mantissa bit of one value
    tensors["site0.right"] = raw.view(torch.float32)
    bad = tmp_path / "flipped.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    with pytest.raises(CorruptEditFileError, match="checksum"):
        load_edit(bad)


def test_flipped_raw_byte_in_data_section(saved: Path, tmp_path: Path) -> None:
    data = bytearray(saved.read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    n_data = len(data) - 8 - header_len
    assert n_data == 4 * sum(t.numel() for t in _read(saved)[0].values())
    for offset in (8 + header_len, len(data) - 2):  # first and (nearly) last data byte
        bad_bytes = bytearray(data)
        bad_bytes[offset] ^= 0x01
        bad = tmp_path / f"raw_{offset}.safetensors"
        bad.write_bytes(bytes(bad_bytes))
        with pytest.raises(CorruptEditFileError, match="checksum"):
            load_edit(bad)


@pytest.mark.parametrize(
    "change",
    [
        lambda m: m["sites"][0].update(layer=0),
        lambda m: m["requests"][0].update(target_new="London"),
        lambda m: m["hparams"].update(v_lr=0.1),
        lambda m: m.update(base_fingerprint="0" * 24),
    ],
    ids=["layer", "target", "hparams", "fingerprint"],
)
def test_modified_metadata_refused(saved: Path, tmp_path: Path, change) -> None:
    tensors, header = _read(saved)
    meta = json.loads(header["rome_lens"])
    change(meta)
    header["rome_lens"] = json.dumps(meta, sort_keys=True)
    bad = tmp_path / "meta.safetensors"
    save_file(tensors, str(bad), metadata=header)
    with pytest.raises(CorruptEditFileError, match="checksum"):
        load_edit(bad)


def test_missing_checksum_or_format_refused(saved: Path, tmp_path: Path) -> None:
    tensors, header = _read(saved)
    no_sum = dict(header)
    del no_sum["sha256"]
    save_file(tensors, str(tmp_path / "a.safetensors"), metadata=no_sum)
    with pytest.raises(CorruptEditFileError):
        load_edit(tmp_path / "a.safetensors")

    meta = json.loads(header["rome_lens"])
    meta["format"] = "something.else/9"
    other = dict(header, rome_lens=json.dumps(meta, sort_keys=True))
    save_file(tensors, str(tmp_path / "b.safetensors"), metadata=other)
    with pytest.raises(CorruptEditFileError, match="format"):
        load_edit(tmp_path / "b.safetensors")

    # a safetensors file without one of the edit's tensors
    del tensors["extra.k_star"]
    save_file(tensors, str(tmp_path / "c.safetensors"), metadata=header)
    with pytest.raises(CorruptEditFileError):
        load_edit(tmp_path / "c.safetensors")


@pytest.mark.parametrize(
    "content",
    [b"this is not a safetensors file at all", b"", b"\x00" * 64, "truncated"],
    ids=["text", "empty", "zeros", "truncated"],
)
def test_garbage_file_refused(saved: Path, tmp_path: Path, content) -> None:
    if content == "truncated":
        full = saved.read_bytes()
        content = full[: len(full) // 2]
    bad = tmp_path / "garbage.safetensors"
    bad.write_bytes(content)
    with pytest.raises(CorruptEditFileError):
        load_edit(bad)


def test_missing_file_raises_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_edit(tmp_path / "nope.safetensors")


def test_load_for_other_model_raises_fingerprint(model, saved: Path) -> None:
    other = tiny_model(model_kind(model), seed=1)
    other_sum = access.parameters_checksum(other)
    with pytest.raises(FingerprintMismatchError, match="fingerprint"):
        load_edit(saved, model=other)
    # loading without a model works; applying it to the other model is refused
    loaded = load_edit(saved)
    with pytest.raises(FingerprintMismatchError, match="fingerprint"):
        loaded.apply(other)
    assert access.parameters_checksum(other) == other_sum
