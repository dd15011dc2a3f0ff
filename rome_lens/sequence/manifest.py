"""The folder of a saved edit sequence: one edit file per edit and a JSON manifest.

Layout (format ``rome_lens.EditSequence/1``)::

    folder/
      sequence.json                  the manifest: format, method, base fingerprint, model name,
                                     the edits in order (file, id, method, number of requests),
                                     the health records and the health monitor's settings
      0000-<edit id>.safetensors     each edit, as written by Edit.save (checksummed)
      0001-<edit id>.safetensors
      ...

The manifest is written last (through a temporary file), so a folder with a manifest has every
file it lists. :func:`read_manifest` checks the manifest itself; the edit files are checked when
they are loaded (their checksum, their id against the manifest, their base model).

Example:
    >>> edit_file_name(3, "0123456789abcdef")
    '0003-0123456789abcdef.safetensors'
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rome_lens.audit.health import EditHealth
from rome_lens.edits import Edit
from rome_lens.errors import CorruptEditFileError

FORMAT = "rome_lens.EditSequence/1"
MANIFEST_NAME = "sequence.json"


def edit_file_name(index: int, edit_id: str) -> str:
    """File name of the ``index``-th edit of a sequence (the order is visible in a listing)."""
    return f"{index:04d}-{edit_id}.safetensors"


@dataclass(frozen=True)
class ManifestEntry:
    """One edit of a saved sequence.

    Attributes:
        file: the edit file, relative to the folder.
        id: the edit's id (the file must hold exactly this edit).
        method: the edit's method (informational).
        n_requests: how many requests the edit realises (informational).
    """

    file: str
    id: str
    method: str = ""
    n_requests: int = 0


@dataclass(frozen=True)
class Manifest:
    """The contents of ``sequence.json``.

    Attributes:
        method: the sequence's editing method.
        entries: the edits, in application order.
        health: the health records of the edits that were monitored.
        monitor: the health monitor's settings (``None``: the sequence was not monitored).
        base_fingerprint: fingerprint of the unedited model.
        model_name: the model's name (informational).
    """

    method: str
    entries: tuple[ManifestEntry, ...]
    health: tuple[EditHealth, ...] = ()
    monitor: dict[str, Any] | None = None
    base_fingerprint: str = ""
    model_name: str = ""

    def to_json(self) -> str:
        """The manifest's JSON text."""
        return json.dumps({
            "format": FORMAT,
            "method": self.method,
            "base_fingerprint": self.base_fingerprint,
            "model_name": self.model_name,
            "edits": [vars(entry) for entry in self.entries],
            "health": [record.to_dict() for record in self.health],
            "monitor": self.monitor,
        }, indent=1)


def manifest_for(
    edits: Sequence[Edit],
    method: str,
    health: Sequence[EditHealth],
    monitor: dict[str, Any] | None,
) -> Manifest:
    """The manifest of ``edits`` saved in order under :func:`edit_file_name` names."""
    entries = tuple(ManifestEntry(edit_file_name(i, e.id), e.id, e.method, len(e.requests))
                    for i, e in enumerate(edits))
    first = edits[0] if edits else None
    return Manifest(method, entries, tuple(health), monitor,
                    first.base_fingerprint if first else "", first.model_name if first else "")


def write_manifest(folder: str | os.PathLike[str], manifest: Manifest) -> Path:
    """Write ``sequence.json`` into ``folder`` (atomically: a temporary file, then a rename)."""
    target = Path(folder) / MANIFEST_NAME
    partial = target.with_name(MANIFEST_NAME + ".partial")
    partial.write_text(manifest.to_json(), encoding="utf-8")
    partial.replace(target)
    return target


def read_manifest(folder: str | os.PathLike[str]) -> Manifest:
    """Read and check ``folder/sequence.json``.

    Raises:
        FileNotFoundError: no manifest in ``folder``.
        CorruptEditFileError: unreadable JSON, unknown format, missing or malformed fields,
            the same edit listed twice, a listed file that does not exist, or health records
            of edits the sequence does not hold.
    """
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no saved edit sequence here (no {MANIFEST_NAME})")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptEditFileError(f"{path}: unreadable sequence manifest ({exc})") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise CorruptEditFileError(
            f"{path}: unknown sequence manifest format {found!r}; expected {FORMAT!r}"
        )
    try:
        manifest = _parse(data)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CorruptEditFileError(f"{path}: malformed sequence manifest ({exc!r})") from exc
    _check(path, manifest)
    return manifest


def _parse(data: dict[str, Any]) -> Manifest:
    entries = tuple(
        ManifestEntry(str(e["file"]), str(e["id"]), str(e.get("method", "")),
                      int(e.get("n_requests", 0)))
        for e in data["edits"]
    )
    monitor = data.get("monitor")
    if monitor is not None and not isinstance(monitor, dict):
        raise TypeError(f"monitor settings must be an object, got {type(monitor).__name__}")
    return Manifest(
        method=str(data["method"]),
        entries=entries,
        health=tuple(EditHealth.from_dict(record) for record in data.get("health", [])),
        monitor=monitor,
        base_fingerprint=str(data.get("base_fingerprint", "")),
        model_name=str(data.get("model_name", "")),
    )


def _check(path: Path, manifest: Manifest) -> None:
    ids = [entry.id for entry in manifest.entries]
    repeated = sorted({i for i in ids if ids.count(i) > 1})
    if repeated:
        raise CorruptEditFileError(f"{path}: the manifest lists edit(s) {repeated} twice")
    for i, entry in enumerate(manifest.entries):
        file = path.parent / entry.file
        if Path(entry.file).name != entry.file or not file.is_file():
            raise CorruptEditFileError(
                f"{path}: edit {i} ({entry.id}) names file {entry.file!r}, which is not a file "
                "in the sequence folder"
            )
    strangers = sorted({r.edit_id for r in manifest.health} - set(ids))
    if strangers:
        raise CorruptEditFileError(
            f"{path}: health records of edits {strangers}, which the sequence does not hold"
        )
