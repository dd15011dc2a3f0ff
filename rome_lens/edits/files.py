"""Edit files: one safetensors file per edit, JSON metadata in its header, a checksum.

Layout (format ``rome_lens.Edit/2``): tensors ``site{i}.{role}`` (``left``/``right`` of a
low-rank site, ``change`` of a dense one) and ``extra.{name}`` (the method's audit tensors);
header ``rome_lens`` = the JSON of the edit's metadata plus the format, and ``sha256`` over that
JSON and every tensor's bytes. No pickle. Files written by the first release
(``rome_lens.RomeEdit/1``: tensors ``left``, ``right``, ``k_star``, ``v_star``) are read too and
come back in the current layout, as rank-one ROME edits.

This module reads and writes files; :func:`rome_lens.edits.load_edit` turns them into edits.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from rome_lens.errors import CorruptEditFileError

FORMAT = "rome_lens.Edit/2"
LEGACY_FORMAT = "rome_lens.RomeEdit/1"
_LEGACY_TENSORS = ("left", "right", "k_star", "v_star")


def _checksum(meta: str, tensors: dict[str, torch.Tensor], names: Any = None) -> str:
    digest = hashlib.sha256(meta.encode())
    for name in names if names is not None else sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].float().numpy().tobytes())
    return digest.hexdigest()


def write_edit_file(
    path: str | os.PathLike[str], metadata: dict[str, Any], tensors: dict[str, torch.Tensor]
) -> Path:
    """Write one edit file (``.safetensors`` appended if missing); returns the path."""
    from safetensors.torch import save_file

    target = Path(path)
    if target.suffix != ".safetensors":
        target = target.with_name(target.name + ".safetensors")
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = json.dumps({"format": FORMAT, **metadata}, sort_keys=True)
    header = {"rome_lens": meta, "sha256": _checksum(meta, tensors)}
    target.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(target), metadata=header)
    return target


def _open(path: Path) -> tuple[dict[str, torch.Tensor], str, str, Any]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
        meta_text, expected = header["rome_lens"], header["sha256"]
        return tensors, meta_text, expected, json.loads(meta_text)
    except FileNotFoundError:
        raise
    except Exception as exc:  # safetensors raises several types for damaged files
        raise CorruptEditFileError(f"{path} is not a readable rome_lens edit file: {exc}") from exc


def read_edit_file(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read and verify an edit file; legacy files are converted to the current layout.

    Returns:
        ``(metadata, tensors)`` in the ``rome_lens.Edit/2`` layout.

    Raises:
        CorruptEditFileError: unreadable, unknown format version, or checksum mismatch.
    """
    path = Path(path)
    tensors, meta_text, expected, meta = _open(path)
    version = meta.get("format") if isinstance(meta, dict) else None
    if version not in (FORMAT, LEGACY_FORMAT):
        raise CorruptEditFileError(
            f"{path}: unknown edit file format {version!r}; this rome_lens reads {FORMAT!r} "
            f"and {LEGACY_FORMAT!r}"
        )
    names = _LEGACY_TENSORS if version == LEGACY_FORMAT else None
    try:
        actual = _checksum(meta_text, tensors, names)
    except KeyError as exc:
        raise CorruptEditFileError(f"{path}: missing tensor {exc}") from exc
    if actual != expected:
        raise CorruptEditFileError(
            f"{path}: checksum mismatch (stored {expected[:12]}..., computed {actual[:12]}...): "
            "the file was modified or damaged"
        )
    if version == LEGACY_FORMAT:
        return _from_legacy(path, meta, tensors)
    return meta, tensors


def _from_legacy(
    path: Path, meta: dict[str, Any], tensors: dict[str, torch.Tensor]
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A first-release ``RomeEdit`` file as the metadata and tensors of a rank-one ROME edit."""
    try:
        layer, right = int(meta["layer"]), tensors["right"]
        new_meta = {
            "format": LEGACY_FORMAT,
            "method": "rome",
            "sites": [{"kind": "low_rank", "layer": layer, "weight": "mlp.W_out", "rank": 1,
                       "shape": [int(tensors["left"].shape[0]), int(right.shape[0])]}],
            "requests": [meta["request"]],
            "hparams": meta["hparams"],
            "base_fingerprint": meta["fingerprint"],
            "parents": [],
            "model_name": meta.get("model_name", ""),
            "info": {**meta.get("info", {}), "file_format": LEGACY_FORMAT},
            "tensors": ["k_star", "v_star"],
        }
    except (KeyError, TypeError, ValueError) as exc:
        raise CorruptEditFileError(f"{path}: malformed {LEGACY_FORMAT} metadata ({exc!r})") from exc
    new_tensors = {
        "site0.left": tensors["left"][:, None],
        "site0.right": right[None, :],
        "extra.k_star": tensors["k_star"],
        "extra.v_star": tensors["v_star"],
    }
    return new_meta, new_tensors
