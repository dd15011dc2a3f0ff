"""Locating facts: causal tracing and activation patching."""

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
    "trace_dataset",
]
