"""One adapter per model API, behind one interface (:class:`ModelAdapter`).

rome_lens works on TransformerLens 3.9's ``HookedTransformer`` and on TransformerLens's
``TransformerBridge``. Everything that differs between them (where the MLP output weight is
stored, how to run a slice of the blocks, how to decode a residual, whether prefixes can be
frozen in a key-value cache) is a method of an adapter; :func:`adapter_for` picks the adapter of
a model. A new model API means one new adapter here, not branches spread over the package.
Code outside :mod:`rome_lens.models` goes through the facade :mod:`rome_lens.models.access`.

Example:
    >>> from rome_lens.models.adapters import adapter_for
    >>> adapter = adapter_for(model)
    >>> adapter.name, adapter.supports_frozen_prefix   # ('hooked', True) or ('bridge', False)
    ('...', ...)
"""

from __future__ import annotations

import weakref

from rome_lens.models.adapters.base import FrozenPrefix, KeyValueRecord, ModelAdapter
from rome_lens.models.adapters.bridge import BridgeAdapter
from rome_lens.models.adapters.hooked import HookedAdapter

# Tried in order; the first that matches serves the model. HookedAdapter matches anything, so
# it comes last (any model with HookedTransformer's interface is served by it).
ADAPTERS: tuple[ModelAdapter, ...] = (BridgeAdapter(), HookedAdapter())

# The adapters are stateless and hold no model, so the weak keys really let models go.
_CHOSEN: weakref.WeakKeyDictionary[object, ModelAdapter] = weakref.WeakKeyDictionary()


def adapter_for(model: object) -> ModelAdapter:
    """The adapter serving ``model`` (chosen once per model object)."""
    try:
        return _CHOSEN[model]
    except (KeyError, TypeError):  # TypeError: a model that cannot be weakly referenced
        pass
    chosen = next(adapter for adapter in ADAPTERS if adapter.matches(model))
    try:
        _CHOSEN[model] = chosen
    except TypeError:
        pass
    return chosen


__all__ = [
    "ADAPTERS",
    "BridgeAdapter",
    "FrozenPrefix",
    "HookedAdapter",
    "KeyValueRecord",
    "ModelAdapter",
    "adapter_for",
]
