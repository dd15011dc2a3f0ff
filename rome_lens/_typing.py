"""Type of the models rome_lens works on.

``Model`` is TransformerLens 3.9's ``HookedTransformer`` for the type checker (its interface is
what rome_lens's generic code calls) and ``Any`` at run time: the same code also receives a
``TransformerBridge`` (TransformerLens 4.x), and ``HookedTransformer`` may not be importable at
all. Everything that differs between the two lives in :mod:`rome_lens.models.access`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer as Model
else:
    Model = Any

__all__ = ["Model"]
