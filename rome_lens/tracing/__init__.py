"""Locating facts: causal tracing and activation patching."""

from rome_lens.tracing.causal import (
    KINDS,
    CausalTraceResult,
    causal_trace,
    embedding_std,
    restored_probability,
)

__all__ = ["KINDS", "CausalTraceResult", "causal_trace", "embedding_std", "restored_probability"]
