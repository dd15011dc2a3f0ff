"""Audit: does the original fact survive an edit? Lenses, probes, attacks, verdicts."""

from rome_lens.audit.lens import (
    TunedLens,
    TunedLensConfig,
    logit_lens,
    train_tuned_lens,
    tuned_lens,
)
from rome_lens.audit.probe import (
    ERASURE,
    INSERTION,
    PARTIAL,
    EditLike,
    ProbeReport,
    VerdictRule,
    probe_edit,
)

__all__ = [
    "ERASURE",
    "INSERTION",
    "PARTIAL",
    "EditLike",
    "ProbeReport",
    "TunedLens",
    "TunedLensConfig",
    "VerdictRule",
    "logit_lens",
    "probe_edit",
    "train_tuned_lens",
    "tuned_lens",
]
