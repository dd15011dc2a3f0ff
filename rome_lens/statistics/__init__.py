"""Shared statistics of a base model: corpus, context prefixes, key second moments.

Everything here belongs to the UNEDITED model: it is computed on the base weights (the edit
registry restores them exactly while it runs) and cached per base-model fingerprint, so it is
computed once per model and reused by every method (ROME, FT-L, the tuned lens, probes, and the
many-edit methods) under any stack of applied edits.
"""

from rome_lens.statistics.contexts import ContextSpec, context_templates
from rome_lens.statistics.corpus import Corpus, CorpusSize, StatisticsConfig, corpus_tokens
from rome_lens.statistics.moments import second_moment, second_moments
from rome_lens.statistics.projection import null_space_basis, null_space_projector

__all__ = [
    "ContextSpec",
    "Corpus",
    "CorpusSize",
    "StatisticsConfig",
    "context_templates",
    "corpus_tokens",
    "null_space_basis",
    "null_space_projector",
    "second_moment",
    "second_moments",
]
