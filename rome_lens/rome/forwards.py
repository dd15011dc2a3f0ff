"""How each step of the value optimisation runs the model (three strategies, same numbers).

The change ``delta`` is added to the raw MLP output of the edit layer at the last subject token
of every row. Nothing before that token depends on delta, and the residual entering the edit
layer does not either, so a step need not rerun them:

* :class:`NaiveForward`: full forward passes from the tokens with full-vocabulary logits at
  every position (the reference implementation's cost; the benchmark baseline).
* :class:`ResidualForward`: the residual entering layer L is computed once; each step runs
  blocks L.. and decodes only the positions the loss reads.
* :class:`PrefixCacheForward` (default): as above, and the tokens before the subject run once
  into a frozen key-value cache (:func:`rome_lens.models.access.run_prefix`); each step runs
  blocks L.. on the rest only (typically a third of the tokens).

Every forward exposes ``mask`` (where delta is added, in the coordinates the edit layer's MLP
sees), ``rows``/``pos`` (the entries the loss reads: target positions, then KL positions) and
``__call__() -> log-probs [entries, d_vocab]``.
"""

from __future__ import annotations

from typing import Literal

import torch
from jaxtyping import Float

from rome_lens._typing import Model
from rome_lens.models import access
from rome_lens.rome.prompts import ValueBatch

ValueLoop = Literal["prefix_cache", "residual", "naive"]
LOOPS: tuple[str, ...] = ("prefix_cache", "residual", "naive")


class ValueForward:
    """One forward pass of the value optimisation: log-probs at the loss and KL positions."""

    mask: torch.Tensor
    rows: torch.Tensor
    pos: torch.Tensor
    row_request: torch.Tensor

    def __call__(self) -> Float[torch.Tensor, "entries d_vocab"]:
        """Log-probs at ``(rows, pos)`` with the hooks currently on the model."""
        raise NotImplementedError


class NaiveForward(ValueForward):
    """Baseline: full forward passes from the tokens, full-vocabulary logits everywhere."""

    def __init__(self, model: Model, batch: ValueBatch, dtype: torch.dtype) -> None:
        self.model, self.batch = model, batch
        self.mask = batch.subject_mask(dtype)
        self.rows, self.pos = batch.picked_positions()
        self.row_request = batch.row_request.to(batch.tokens.device)

    def __call__(self) -> torch.Tensor:
        """Full forward, full logits, then the picked entries."""
        tokens = self.batch.tokens
        logits = self.model(tokens, attention_mask=torch.ones_like(tokens))
        return logits.log_softmax(-1)[self.rows, self.pos]


class ResidualForward(ValueForward):
    """The residual entering the edit layer is fixed: run only blocks L.., decode only loss rows."""

    def __init__(self, model: Model, layer: int, batch: ValueBatch, resid: torch.Tensor) -> None:
        self.model, self.layer, self.resid = model, layer, resid
        self.mask = batch.subject_mask(resid.dtype)
        self.rows, self.pos = batch.picked_positions()
        self.row_request = batch.row_request.to(resid.device)

    def __call__(self) -> torch.Tensor:
        """Blocks L.. on the fixed residual; decode only the picked entries."""
        final = access.run_blocks_from(self.model, self.resid, self.layer)
        return access.decode_residual(self.model, final[self.rows, self.pos]).log_softmax(-1)


class PrefixCacheForward(ValueForward):
    """Like :class:`ResidualForward`, and the tokens before the subject are not recomputed.

    Rows are left-padded so that every last subject token sits at one position P; the prefix
    ``[0, P)`` runs once through all layers into a frozen key-value cache, the suffix's residual
    entering layer L is computed once, and each step runs blocks L.. on the suffix only.
    """

    def __init__(self, model: Model, layer: int, batch: ValueBatch) -> None:
        self.model, self.layer = model, layer
        device = batch.tokens.device
        subj, lengths = batch.subject_last.tolist(), batch.lengths.tolist()
        n_rows, width_p = len(subj), max(subj)
        width_s = max(n - s for n, s in zip(lengths, subj, strict=True))
        prefix = torch.full((n_rows, width_p), batch.pad, dtype=torch.long, device=device)
        suffix = torch.full((n_rows, width_s), batch.pad, dtype=torch.long, device=device)
        prefix_mask, suffix_mask = torch.zeros_like(prefix), torch.zeros_like(suffix)
        for i, (n, s) in enumerate(zip(lengths, subj, strict=True)):
            prefix[i, width_p - s :] = batch.tokens[i, :s]
            prefix_mask[i, width_p - s :] = 1
            suffix[i, : n - s] = batch.tokens[i, s:n]
            suffix_mask[i, : n - s] = 1
        with torch.no_grad():
            self.prefix = access.run_prefix(model, prefix, prefix_mask)
            self.resid = access.residual_before(
                model, suffix, layer, prefix=self.prefix, attention_mask=suffix_mask
            )
        self.full_mask = torch.cat([prefix_mask, suffix_mask], dim=1)
        rows, pos = batch.picked_positions()
        self.rows, self.pos = rows, pos - batch.subject_last.to(device)[rows]
        self.mask = torch.zeros(n_rows, width_s, 1, dtype=self.resid.dtype, device=device)
        self.mask[:, 0] = 1.0
        self.row_request = batch.row_request.to(device)

    def __call__(self) -> torch.Tensor:
        """Blocks L.. on the suffix after the frozen prefix; decode only the picked entries."""
        final = access.run_blocks_from(
            self.model, self.resid, self.layer, prefix=self.prefix, attention_mask=self.full_mask
        )
        return access.decode_residual(self.model, final[self.rows, self.pos]).log_softmax(-1)


def make_forward(
    model: Model, layer: int, batch: ValueBatch, loop: ValueLoop, resid: torch.Tensor | None,
    dtype: torch.dtype,
) -> ValueForward:
    """The forward strategy ``loop`` (``"residual"`` needs ``resid``, the input of ``layer``)."""
    if loop == "prefix_cache":
        return PrefixCacheForward(model, layer, batch)
    if loop == "residual":
        assert resid is not None, "the residual loop needs the residual entering the layer"
        return ResidualForward(model, layer, batch, resid)
    return NaiveForward(model, batch, dtype)


def effective_loop(model: Model, loop: ValueLoop) -> ValueLoop:
    """``loop``, or ``"residual"`` where the model has no frozen-prefix support (a bridge)."""
    if loop == "prefix_cache" and not access.supports_frozen_prefix(model):
        return "residual"
    return loop
