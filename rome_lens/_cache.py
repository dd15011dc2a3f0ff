"""On-disk cache: location and atomic writes.

Everything rome_lens caches (converted models, key statistics, context templates) lives under one
directory, ``$ROME_LENS_CACHE`` or ``~/.cache/rome_lens``. Files are written to a temporary name
in the same directory and renamed into place, so an interrupted run never leaves a truncated
file that a later run would trust.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

CACHE_ENV = "ROME_LENS_CACHE"


def cache_dir(sub: str | None = None) -> Path:
    """Return the cache directory (created if needed).

    Args:
        sub: optional sub-directory name.

    Returns:
        ``$ROME_LENS_CACHE`` (or ``~/.cache/rome_lens``), joined with ``sub``.

    Example:
        >>> import rome_lens
        >>> rome_lens.cache_dir("targets").name
        'targets'
    """
    root = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "rome_lens")
    path = root / sub if sub else root
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path that is renamed to ``target`` only if the block succeeds."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temporary directory that is renamed to ``target`` only if the block succeeds."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
