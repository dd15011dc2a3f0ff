"""Edits as values: sites, the edit registry, apply/revert/stack, files.

Every editing method returns an :class:`Edit`; see :mod:`rome_lens.edits.value` for the value,
:mod:`rome_lens.edits.registry` for exact apply/revert and the base model, and
:mod:`rome_lens.edits.files` for the file format.
"""

from rome_lens.edits.registry import (
    applied_edits,
    applied_ids,
    base_fingerprint,
    base_weights,
    check_compatible,
    revert_all,
)
from rome_lens.edits.sites import DenseSite, LowRankSite, Site
from rome_lens.edits.value import Edit, combine, load_edit

__all__ = [
    "DenseSite",
    "Edit",
    "LowRankSite",
    "Site",
    "applied_edits",
    "applied_ids",
    "base_fingerprint",
    "base_weights",
    "check_compatible",
    "combine",
    "load_edit",
    "revert_all",
]
