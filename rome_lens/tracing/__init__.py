"""Locating facts: causal tracing and activation patching."""

from rome_lens.tracing.causal import (
    KINDS,
    CausalTraceResult,
    causal_trace,
    embedding_std,
    restored_probability,
)
from rome_lens.tracing.patching import activation_patch

__all__ = [
    "KINDS",
    "CausalTraceResult",
    "activation_patch",
    "causal_trace",
    "embedding_std",
    "restored_probability",
]
