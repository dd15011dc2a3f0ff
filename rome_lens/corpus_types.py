"""Type of the ``corpus`` argument shared by statistics, lenses and benchmarks."""

from __future__ import annotations

import os
from collections.abc import Sequence

Corpus = str | Sequence[str | os.PathLike[str]] | None
