"""ROME edits as values: apply, revert (bit-exact), stack, save and load.

A :class:`RomeEdit` is the rank-one change ``delta W = outer(left, right)`` of one block's MLP
output weight, together with everything needed to audit it: the request, the layer, the
hyperparameters, the key k* and value v*, and a fingerprint of the (unedited) weights it was
computed on. Computing an edit never touches the model; applying is explicit.

Exact restoration: floating-point ``(W + D) - D`` is not ``W``. So the first edit applied to a
layer stores a copy of that layer's original weight on the model (the *edit registry*), and
every apply/revert recomputes the layer as ``original + D_1 + D_2 + ...`` over the edits still
applied, in the order they were applied. Reverting every edit therefore restores the original
bit for bit, and reverting any subset in any order gives exactly the weights of applying the rest.
The registry also remembers the weight it last wrote, and refuses to continue if something else
changed it in between (rather than silently discarding that change).

Example:
    >>> edit = compute_rome(model, request)
    >>> edit.apply(model)                # in place
    >>> edit.revert(model)               # bit-exact
    >>> with edit.applied(model):        # restored even on exceptions
    ...     logits = model("The Eiffel Tower is located in the city of")
    >>> edit.save("eiffel.safetensors"); edit2 = load_edit("eiffel.safetensors", model=model)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float

from rome_lens._typing import Model
from rome_lens.errors import CorruptEditFileError, EditStateError, FingerprintMismatchError
from rome_lens.models import access
from rome_lens.requests import EditRequest
from rome_lens.rome.hparams import RomeHyperParams

logger = logging.getLogger(__name__)

_REGISTRY_ATTR = "_rome_lens_registry"
_FORMAT = "rome_lens.RomeEdit/1"
_TENSORS = ("left", "right", "k_star", "v_star")


@dataclass
class _Registry:
    """Per-model record of applied edits (stored as an attribute of the model)."""

    originals: dict[str, torch.Tensor] = field(default_factory=dict)
    written: dict[str, torch.Tensor] = field(default_factory=dict)
    applied: list[RomeEdit] = field(default_factory=list)


def _registry(model: Model, create: bool = False) -> _Registry | None:
    reg = model.__dict__.get(_REGISTRY_ATTR)
    if reg is None and create:
        reg = _Registry()
        object.__setattr__(model, _REGISTRY_ATTR, reg)
    return reg


def base_fingerprint(model: Model) -> str:
    """Fingerprint of the model's weights with every rome_lens edit removed."""
    reg = _registry(model)
    return access.weights_fingerprint(model, reg.originals if reg else None)


def applied_edits(model: Model) -> list[RomeEdit]:
    """The edits currently applied to ``model``, in application order."""
    reg = _registry(model)
    return list(reg.applied) if reg else []


def revert_all(model: Model) -> None:
    """Revert every applied edit; the edited weights become bit-identical to the originals."""
    reg = _registry(model)
    if reg is None:
        return
    _check_untouched(model, reg)
    for name, original in reg.originals.items():
        _write(model, name, original)
    object.__delattr__(model, _REGISTRY_ATTR)


def _read(model: Model, name: str) -> torch.Tensor:
    """The edited weight ``name`` in [d_mlp, d_model] layout, whatever the model API."""
    return access.read_mlp_out(model, access.layer_of_weight_name(name))


def _write(model: Model, name: str, value: torch.Tensor) -> None:
    access.write_mlp_out(model, access.layer_of_weight_name(name), value)


def _check_untouched(model: Model, reg: _Registry) -> None:
    for name, expected in reg.written.items():
        if not torch.equal(_read(model, name), expected):
            raise EditStateError(
                f"{name} was changed outside rome_lens after an edit was applied; refusing to "
                "overwrite it (call rome_lens.revert_all only if you want to discard that change)"
            )


def _rewrite(model: Model, reg: _Registry, name: str) -> None:
    """Set parameter ``name`` to original + the deltas of the applied edits on it, in order."""
    weight = reg.originals[name].clone()
    for edit in reg.applied:
        if edit.weight_name == name:
            weight += edit.delta()
    _write(model, name, weight)
    reg.written[name] = weight


@dataclass(eq=False)
class RomeEdit:
    """A rank-one edit of ``blocks[layer].mlp.W_out``: ``delta W = outer(left, right)``.

    Attributes:
        layer: edited block.
        left: ``C^-1 k* / (k*^T C^-1 k*)``, length d_mlp.
        right: ``v* - v(k*)``, length d_model.
        k_star: the averaged key of the subject.
        v_star: the target value (raw MLP output) for k*.
        request: the fact rewritten.
        hparams: hyperparameters used.
        fingerprint: fingerprint of the unedited weights the edit was computed on.
        model_name: the model's name (informational).
        info: losses, timings and other diagnostics.
    """

    layer: int
    left: Float[torch.Tensor, " d_mlp"]
    right: Float[torch.Tensor, " d_model"]
    k_star: Float[torch.Tensor, " d_mlp"]
    v_star: Float[torch.Tensor, " d_model"]
    request: EditRequest
    hparams: RomeHyperParams
    fingerprint: str
    model_name: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def weight_name(self) -> str:
        """State-dict name of the edited parameter."""
        return access.mlp_out_weight_name(self.layer)

    @property
    def id(self) -> str:
        """Content hash: two edits with the same id are the same edit."""
        digest = hashlib.sha256(f"{self.layer}:{self.fingerprint}".encode())
        for name in ("left", "right"):
            digest.update(getattr(self, name).detach().cpu().float().numpy().tobytes())
        return digest.hexdigest()[:16]

    def delta(self) -> Float[torch.Tensor, "d_mlp d_model"]:
        """The weight change ``outer(left, right)`` in TransformerLens layout [d_mlp, d_model]."""
        return torch.outer(self.left, self.right)

    def is_applied(self, model: Model) -> bool:
        """Whether this edit is currently applied to ``model``."""
        return any(e.id == self.id for e in applied_edits(model))

    def _check_compatible(self, model: Model) -> None:
        if not 0 <= self.layer < access.n_layers(model):
            raise FingerprintMismatchError(
                f"edit is for layer {self.layer}; the model has {access.n_layers(model)} layers"
            )
        weight = access.mlp_out_weight(model, self.layer)
        shape = (self.left.shape[0], self.right.shape[0])
        if tuple(weight.shape) != shape:
            raise FingerprintMismatchError(
                f"edit shape {shape} does not match {self.weight_name} {tuple(weight.shape)}"
            )
        actual = base_fingerprint(model)
        if actual != self.fingerprint:
            raise FingerprintMismatchError(
                f"model fingerprint mismatch: the edit was computed on weights {self.fingerprint}"
                f" ({self.model_name}), this model's unedited weights are {actual}"
            )

    def apply(self, model: Model) -> RomeEdit:
        """Apply the edit in place (stacks on top of edits already applied).

        Raises:
            EditStateError: the edit is already applied, or the weights were changed outside
                rome_lens since the last edit.
            FingerprintMismatchError: the model is not the one the edit was computed on.
        """
        self._check_compatible(model)
        reg = _registry(model, create=True)
        assert reg is not None
        _check_untouched(model, reg)
        if any(e.id == self.id for e in reg.applied):
            raise EditStateError(f"edit {self.id} is already applied to this model")
        name = self.weight_name
        device, dtype = access.mlp_out_weight(model, self.layer).device, self.left.dtype
        if name not in reg.originals:
            reg.originals[name] = access.mlp_out_weight(model, self.layer).detach().clone()
        self.left, self.right = self.left.to(device, dtype), self.right.to(device, dtype)
        reg.applied.append(self)
        _rewrite(model, reg, name)
        logger.info("applied ROME edit %s at layer %d", self.id, self.layer)
        return self

    def revert(self, model: Model) -> None:
        """Undo the edit; the other applied edits stay, recomputed exactly.

        Raises:
            EditStateError: the edit is not applied to this model, or the weights were changed
                outside rome_lens.
        """
        reg = _registry(model)
        ids = [e.id for e in reg.applied] if reg else []
        if reg is None or self.id not in ids:
            raise EditStateError(f"edit {self.id} is not applied to this model")
        _check_untouched(model, reg)
        reg.applied.pop(ids.index(self.id))
        name = self.weight_name
        if any(e.weight_name == name for e in reg.applied):
            _rewrite(model, reg, name)
        else:
            _write(model, name, reg.originals.pop(name))
            reg.written.pop(name, None)
        if not reg.applied:
            object.__delattr__(model, _REGISTRY_ATTR)
        logger.info("reverted ROME edit %s at layer %d", self.id, self.layer)

    @contextmanager
    def applied(self, model: Model) -> Iterator[Model]:
        """Context manager: apply on entry, revert on exit (even after an exception)."""
        self.apply(model)
        try:
            yield model
        finally:
            self.revert(model)

    # ------------------------------------------------------------------ serialisation
    def metadata(self) -> dict[str, Any]:
        """JSON-able description of the edit (everything but the tensors)."""
        return {
            "format": _FORMAT,
            "layer": self.layer,
            "request": self.request.to_dict(),
            "hparams": self.hparams.to_dict(),
            "fingerprint": self.fingerprint,
            "model_name": self.model_name,
            "weight_name": self.weight_name,
            "info": self.info,
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Save to a safetensors file with the JSON metadata in its header (no pickle).

        The header also holds a sha256 over the metadata and tensor bytes, which
        :func:`load_edit` checks.

        Returns:
            The path written (``.safetensors`` appended if missing).
        """
        from safetensors.torch import save_file

        target = Path(path)
        if target.suffix != ".safetensors":
            target = target.with_name(target.name + ".safetensors")
        tensors = {n: getattr(self, n).detach().cpu().contiguous() for n in _TENSORS}
        meta = json.dumps(self.metadata(), sort_keys=True)
        header = {"rome_lens": meta, "sha256": _checksum(meta, tensors)}
        target.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(target), metadata=header)
        return target


def _checksum(meta: str, tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256(meta.encode())
    for name in _TENSORS:
        digest.update(name.encode())
        digest.update(tensors[name].float().numpy().tobytes())
    return digest.hexdigest()


def load_edit(
    path: str | os.PathLike[str], model: Model | None = None
) -> RomeEdit:
    """Load an edit saved by :meth:`RomeEdit.save`.

    Args:
        path: the ``.safetensors`` file.
        model: if given, the edit's model fingerprint must match this model's.

    Raises:
        CorruptEditFileError: unreadable file, missing fields, or checksum mismatch.
        FingerprintMismatchError: ``model`` is not the model the edit was computed on.
    """
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in _TENSORS}
        meta_text = header["rome_lens"]
        expected = header["sha256"]
        meta = json.loads(meta_text)
    except FileNotFoundError:
        raise
    except Exception as exc:  # safetensors raises several types for damaged files
        raise CorruptEditFileError(f"{path} is not a readable rome_lens edit file: {exc}") from exc
    if meta.get("format") != _FORMAT:
        raise CorruptEditFileError(f"{path}: unknown format {meta.get('format')!r}")
    actual = _checksum(meta_text, tensors)
    if actual != expected:
        raise CorruptEditFileError(
            f"{path}: checksum mismatch (stored {expected[:12]}..., computed {actual[:12]}...): "
            "the file was modified or damaged"
        )
    edit = RomeEdit(
        layer=int(meta["layer"]),
        request=EditRequest.from_dict(meta["request"]),
        hparams=RomeHyperParams.from_dict(meta["hparams"]),
        fingerprint=str(meta["fingerprint"]),
        model_name=str(meta.get("model_name", "")),
        info=dict(meta.get("info", {})),
        **tensors,
    )
    if model is not None:
        edit._check_compatible(model)
    return edit
