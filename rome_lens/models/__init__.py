"""Model loading and the model-access layer."""

from rome_lens.models.loading import DEFAULT_MODEL, load_model

__all__ = ["DEFAULT_MODEL", "load_model"]
