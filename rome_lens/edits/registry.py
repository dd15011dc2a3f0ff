"""The edit registry: which edits a model carries, and its exact unedited weights.

Floating-point ``(W + D) - D`` is not ``W``. So the first edit applied to a weight stores a copy
of that weight's original value on the model, and every apply/revert recomputes the weight as
``original + D_1 + D_2 + ...`` over the edits still applied, in the order they were applied.
Reverting every edit restores the original bit for bit, and reverting any subset in any order
gives exactly the weights of applying the rest. The registry also remembers what it last wrote
and refuses to continue if something else changed a weight in between.

Because the registry holds the unedited weights, it knows the BASE model: its fingerprint
(:func:`base_fingerprint`) names the cache of everything that belongs to the unedited model
(key statistics, context prefixes, corpora), and :func:`base_weights` runs code on the unedited
weights without losing the applied edits.

Example:
    >>> edit = rome_lens.compute_edit(model, request)
    >>> edit.apply(model)                    # returns the edit
    Edit(rome: 'Alice Smith' -> 'Paris'; blocks.1.mlp.W_out rank 1; id ...)
    >>> applied_edits(model)
    [Edit(rome: 'Alice Smith' -> 'Paris'; blocks.1.mlp.W_out rank 1; id ...)]
    >>> with base_weights(model):            # the unedited weights, restored exactly on exit
    ...     base_fingerprint(model) == rome_lens.models.access.weights_fingerprint(model)
    True
    >>> revert_all(model)
    >>> applied_edits(model)
    []
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from rome_lens._typing import Model
from rome_lens.errors import EditStateError, FingerprintMismatchError
from rome_lens.models import access

if TYPE_CHECKING:
    from rome_lens.edits.value import Edit

logger = logging.getLogger(__name__)

_REGISTRY_ATTR = "_rome_lens_registry"
_FINGERPRINT_ATTR = "_rome_lens_fingerprint"


@dataclass
class _Registry:
    """Per-model record of applied edits (stored as an attribute of the model)."""

    base_fingerprint: str
    originals: dict[str, torch.Tensor] = field(default_factory=dict)
    written: dict[str, torch.Tensor] = field(default_factory=dict)
    applied: list[Edit] = field(default_factory=list)
    base_depth: int = 0  # > 0 while base_weights() holds the unedited weights
    touched: set[str] = field(default_factory=set)  # every weight an edit has written


def _registry(model: Model) -> _Registry | None:
    return model.__dict__.get(_REGISTRY_ATTR)


def _create_registry(model: Model) -> _Registry:
    reg = _Registry(base_fingerprint=base_fingerprint(model))
    object.__setattr__(model, _REGISTRY_ATTR, reg)
    return reg


def _parameter_versions(model: Model) -> tuple[tuple[int, int], ...]:
    return tuple((p.data_ptr(), p._version) for p in model.parameters())


def base_fingerprint(model: Model) -> str:
    """Fingerprint of the model's weights with every rome_lens edit removed.

    Cached on the model until any parameter changes (checked through torch's in-place version
    counters), so calling it per edit is cheap.
    """
    reg = _registry(model)
    if reg is not None:
        return reg.base_fingerprint
    versions = _parameter_versions(model)
    cached = model.__dict__.get(_FINGERPRINT_ATTR)
    if cached is not None and cached[0] == versions:
        return str(cached[1])
    fingerprint = access.weights_fingerprint(model)
    object.__setattr__(model, _FINGERPRINT_ATTR, (versions, fingerprint))
    return fingerprint


def applied_edits(model: Model) -> list[Edit]:
    """The edits currently applied to ``model``, in application order."""
    reg = _registry(model)
    return list(reg.applied) if reg else []


def in_base_weights(model: Model) -> bool:
    """Whether :func:`base_weights` currently holds the model's unedited weights."""
    reg = _registry(model)
    return reg is not None and reg.base_depth > 0


def applied_ids(model: Model) -> tuple[str, ...]:
    """Ids of the applied edits, in application order."""
    return tuple(edit.id for edit in applied_edits(model))


def revert_all(model: Model) -> None:
    """Revert every applied edit; the edited weights become bit-identical to the originals."""
    reg = _registry(model)
    if reg is None:
        return
    _check_untouched(model, reg)
    for name, original in reg.originals.items():
        _write(model, name, original)
    _drop_registry(model, reg)


@contextmanager
def base_weights(model: Model) -> Iterator[Model]:
    """Temporarily give ``model`` its unedited weights; the applied edits return on exit.

    Both directions are exact (the registry rewrites the stored originals, then the stacked
    sums it wrote before). Used to compute statistics of the base model under any stack of
    edits.
    """
    reg = _registry(model)
    if reg is None or reg.base_depth > 0:  # unedited already (nested calls are free)
        yield model
        return
    _check_untouched(model, reg)
    for name, original in reg.originals.items():
        _write(model, name, original)
    reg.base_depth += 1
    try:
        yield model
    finally:
        reg.base_depth -= 1
        for name, value in reg.written.items():
            _write(model, name, value)


def _layer(name: str) -> int:
    return access.layer_of_weight_name(name)


def _read(model: Model, name: str) -> torch.Tensor:
    return access.read_mlp_out(model, _layer(name))


def _write(model: Model, name: str, value: torch.Tensor) -> None:
    access.write_mlp_out(model, _layer(name), value)


def _check_untouched(model: Model, reg: _Registry) -> None:
    if reg.base_depth > 0:
        raise EditStateError("edits cannot be applied or reverted inside base_weights()")
    for name, expected in reg.written.items():
        if not torch.equal(_read(model, name), expected):
            raise EditStateError(
                f"{name} was changed outside rome_lens after an edit was applied; refusing to "
                "overwrite it (call rome_lens.revert_all only if you want to discard that change)"
            )


def _rewrite(model: Model, reg: _Registry, name: str) -> None:
    """Set weight ``name`` to original + the changes of the applied edits on it, in order."""
    original = reg.originals[name]
    weight = original.clone()
    for edit in reg.applied:
        for site in edit.sites:
            if site.name == name:
                weight += site.delta().to(original.device, original.dtype)
    _write(model, name, weight)
    reg.written[name] = weight


def _add_last(model: Model, reg: _Registry, edit: Edit, name: str) -> None:
    """Add the change of ``edit`` (the last applied) to weight ``name``.

    ``written + D_n`` performs the same additions in the same order as :func:`_rewrite`, so it
    is bit-identical, without re-adding every earlier edit (long sequences stay linear).
    """
    if name not in reg.written:
        _rewrite(model, reg, name)
        return
    previous = reg.written[name]
    weight = previous.clone()
    for site in edit.sites:
        if site.name == name:
            weight += site.delta().to(previous.device, previous.dtype)
    _write(model, name, weight)
    reg.written[name] = weight


def check_compatible(model: Model, edit: Edit) -> None:
    """Raise unless every site of ``edit`` fits ``model`` and the base weights match.

    Raises:
        FingerprintMismatchError: a layer outside the model, a shape mismatch, or an edit
            computed on other base weights.
    """
    n_layers = access.n_layers(model)
    for site in edit.sites:
        if not 0 <= site.layer < n_layers:
            raise FingerprintMismatchError(
                f"edit {edit.id} changes layer {site.layer}; the model has {n_layers} layers"
            )
        shape = tuple(access.read_mlp_out(model, site.layer).shape)
        if site.shape != shape:
            raise FingerprintMismatchError(
                f"edit {edit.id}: change of shape {site.shape} does not fit {site.name} {shape}"
            )
    actual = base_fingerprint(model)
    if actual != edit.base_fingerprint:
        raise FingerprintMismatchError(
            f"model fingerprint mismatch: the edit was computed on weights "
            f"{edit.base_fingerprint} ({edit.model_name}), this model's unedited weights are "
            f"{actual}"
        )


def apply_edit(model: Model, edit: Edit) -> None:
    """Add ``edit`` to the model's stack and rewrite the weights it touches (exact)."""
    check_compatible(model, edit)
    reg = _registry(model) or _create_registry(model)
    _check_untouched(model, reg)
    if any(e.id == edit.id for e in reg.applied):
        raise EditStateError(f"edit {edit.id} is already applied to this model")
    missing = [p for p in edit.parents if p not in {e.id for e in reg.applied}]
    if missing:
        logger.warning("edit %s was computed with edits %s applied, which are not applied now",
                       edit.id, ", ".join(missing))
    names = list(dict.fromkeys(site.name for site in edit.sites))
    for name in names:
        if name not in reg.originals:
            reg.originals[name] = _read(model, name).clone()
            reg.touched.add(name)
    reg.applied.append(edit)
    try:
        for name in names:
            _add_last(model, reg, edit, name)
    except BaseException:
        reg.applied.pop()
        _restore(model, reg, names)
        raise
    logger.info("applied %s", edit)


def _restore(model: Model, reg: _Registry, names: list[str]) -> None:
    """Rewrite ``names`` from the edits still applied; forget weights no edit touches."""
    for name in names:
        if any(site.name == name for e in reg.applied for site in e.sites):
            _rewrite(model, reg, name)
        else:
            _write(model, name, reg.originals.pop(name))
            reg.written.pop(name, None)
    if not reg.applied:
        _drop_registry(model, reg)


def _drop_registry(model: Model, reg: _Registry) -> None:
    """Forget the registry once every weight is back, keeping the known base fingerprint.

    The written weights are bit-identical to the originals again, so when no other parameter
    changed since the fingerprint was cached, it still holds: no rehash of the whole model
    (~1 s for 270M parameters) at the next edit.
    """
    object.__delattr__(model, _REGISTRY_ATTR)
    cached = model.__dict__.get(_FINGERPRINT_ATTR)
    if cached is None or cached[1] != reg.base_fingerprint:
        return
    now = _parameter_versions(model)
    changed = sum(a != b for a, b in zip(now, cached[0], strict=False))
    if len(now) == len(cached[0]) and changed <= len(reg.touched):
        object.__setattr__(model, _FINGERPRINT_ATTR, (now, reg.base_fingerprint))


def revert_edit(model: Model, edit: Edit) -> None:
    """Remove ``edit`` from the stack; the other applied edits stay, recomputed exactly."""
    reg = _registry(model)
    ids = [e.id for e in reg.applied] if reg else []
    if reg is None or edit.id not in ids:
        raise EditStateError(f"edit {edit.id} is not applied to this model")
    _check_untouched(model, reg)
    reg.applied.pop(ids.index(edit.id))
    _restore(model, reg, list(dict.fromkeys(site.name for site in edit.sites)))
    logger.info("reverted %s", edit)
