"""Local checkpoints of any size: GGUF files and Hugging Face folders of supported families.

:func:`checkpoint_family` tells a checkpoint's family from its metadata alone (and refuses an
unsupported one before any weight is read); :mod:`.hooked` builds a HookedTransformer from the
checkpoint's own configuration when TransformerLens has no name for it. The families are one
table, :data:`FAMILIES`.
"""

from rome_lens.models.local.checkpoint import checkpoint_family, load_tokenizer
from rome_lens.models.local.families import FAMILIES, Family, family_of, supported_text
from rome_lens.models.local.gguf_header import read_fields

__all__ = [
    "FAMILIES",
    "Family",
    "checkpoint_family",
    "family_of",
    "load_tokenizer",
    "read_fields",
    "supported_text",
]
