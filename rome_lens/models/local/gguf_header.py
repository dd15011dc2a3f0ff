"""Reading chosen metadata fields of a GGUF file, and nothing else.

A GGUF file starts with its metadata: ``GGUF``, a version, the tensor and field counts, then
``(key, type, value)`` fields. ``general.architecture`` comes first in files written by
llama.cpp, so the architecture is known after a few bytes. A general-purpose reader parses every
field, and a 262k-token vocabulary alone takes seconds; this one stops as soon as it has the
fields asked for and skips the others without decoding them (seeking over numeric arrays).

Example:
    >>> read_fields(path, ("general.architecture",))      # doctest: +SKIP
    {'general.architecture': 'llama'}
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import IO, Any

from rome_lens.errors import UnsupportedModelError

# value type -> struct format of the scalar types (GGUF specification, versions 2 and 3)
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
            11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


def read_fields(path: Path, keys: tuple[str, ...]) -> dict[str, Any]:
    """The metadata fields ``keys`` of a GGUF file (absent ones are left out).

    Args:
        path: the GGUF file.
        keys: field names, e.g. ``("general.architecture",)``.

    Raises:
        UnsupportedModelError: the file is not a GGUF file of version 2 or 3 (little-endian).
    """
    try:
        with path.open("rb") as handle:
            return _read(handle, set(keys))
    except (struct.error, UnicodeDecodeError, OSError) as exc:
        raise UnsupportedModelError(f"{path} is not a readable GGUF file: {exc}") from exc


def _read(handle: IO[bytes], wanted: set[str]) -> dict[str, Any]:
    magic, version = handle.read(4), _unpack(handle, "<I")
    if magic != b"GGUF" or version not in (2, 3):
        raise UnsupportedModelError(
            f"not a GGUF file of version 2 or 3 (magic {magic!r}, version {version})"
        )
    _tensors, n_fields = _unpack(handle, "<Q"), _unpack(handle, "<Q")
    found: dict[str, Any] = {}
    for _ in range(n_fields):
        if len(found) == len(wanted):
            break
        key, kind = _string(handle), _unpack(handle, "<I")
        if key in wanted:
            found[key] = _value(handle, kind)
        else:
            _skip(handle, kind)
    return found


def _unpack(handle: IO[bytes], fmt: str) -> Any:
    size = struct.calcsize(fmt)
    return struct.unpack(fmt, handle.read(size))[0]


def _string(handle: IO[bytes]) -> str:
    return handle.read(_unpack(handle, "<Q")).decode("utf-8")


def _value(handle: IO[bytes], kind: int) -> Any:
    if kind in _SCALARS:
        return _unpack(handle, _SCALARS[kind])
    if kind == _STRING:
        return _string(handle)
    if kind == _ARRAY:
        item, count = _unpack(handle, "<I"), _unpack(handle, "<Q")
        return [_value(handle, item) for _ in range(count)]
    raise UnsupportedModelError(f"unknown GGUF value type {kind}")


def _skip(handle: IO[bytes], kind: int) -> None:
    if kind in _SCALARS:
        handle.seek(struct.calcsize(_SCALARS[kind]), 1)
    elif kind == _STRING:
        handle.seek(_unpack(handle, "<Q"), 1)
    elif kind == _ARRAY:
        item, count = _unpack(handle, "<I"), _unpack(handle, "<Q")
        if item in _SCALARS:
            handle.seek(count * struct.calcsize(_SCALARS[item]), 1)
        else:
            for _ in range(count):
                _skip(handle, item)
    else:
        raise UnsupportedModelError(f"unknown GGUF value type {kind}")
