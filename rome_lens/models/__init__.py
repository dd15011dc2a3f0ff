"""Model loading and the model-access layer.

:mod:`~rome_lens.models.access` is the one facade the rest of rome_lens uses to reach into a
model; it delegates to one adapter per model API (:mod:`~rome_lens.models.adapters`:
HookedTransformer, TransformerBridge). :mod:`~rome_lens.models.layout` holds the names that do
not depend on the API (hook names, layer checks).
"""

from rome_lens.models.loading import DEFAULT_MODEL, load_model, source_sha256

__all__ = ["DEFAULT_MODEL", "load_model", "source_sha256"]
