"""ROME: rank-one model editing of an MLP output weight."""

from rome_lens.rome.compute import compute_rome, rank_one_factors
from rome_lens.rome.edit import RomeEdit, applied_edits, base_fingerprint, load_edit, revert_all
from rome_lens.rome.hparams import RomeHyperParams, default_hparams
from rome_lens.rome.statistics import second_moment

__all__ = [
    "RomeEdit",
    "RomeHyperParams",
    "applied_edits",
    "base_fingerprint",
    "compute_rome",
    "default_hparams",
    "load_edit",
    "rank_one_factors",
    "revert_all",
    "second_moment",
]
