"""Edit forensics: find, read and reverse edits from a model's weights (REFERENCE.md §8).

An audit of a model rather than of one known edit, so it lives in :mod:`rome_lens.audit`
beside the probes and the health monitor: :func:`scan` (in :mod:`.scan`) compares the weights
with the base weights when they are known, or reads the spectra of the MLP output weights
alone; :mod:`.spectrum` holds the statistics, :mod:`.decode` the token and subject read-outs,
:mod:`.report` the values returned.

Example:
    >>> report = scan(model, candidates=["Alice Smith", "Bob Jones"])   # an unedited model
    >>> report
    ScanReport(spectrum, 0 findings)
"""

from rome_lens.audit.forensics.report import (
    Component,
    Finding,
    Recovery,
    ScanConfig,
    ScanReport,
)
from rome_lens.audit.forensics.scan import scan
from rome_lens.audit.forensics.spectrum import numerical_rank, outlier_scores

__all__ = [
    "Component",
    "Finding",
    "Recovery",
    "ScanConfig",
    "ScanReport",
    "numerical_rank",
    "outlier_scores",
    "scan",
]
