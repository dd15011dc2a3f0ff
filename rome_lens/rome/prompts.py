"""The prompts of ROME's key and value computation, batched over requests.

For each request: the edit prompt behind every context prefix (the bare prompt first), followed
by the target's tokens for teacher forcing (the *value rows*), and one KL prompt
(``"{subject} is a"``). Rows of all requests go in one right-padded batch, value rows first
(request by request), then the KL rows in request order. The last subject token of every row is
where the key is read and where the value's change is added.

Example:
    >>> from rome_lens.statistics import context_templates
    >>> hp = rome_lens.default_hparams(model)
    >>> batch = value_batch(model, [request], context_templates(model, hp), hp.kl_prompt)
    >>> batch.tokens.shape          # [21 value rows + 1 KL row, width]
    torch.Size([22, ...])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int

from rome_lens._typing import Model
from rome_lens.models import access
from rome_lens.requests import EditRequest, subject_token_span, target_tokens


@dataclass
class ValueBatch:
    """Right-padded value and KL prompts of one or more requests.

    Attributes:
        tokens: ``[rows, width]`` token ids.
        lengths: tokens per row before padding.
        pad: the padding id.
        subject_last: last subject token of every row.
        n_value: number of value rows (all requests).
        n_requests: number of requests.
        row_request: request index of every row.
        loss_rows, loss_positions, loss_targets, loss_weights: one entry per target token of
            every value row (row, position read, token, weight 1/len(target)).
        loss_first: the entry reads the last prompt token (the first target token).
        loss_request: request index of every loss entry.
        loss_row_rank: index of the entry's row among its request's value rows.
    """

    tokens: Int[torch.Tensor, "rows pos"]
    lengths: Int[torch.Tensor, " rows"]
    pad: int
    subject_last: Int[torch.Tensor, " rows"]
    n_value: int
    n_requests: int
    row_request: Int[torch.Tensor, " rows"]
    loss_rows: Int[torch.Tensor, " n_loss"]
    loss_positions: Int[torch.Tensor, " n_loss"]
    loss_targets: Int[torch.Tensor, " n_loss"]
    loss_weights: Float[torch.Tensor, " n_loss"]
    loss_first: torch.Tensor
    loss_request: Int[torch.Tensor, " n_loss"]
    loss_row_rank: Int[torch.Tensor, " n_loss"]

    def value_rows_of(self, request: int) -> Int[torch.Tensor, " rows_r"]:
        """Indices of the value rows of one request."""
        rows = torch.nonzero(self.row_request[: self.n_value] == request)[:, 0]
        return rows

    def picked_positions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows and positions the loss reads: target positions first, then the KL positions."""
        device = self.tokens.device
        kl_rows = torch.arange(self.n_value, self.tokens.shape[0])
        rows = torch.cat([self.loss_rows, kl_rows]).to(device)
        pos = torch.cat([self.loss_positions, self.subject_last[self.n_value :]]).to(device)
        return rows, pos

    def subject_mask(self, dtype: torch.dtype) -> Float[torch.Tensor, "rows pos 1"]:
        """1 at every row's last subject token, 0 elsewhere."""
        mask = torch.zeros(self.tokens.shape, dtype=dtype, device=self.tokens.device)
        mask[torch.arange(mask.shape[0]), self.subject_last.to(mask.device)] = 1.0
        return mask.unsqueeze(-1)


@dataclass
class _Rows:
    """Accumulates rows and loss entries while a batch is built."""

    ids: list[list[int]]
    subject_last: list[int]
    request: list[int]
    loss: list[tuple[int, int, int, float, bool, int, int]]


def _add_value_rows(
    model: Model, rows: _Rows, index: int, request: EditRequest, templates: Sequence[str],
    target: str,
) -> None:
    new_ids = target_tokens(model, target).tolist()
    subject_offset = request.template.index("{}")
    for rank, template in enumerate(templates):
        prefix = template[: template.index("{}")]
        text = template.replace("{}", request.text)
        tokens, (_, end) = subject_token_span(
            model, text, request.subject, char_start=len(prefix) + subject_offset
        )
        ids = tokens.tolist() + new_ids[:-1]
        access.check_fits(model, len(ids), what="edit prompt with target")
        for j, tok in enumerate(new_ids):
            entry = (len(rows.ids), int(tokens.shape[0]) - 1 + j, tok, 1.0 / len(new_ids), j == 0,
                     index, rank)
            rows.loss.append(entry)
        rows.ids.append(ids)
        rows.subject_last.append(end - 1)
        rows.request.append(index)


def _add_kl_row(
    model: Model, rows: _Rows, index: int, request: EditRequest, kl_prompt: str
) -> None:
    kl_text = kl_prompt.replace("{}", request.subject)
    tokens, (_, end) = subject_token_span(
        model, kl_text, request.subject, char_start=kl_prompt.index("{}")
    )
    rows.ids.append(tokens.tolist())
    rows.subject_last.append(end - 1)
    rows.request.append(index)


def value_batch(
    model: Model,
    requests: Sequence[EditRequest],
    templates: Sequence[str],
    kl_prompt: str,
    targets: Sequence[str] | None = None,
) -> ValueBatch:
    """Build the value and KL rows of ``requests``.

    Args:
        model: the model (tokenizer, context window).
        requests: the facts.
        templates: context templates (``"{}"`` first), see
            :func:`rome_lens.statistics.context_templates`.
        kl_prompt: template of the KL prompt, with ``{}`` for the subject.
        targets: the object each request's value rows teacher-force (default: ``target_new``).

    Returns:
        The batch, on the model's device.
    """
    targets = list(targets) if targets is not None else [r.target_new for r in requests]
    rows = _Rows([], [], [], [])
    for index, (request, target) in enumerate(zip(requests, targets, strict=True)):
        _add_value_rows(model, rows, index, request, templates, target)
    n_value = len(rows.ids)
    for index, request in enumerate(requests):
        _add_kl_row(model, rows, index, request, kl_prompt)
    return _pack(model, rows, n_value, len(requests))


def _pack(model: Model, rows: _Rows, n_value: int, n_requests: int) -> ValueBatch:
    width = max(len(r) for r in rows.ids)
    pad = 0
    if model.tokenizer is not None and model.tokenizer.pad_token_id is not None:
        pad = int(model.tokenizer.pad_token_id)
    padded = torch.full((len(rows.ids), width), pad, dtype=torch.long)
    for i, r in enumerate(rows.ids):
        padded[i, : len(r)] = torch.tensor(r)
    loss_rows, loss_pos, loss_tgt, loss_w, loss_first, loss_req, loss_rank = zip(
        *rows.loss, strict=True
    )
    return ValueBatch(
        tokens=padded.to(model.cfg.device),
        lengths=torch.tensor([len(r) for r in rows.ids]),
        pad=pad,
        subject_last=torch.tensor(rows.subject_last),
        n_value=n_value,
        n_requests=n_requests,
        row_request=torch.tensor(rows.request),
        loss_rows=torch.tensor(loss_rows),
        loss_positions=torch.tensor(loss_pos),
        loss_targets=torch.tensor(loss_tgt),
        loss_weights=torch.tensor(loss_w),
        loss_first=torch.tensor(loss_first, dtype=torch.bool),
        loss_request=torch.tensor(loss_req),
        loss_row_rank=torch.tensor(loss_rank),
    )
