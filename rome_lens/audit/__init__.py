"""Audit: does the original fact survive an edit? Lenses, probes, attacks, verdicts.

And the health of a model under a sequence of edits (norms, fluency, disabling edits), and
forensics: :func:`scan` finds, reads and reverses edits from the weights alone.
"""

from rome_lens.audit.forensics import (
    Component,
    Finding,
    Recovery,
    ScanConfig,
    ScanReport,
    scan,
)
from rome_lens.audit.health import (
    DEFAULT_PROMPTS,
    EditHealth,
    Fluency,
    HealthMonitor,
    SiteHealth,
    generation_entropy,
    held_out_text,
    held_out_tokens,
    perplexity,
    site_health,
)
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
    "Component",
    "Finding",
    "Recovery",
    "ScanConfig",
    "ScanReport",
    "scan",
    "DEFAULT_PROMPTS",
    "EditHealth",
    "Fluency",
    "HealthMonitor",
    "SiteHealth",
    "generation_entropy",
    "held_out_text",
    "held_out_tokens",
    "perplexity",
    "site_health",
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
