"""EditSequence: add / push, exact revert in any order, save / load / replay, failures."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import pytest
import torch
from _planted import random_edit
from _support import key_stats, model_kind, one_thread, tiny_model

import rome_lens
from rome_lens import (
    CorruptEditFileError,
    EditRequest,
    EditSequence,
    EditStateError,
    FingerprintMismatchError,
    HealthMonitor,
    InvalidRequestError,
    SubjectNotFoundError,
)
from rome_lens.audit.health import DEFAULT_PROMPTS
from rome_lens.models import access
from rome_lens.sequence import read_manifest

BATCHES = [
    [EditRequest("{} lives in", "Alice Smith", "Paris", "Rome")],
    [EditRequest("{} works in", "Bob Jones", "London", "Rome"),
     EditRequest("{} plays", "Carol King", "chess", "golf")],
    [EditRequest("{} speaks", "Dave Brown", "Dutch", "French")],
    [EditRequest("{} likes", "Erin Gray", "tea", "coffee")],
    [EditRequest("{} owns", "Fay Hill", "a boat", "a car"),
     EditRequest("{} reads", "Gus Lee", "poems", "novels")],
]


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    with one_thread():
        yield


def _cheap_monitor() -> HealthMonitor:
    return HealthMonitor(prompts=DEFAULT_PROMPTS[:2], n_tokens=12)


def _weights(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _assert_weights(model, expected: dict[str, torch.Tensor]) -> None:
    now = _weights(model)
    assert now.keys() == expected.keys()
    changed = [name for name in now if not torch.equal(now[name], expected[name])]
    assert not changed, f"weights differ: {changed}"


def _hand_built(model) -> list:
    """Five low-rank edits, two on the same layer, sizes 1-5% of the weights."""
    return [random_edit(model, layer, 0.01 * (i + 1), seed=i)
            for i, layer in enumerate([0, 1, 1, 2, 0])]


def test_hand_built_sequences_revert_bit_exactly_in_any_order(model) -> None:
    original = _weights(model)
    edits = _hand_built(model)
    orders = [random.Random(seed).sample(range(5), 5) for seed in range(3)]
    for order in orders:
        seq = EditSequence(model, monitor=False)
        for edit in edits:
            seq.push(edit)
        assert len(seq) == 5 and seq.edits == tuple(edits)
        for step, index in enumerate(order):
            seq.remove(edits[index])
            # the weights are exactly those of applying the rest, in their order, to the base
            expected = {layer: access.read_mlp_out(model, layer).clone() for layer in range(3)}
            rest = [e for i, e in enumerate(edits) if i not in order[: step + 1]]
            with rome_lens.base_weights(model):
                base = {layer: access.read_mlp_out(model, layer).clone() for layer in range(3)}
            for edit in rest:
                base[edit.layer] += edit.delta()
            assert all(torch.equal(base[k], expected[k]) for k in range(3)), (order, step)
        assert len(seq) == 0
        _assert_weights(model, original)


@pytest.mark.parametrize("method", ["ft-l", "rome"])
def test_sequences_of_five_batches_revert_bit_exactly(model, hparams, method) -> None:
    before = random_edit(model, 2, 0.02, seed=9).apply(model)  # not part of the sequence
    original = _weights(model)
    options = ({"layer": 1} if method == "ft-l"
               else {"hparams": hparams, "stats": key_stats(tiny_model(model_kind(model)), 1,
                                                            hparams)})
    seq = EditSequence(model, method=method, monitor=_cheap_monitor(), **options)
    for batch in BATCHES:
        seq.add(batch)
    edits = seq.edits
    assert [len(e.requests) for e in edits] == [1, 2, 1, 1, 2]
    for i, edit in enumerate(edits):  # each edit was computed on the model with the earlier ones
        assert edit.parents == (before.id, *(e.id for e in edits[:i]))
    assert [r.edit_id for r in seq.health] == [e.id for e in edits] and not seq.flagged
    assert repr(seq) == f"EditSequence({method}: 5 edits, 7 requests; 0 flagged)"
    assert seq.revert() == list(edits) and len(seq) == 0 and seq.health == ()
    _assert_weights(model, original)
    assert rome_lens.applied_edits(model) == [before]
    before.revert(model)


def test_pop_and_revert_last(model) -> None:
    original = _weights(model)
    seq = EditSequence(model, monitor=_cheap_monitor())
    edits = [seq.push(e) for e in _hand_built(model)[:3]]
    assert seq.pop() is edits[2] and seq.monitor is not None and len(seq.monitor.history) == 2
    after_two = _weights(model)
    seq.push(edits[2])
    assert seq.revert_last() is edits[2]
    _assert_weights(model, after_two)
    seq.pop()
    seq.pop()
    _assert_weights(model, original)
    with pytest.raises(EditStateError, match="empty"):
        seq.pop()


def test_save_load_and_replay_give_bit_identical_weights(model, tmp_path: Path) -> None:
    seq = EditSequence(model, method="ft-l", monitor=_cheap_monitor(), layer=1)
    for edit in _hand_built(model)[:2]:
        seq.push(edit)
    seq.extend(BATCHES[:3])
    edited = _weights(model)
    folder = seq.save(tmp_path / "seq")
    manifest = json.loads((folder / "sequence.json").read_text())
    assert manifest["format"] == "rome_lens.EditSequence/1" and manifest["method"] == "ft-l"
    assert [e["id"] for e in manifest["edits"]] == [e.id for e in seq]
    assert len(manifest["health"]) == 5 and manifest["monitor"]["n_tokens"] == 12
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["sequence.json", *(e["file"] for e in manifest["edits"])])

    fresh = tiny_model(model_kind(model))
    loaded = EditSequence.load(folder, fresh)
    _assert_weights(fresh, edited)
    assert [e.id for e in loaded] == [e.id for e in seq] and loaded.health == seq.health
    assert loaded.method == "ft-l" and loaded.monitor is None
    replayed = seq.replay(tiny_model(model_kind(model)))
    _assert_weights(replayed.model, edited)
    loaded.revert()
    _assert_weights(fresh, _weights(tiny_model(model_kind(model))))

    monitored = EditSequence.load(folder, tiny_model(model_kind(model)), monitor=True, layer=1)
    assert monitored.monitor is not None and monitored.monitor.n_tokens == 12
    assert len(monitored.monitor.history) == 5
    monitored.add(BATCHES[3])  # continues the sequence, checked against the saved history
    assert monitored.health[-1].step == 5 and len(monitored) == 6
    with pytest.raises(FileExistsError, match="overwrite=True"):
        seq.save(folder)
    seq.pop()
    seq.save(folder, overwrite=True)
    assert len(list(folder.glob("*.safetensors"))) == 4


def _corrupt(folder: Path, change) -> None:
    path = folder / "sequence.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _swap_ids(data) -> None:
    first, second = data["edits"][0], data["edits"][1]
    first["id"], second["id"] = second["id"], first["id"]


@pytest.mark.parametrize(("change", "message"), [
    (_swap_ids, "manifest entry 0 names edit"),
    (lambda d: d["edits"].append(dict(d["edits"][0])), "twice"),
    (lambda d: d["edits"][1].update(file="missing.safetensors"), "not a file"),
    (lambda d: d["edits"][1].update(file="../escape.safetensors"), "not a file"),
    (lambda d: d.update(format="rome_lens.EditSequence/99"), "unknown sequence manifest"),
    (lambda d: d.pop("edits"), "malformed"),
    (lambda d: d["health"].append({**d["health"][0], "edit_id": "0" * 16}), "health records"),
])
def test_corrupt_or_mismatched_manifests_are_refused(model, tmp_path, change, message) -> None:
    seq = EditSequence(model, monitor=_cheap_monitor())
    for edit in _hand_built(model)[:3]:
        seq.push(edit)
    folder = seq.save(tmp_path / "seq")
    seq.revert()
    original = _weights(model)
    _corrupt(folder, change)
    with pytest.raises(CorruptEditFileError, match=message):
        EditSequence.load(folder, model)
    _assert_weights(model, original)  # nothing was applied
    assert rome_lens.applied_edits(model) == []


def test_unreadable_files_and_other_models_are_refused(model, tmp_path) -> None:
    seq = EditSequence(model, monitor=False)
    for edit in _hand_built(model)[:2]:
        seq.push(edit)
    folder = seq.save(tmp_path / "seq")
    with pytest.raises(FingerprintMismatchError):
        EditSequence.load(folder, tiny_model(model_kind(model), seed=1))
    with pytest.raises(EditStateError, match="already applied"):  # applied: undone again
        EditSequence.load(folder, model)
    assert len(rome_lens.applied_edits(model)) == 2
    reverted = seq.revert()
    (folder / "sequence.json").write_text("{not json")
    with pytest.raises(CorruptEditFileError, match="unreadable"):
        EditSequence.load(folder, model)
    with pytest.raises(FileNotFoundError):
        EditSequence.load(tmp_path / "nothing", model)
    again = EditSequence(model, monitor=False)
    for edit in reverted:
        again.push(edit)
    damaged = again.save(tmp_path / "damaged")
    again.revert()
    second = sorted(damaged.glob("*.safetensors"))[1]
    second.write_bytes(second.read_bytes()[:-4] + b"\x00\x01\x02\x03")
    with pytest.raises(CorruptEditFileError, match="checksum"):
        EditSequence.load(damaged, model)
    assert rome_lens.applied_edits(model) == []


def test_a_failing_add_leaves_the_model_and_the_sequence_as_before(model) -> None:
    seq = EditSequence(model, method="ft-l", monitor=_cheap_monitor(), layer=1)
    seq.add(BATCHES[0])
    state = (_weights(model), seq.edits, seq.health, list(seq.monitor.history))
    bad_calls = [
        (lambda: seq.add(EditRequest("Zed lives in", "Alice Smith", "Oslo")),
         SubjectNotFoundError),
        (lambda: seq.add([]), InvalidRequestError),
        (lambda: seq.add(BATCHES[1], lr_typo=1.0), InvalidRequestError),
        (lambda: seq.push(seq.edits[0]), EditStateError),
    ]
    for call, error in bad_calls:
        with pytest.raises(error):
            call()
        assert (_weights(model).keys(), seq.edits) == (state[0].keys(), state[1])
        _assert_weights(model, state[0])
        assert seq.health == state[2] and seq.monitor.history == state[3]

    def broken_measure(_model):
        raise RuntimeError("the check fails")

    seq.monitor.measure = broken_measure  # a check that fails after the edit was applied
    with pytest.raises(RuntimeError, match="the check fails"):
        seq.add(BATCHES[1])
    _assert_weights(model, state[0])
    assert seq.edits == state[1] and seq.monitor.history == state[3]
    assert rome_lens.edits.applied_ids(model) == tuple(e.id for e in state[1])
    rome_lens.revert_all(model)


def test_the_context_manager_reverts_even_after_an_exception(model) -> None:
    original = _weights(model)
    with EditSequence(model, monitor=False) as seq:
        seq.push(random_edit(model, 0, 0.05, seed=0))
    _assert_weights(model, original)
    with pytest.raises(KeyError), EditSequence(model, monitor=False) as seq:
        seq.push(random_edit(model, 1, 0.05, seed=1))
        raise KeyError("boom")
    _assert_weights(model, original)


def test_edits_reverted_outside_the_sequence_are_detected(model) -> None:
    seq = EditSequence(model, method="ft-l", monitor=False, layer=1)
    seq.push(random_edit(model, 0, 0.05, seed=0))
    rome_lens.revert_all(model)
    for call in (lambda: seq.add(BATCHES[0]), seq.revert, seq.pop):
        with pytest.raises(EditStateError, match="no longer applied"):
            call()


def test_progress_is_logged_per_batch_and_bad_arguments_are_refused(model, caplog) -> None:
    seq = EditSequence(model, method="ft-l", monitor=False, layer=1)
    with caplog.at_level(logging.INFO, logger="rome_lens.sequence.session"):
        seq.extend(BATCHES[:2])
    steps = [r.getMessage() for r in caplog.records if "sequence step" in r.getMessage()]
    assert len(steps) == 2 and steps[1].startswith("sequence step 2: Edit(ft-l: 2 requests")
    assert repr(seq) == "EditSequence(ft-l: 2 edits, 3 requests; not monitored)"
    assert seq[0] is seq.edits[0] and list(seq) == list(seq.edits) and len(seq.requests) == 3
    seq.revert()
    with pytest.raises(InvalidRequestError, match="unknown editing method"):
        EditSequence(model, method="memitt")
    with pytest.raises(InvalidRequestError, match="monitor must be"):
        EditSequence(model, monitor="yes")  # type: ignore[arg-type]
    with pytest.raises(EditStateError, match="not part of this sequence"):
        seq.remove(random_edit(model, 0, 0.05, seed=0))


def test_read_manifest_lists_the_saved_edits(model, tmp_path) -> None:
    seq = EditSequence(model, monitor=False)
    edits = [seq.push(e) for e in _hand_built(model)[:2]]
    manifest = read_manifest(seq.save(tmp_path / "s"))
    assert [entry.id for entry in manifest.entries] == [e.id for e in edits]
    assert manifest.entries[0].file == f"0000-{edits[0].id}.safetensors"
    assert manifest.monitor is None and manifest.health == ()
    seq.revert()
