"""The edit value: what an editing method returns, for every method.

An :class:`Edit` is immutable. It holds one or more *sites* (a weight of a block and its change,
low-rank or dense), the requests it realises, the method and its hyperparameters, the
fingerprint of the BASE model it was computed on (the unedited weights) and the ids of the
edits that were applied to that model when it was computed (``parents``: an edit of a
sequence). Computing an edit never touches the model; applying is explicit, exact and
reversible in any order (see :mod:`rome_lens.edits.registry`).

Example:
    >>> edit = rome_lens.compute_edit(model, request)      # model unchanged
    >>> edit
    Edit(rome: 'Alice Smith' -> 'Paris'; blocks.1.mlp.W_out rank 1; id ...)
    >>> with edit.applied(model):                          # reverted even on exceptions
    ...     top = rome_lens.top_tokens(model, request.text)
    >>> path = edit.save("alice.safetensors")
    >>> same = rome_lens.load_edit("alice.safetensors", model=model)
    >>> same.id == edit.id
    True
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from jaxtyping import Float

from rome_lens._typing import Model
from rome_lens.edits import registry
from rome_lens.edits.files import read_edit_file, write_edit_file
from rome_lens.edits.sites import DenseSite, LowRankSite, Site, site_from_tensors
from rome_lens.errors import (
    CorruptEditFileError,
    EditStateError,
    FingerprintMismatchError,
    InvalidRequestError,
    RomeLensError,
)
from rome_lens.requests import EditRequest


def _frozen(mapping: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return MappingProxyType(dict(mapping or {}))


class Params(Mapping[str, Any]):
    """A method's hyperparameters: a read-only mapping whose keys are also attributes.

    Example:
        >>> p = Params({"layer": 1, "v_lr": 0.5})
        >>> p.layer, p["v_lr"]
        (1, 0.5)
    """

    def __init__(self, values: Mapping[str, Any] | None = None) -> None:
        object.__setattr__(self, "_values", dict(values or {}))

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["_values"][name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("hyperparameters of an edit are read-only")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mapping) and dict(self._values) == dict(other)

    __hash__ = None  # type: ignore[assignment]  # a mapping of possibly unhashable values

    def __repr__(self) -> str:
        return f"Params({self._values!r})"


@dataclass(frozen=True, eq=False, repr=False)
class Edit:
    """An edit of any method: sites, requests, provenance. Apply, revert, stack, save.

    Attributes:
        sites: the weights changed and their changes.
        requests: the facts the edit writes.
        method: the editing method's registered name (``"rome"``, ``"ft-l"``, ...).
        hparams: the method's hyperparameters (a read-only, JSON-able mapping).
        base_fingerprint: fingerprint of the unedited weights of the model it was computed on.
        parents: ids of the edits applied to that model when it was computed.
        model_name: the model's name (informational).
        info: diagnostics (losses, timings, ...), JSON-able, read-only.
        tensors: named tensors the method keeps for audits (ROME: ``k_star``, ``v_star``).
    """

    sites: tuple[Site, ...]
    requests: tuple[EditRequest, ...]
    method: str
    hparams: Mapping[str, Any]
    base_fingerprint: str
    parents: tuple[str, ...] = ()
    model_name: str = ""
    info: Mapping[str, Any] = field(default_factory=dict)
    tensors: Mapping[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sites", tuple(self.sites))
        object.__setattr__(self, "requests", tuple(self.requests))
        object.__setattr__(self, "parents", tuple(self.parents))
        object.__setattr__(self, "hparams", Params(self.hparams))
        object.__setattr__(self, "info", _frozen(self.info))
        object.__setattr__(self, "tensors", _frozen(self.tensors))
        if not self.sites:
            raise InvalidRequestError("an edit needs at least one site")
        names = [site.name for site in self.sites]
        if len(set(names)) != len(names):
            raise InvalidRequestError(f"an edit has at most one site per weight, got {names}")
        if any(not isinstance(r, EditRequest) for r in self.requests):
            raise InvalidRequestError("requests must be EditRequest values")

    # ------------------------------------------------------------------ identity
    @property
    def id(self) -> str:
        """Content hash (method, base weights, changes): equal ids mean the same edit."""
        digest = hashlib.sha256(f"{self.method}:{self.base_fingerprint}".encode())
        for site in self.sites:
            digest.update(site.digest().encode())
        return digest.hexdigest()[:16]

    @property
    def layers(self) -> tuple[int, ...]:
        """The edited blocks, ascending."""
        return tuple(sorted({site.layer for site in self.sites}))

    @property
    def layer(self) -> int:
        """The lowest edited block (the layer an edit "is at" for probes and plots)."""
        return self.layers[0]

    @property
    def request(self) -> EditRequest:
        """The first request (the only one for a single-fact edit)."""
        if not self.requests:
            raise EditStateError(f"edit {self.id} carries no request")
        return self.requests[0]

    @property
    def fingerprint(self) -> str:
        """Alias of :attr:`base_fingerprint`."""
        return self.base_fingerprint

    @property
    def weight_name(self) -> str:
        """Name of the edited weight (single-site edits)."""
        return self._single_site().name

    # ------------------------------------------------------------------ the change
    def _single_site(self) -> Site:
        if len(self.sites) != 1:
            raise EditStateError(
                f"edit {self.id} has {len(self.sites)} sites; use edit.sites[i].delta()"
            )
        return self.sites[0]

    def delta(self) -> Float[torch.Tensor, "d_in d_out"]:
        """The weight change of a single-site edit (``edit.sites[i].delta()`` otherwise)."""
        return self._single_site().delta()

    def _rank_one(self) -> LowRankSite:
        site = self._single_site()
        if not isinstance(site, LowRankSite) or site.rank != 1:
            raise EditStateError(f"edit {self.id} is not a single rank-one change")
        return site

    @property
    def left(self) -> Float[torch.Tensor, " d_mlp"]:
        """ROME's key-side factor ``C^-1 k* / (k*^T C^-1 k*)`` (single rank-one edits)."""
        return self._rank_one().left[:, 0]

    @property
    def right(self) -> Float[torch.Tensor, " d_model"]:
        """ROME's value-side factor ``v* - v(k*)`` (single rank-one edits)."""
        return self._rank_one().right[0]

    @property
    def k_star(self) -> torch.Tensor:
        """The subject key(s) the method recorded (ROME: k*)."""
        return self._tensor("k_star")

    @property
    def v_star(self) -> torch.Tensor:
        """The target value(s) the method recorded (ROME: v*)."""
        return self._tensor("v_star")

    def keys_at(self, layer: int) -> Float[torch.Tensor, "n d_mlp"] | None:
        """The keys this edit wrote associations for at ``layer`` (``None``: none recorded).

        Many-edit methods record ``keys.L{layer}`` for each edited layer; ROME records its k*
        at its one layer. AlphaEdit reads these to keep earlier edits in place.
        """
        name = f"keys.L{layer}"
        if name in self.tensors:
            return self.tensors[name]
        if "k_star" in self.tensors and layer in self.layers and len(self.layers) == 1:
            k = self.tensors["k_star"]
            return k[None] if k.ndim == 1 else k
        return None

    def _tensor(self, name: str) -> torch.Tensor:
        if name not in self.tensors:
            raise AttributeError(f"a {self.method} edit records no {name}")
        return self.tensors[name]

    # ------------------------------------------------------------------ model state
    def is_applied(self, model: Model) -> bool:
        """Whether this edit is currently applied to ``model``."""
        return self.id in registry.applied_ids(model)

    def apply(self, model: Model) -> Edit:
        """Apply the edit in place, on top of the edits already applied. The edit is unchanged.

        Returns:
            The edit itself (for chaining).

        Raises:
            EditStateError: already applied, or the weights were changed outside rome_lens.
            FingerprintMismatchError: the model is not the one the edit was computed on.
        """
        registry.apply_edit(model, self)
        return self

    def revert(self, model: Model) -> None:
        """Undo the edit; the other applied edits stay, recomputed exactly.

        Raises:
            EditStateError: the edit is not applied, or the weights were changed outside
                rome_lens.
        """
        registry.revert_edit(model, self)

    @contextmanager
    def applied(self, model: Model) -> Iterator[Model]:
        """Context manager: apply on entry, revert on exit (even after an exception)."""
        self.apply(model)
        try:
            yield model
        finally:
            self.revert(model)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Save as safetensors with JSON metadata and a checksum (:mod:`rome_lens.edits.files`).

        Returns:
            The path written (``.safetensors`` appended if missing).
        """
        tensors = {f"site{i}.{role}": t for i, site in enumerate(self.sites)
                   for role, t in site.tensors().items()}
        tensors |= {f"extra.{name}": t for name, t in self.tensors.items()}
        return write_edit_file(path, self.metadata(), tensors)

    def metadata(self) -> dict[str, Any]:
        """JSON-able description of the edit (everything but the tensors)."""
        return {
            "method": self.method,
            "sites": [site.describe() for site in self.sites],
            "requests": [r.to_dict() for r in self.requests],
            "hparams": dict(self.hparams),
            "base_fingerprint": self.base_fingerprint,
            "parents": list(self.parents),
            "model_name": self.model_name,
            "info": dict(self.info),
            "tensors": sorted(self.tensors),
        }

    def __repr__(self) -> str:
        if len(self.requests) == 1:
            r = self.requests[0]
            what = f"{r.subject!r} -> {r.target_new!r}"
        else:
            what = f"{len(self.requests)} requests"
        sites = ", ".join(
            f"{s.name} rank {s.rank}" if s.kind == "low_rank" else f"{s.name} dense"
            for s in self.sites[:3]
        ) + (f", ... ({len(self.sites)} sites)" if len(self.sites) > 3 else "")
        after = f"; after {len(self.parents)} edits" if self.parents else ""
        return f"Edit({self.method}: {what}; {sites}{after}; id {self.id[:8]})"


def combine(edits: Sequence[Edit], method: str | None = None) -> Edit:
    """One edit that applies the changes of ``edits`` together (same base model).

    Sites on the same weight are merged: low-rank factors are concatenated, anything with a
    dense part becomes dense.

    Raises:
        FingerprintMismatchError: the edits were computed on different base models.
    """
    if not edits:
        raise InvalidRequestError("combine needs at least one edit")
    if len({e.base_fingerprint for e in edits}) != 1:
        raise FingerprintMismatchError("cannot combine edits of different base models")
    by_name: dict[str, list[Site]] = {}
    for edit in edits:
        for site in edit.sites:
            by_name.setdefault(site.name, []).append(site)
    sites: list[Site] = []
    for group in by_name.values():
        first = group[0]
        if all(isinstance(s, LowRankSite) for s in group):
            left = torch.cat([s.left for s in group if isinstance(s, LowRankSite)], dim=1)
            right = torch.cat([s.right for s in group if isinstance(s, LowRankSite)], dim=0)
            sites.append(LowRankSite(first.layer, left, right, first.weight))
        else:
            total = sum((s.delta() for s in group[1:]), group[0].delta().clone())
            sites.append(DenseSite(first.layer, total, first.weight))
    return Edit(
        sites=tuple(sites),
        requests=tuple(r for e in edits for r in e.requests),
        method=method or "+".join(dict.fromkeys(e.method for e in edits)),
        hparams={},
        base_fingerprint=edits[0].base_fingerprint,
        parents=edits[0].parents,
        model_name=edits[0].model_name,
        info={"combined": [e.id for e in edits]},
    )


def load_edit(path: str | os.PathLike[str], model: Model | None = None) -> Edit:
    """Load an edit written by :meth:`Edit.save` (or by the first release's ``RomeEdit.save``).

    Args:
        path: the ``.safetensors`` file.
        model: if given, the edit must fit this model (layers, shapes, base fingerprint).

    Raises:
        CorruptEditFileError: unreadable file, unknown format version, missing fields, or a
            checksum mismatch.
        FingerprintMismatchError: ``model`` is not the model the edit was computed on.
    """
    meta, tensors = read_edit_file(path)
    try:
        edit = _edit_from_file(meta, tensors)
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, FingerprintMismatchError) or not isinstance(exc, RomeLensError):
            raise CorruptEditFileError(f"{path}: malformed edit file ({exc!r})") from exc
        raise CorruptEditFileError(f"{path}: {exc}") from exc
    if model is not None:
        registry.check_compatible(model, edit)
    return edit


def _edit_from_file(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Edit:
    sites = []
    for i, description in enumerate(meta["sites"]):
        prefix = f"site{i}."
        own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        sites.append(site_from_tensors(description, own))
    return Edit(
        sites=tuple(sites),
        requests=tuple(EditRequest.from_dict(r) for r in meta["requests"]),
        method=str(meta["method"]),
        hparams=dict(meta["hparams"]),
        base_fingerprint=str(meta["base_fingerprint"]),
        parents=tuple(meta.get("parents", [])),
        model_name=str(meta.get("model_name", "")),
        info=dict(meta.get("info", {})),
        tensors={name: tensors[f"extra.{name}"] for name in meta.get("tensors", [])},
    )
