"""Locating facts: causal tracing and activation patching.

Modules: :mod:`~rome_lens.tracing.noise` (the subject corruption),
:mod:`~rome_lens.tracing.restore` (the restoration engine both techniques share),
:mod:`~rome_lens.tracing.causal`, :mod:`~rome_lens.tracing.patching` and
:mod:`~rome_lens.tracing.dataset` (traces over many facts).
"""

from rome_lens.tracing.causal import (
    KINDS,
    CausalTraceResult,
    causal_trace,
    embedding_std,
    restored_probability,
)
from rome_lens.tracing.dataset import (
    TOKEN_CLASSES,
    Fact,
    TraceSummary,
    load_known_facts,
    trace_dataset,
)
from rome_lens.tracing.noise import subject_noise_hook
from rome_lens.tracing.patching import activation_patch

__all__ = [
    "KINDS",
    "TOKEN_CLASSES",
    "CausalTraceResult",
    "Fact",
    "TraceSummary",
    "activation_patch",
    "causal_trace",
    "embedding_std",
    "load_known_facts",
    "restored_probability",
    "subject_noise_hook",
    "trace_dataset",
]
