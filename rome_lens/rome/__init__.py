"""ROME: rank-one model editing of an MLP output weight.

Parts that other methods reuse: :mod:`~rome_lens.rome.prompts` (value and KL prompts, batched
over requests), :mod:`~rome_lens.rome.keys` (k*), :mod:`~rome_lens.rome.values` (v* and its
objectives), :mod:`~rome_lens.rome.forwards` (how the value loop runs the model) and
:mod:`~rome_lens.rome.update` (the closed-form rank-one solve).
"""

from rome_lens.rome.compute import compute_rome, compute_rome_edit
from rome_lens.rome.forwards import ValueLoop
from rome_lens.rome.hparams import (
    RomeHyperParams,
    default_hparams,
    default_precision,
    fast_bfloat16,
)
from rome_lens.rome.keys import subject_keys
from rome_lens.rome.prompts import ValueBatch, value_batch
from rome_lens.rome.update import rank_one_factors
from rome_lens.rome.values import Objective, default_entropy_layers, optimise_values

__all__ = [
    "Objective",
    "RomeHyperParams",
    "ValueBatch",
    "ValueLoop",
    "compute_rome",
    "compute_rome_edit",
    "default_entropy_layers",
    "default_hparams",
    "default_precision",
    "fast_bfloat16",
    "optimise_values",
    "rank_one_factors",
    "subject_keys",
    "value_batch",
]
