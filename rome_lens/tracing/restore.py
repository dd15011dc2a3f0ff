"""The restoration engine shared by causal tracing and activation patching.

Both techniques answer one question: after the input is corrupted, which single internal state,
put back to its value from the clean run, brings the clean answer back? They differ only in
the corruption (noise on the subject's embeddings for :func:`~rome_lens.tracing.causal_trace`,
another prompt for :func:`~rome_lens.tracing.activation_patch`). So both do the same three
steps with this module:

1. :func:`record_clean`: the clean run's states (and the answer and its probability);
2. :meth:`CorruptedRun.record`: the corrupted run, once, with everything restored runs share;
3. :func:`restoration_grids`: p(answer) with one state restored, for every state kind
   (:data:`KINDS`), layer (or centred window of layers) and token position.

Speed: a restored run that changes layer ``a`` on starts at layer ``a`` from the corrupted
run's residual, and the positions before the restored one come from the corrupted run's frozen
key-value cache (where the model supports it, see
:func:`rome_lens.models.access.supports_frozen_prefix`).
Many restored runs share one batched forward pass and only the last position is decoded.
``method="reference"`` runs one full forward pass per cell instead, for checking.

Example (the three steps of :func:`~rome_lens.tracing.causal_trace`):
    >>> from rome_lens.requests import subject_token_span
    >>> from rome_lens.tracing.noise import embedding_std, subject_noise_hook
    >>> tokens, span = subject_token_span(model, "The Eiffel Tower is in", "The Eiffel Tower")
    >>> n_layers = model.cfg.n_layers
    >>> clean = record_clean(model, tokens, state_hook_names(KINDS, n_layers), answer=None)
    >>> noise = subject_noise_hook(model, span, samples=4, std=3 * embedding_std(model), seed=0)
    >>> noisy = tokens[None].expand(4, -1)
    >>> corrupted = CorruptedRun.record(model, noisy, [("hook_embed", noise)], span[0])
    >>> def reference_run(hooks):          # the corrupted run from scratch, with more hooks
    ...     return model.run_with_hooks(noisy, fwd_hooks=[("hook_embed", noise), *hooks])
    >>> grids = restoration_grids(model, KINDS, 10, clean.states, corrupted, clean.answer,
    ...                           resolve_method(model, "batched"), 256, reference_run)
    >>> grids["mlp"].shape == (n_layers, len(tokens))
    True
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

import torch
from jaxtyping import Float, Int

from rome_lens._typing import Model
from rome_lens.models import access
from rome_lens.requests import target_tokens

Kind = Literal["resid", "mlp", "attn"]
Method = Literal["batched", "reference"]
Hook = tuple[str | Callable[..., Any], Callable[..., Any]]
KINDS: tuple[Kind, ...] = ("resid", "mlp", "attn")
#: hook name of each state kind at a layer: the residual after the block, or what the MLP or
#: the attention adds to it
STATE_HOOKS: Mapping[str, Callable[[int], str]] = {
    "resid": access.resid_post_hook_name,
    "mlp": access.mlp_out_hook_name,
    "attn": access.attn_out_hook_name,
}


def state_hook_names(kinds: Sequence[str], n_layers: int) -> list[str]:
    """Hook names of every layer's state of each kind (kind-major)."""
    return [STATE_HOOKS[k](layer) for k in kinds for layer in range(n_layers)]


def resolve_method(model: Model, method: Method) -> Method:
    """The method actually used: ``"batched"`` needs frozen prefixes, else ``"reference"``."""
    if method == "batched" and not access.supports_frozen_prefix(model):
        return "reference"  # the batched grids continue frozen key-value caches
    return method


def answer_probability(
    model: Model, last_resid: Float[torch.Tensor, "rows d_model"], answer: int
) -> Float[torch.Tensor, " rows"]:
    """p(answer) from the last block's output at the last position, per row."""
    return access.decode_residual(model, last_resid).softmax(-1)[:, answer]


@dataclass(frozen=True, repr=False)
class CleanRun:
    """The clean run: its states, the answer measured and the answer's probability.

    Attributes:
        states: ``{hook name: activation [pos, d_model]}``.
        answer: the answer token.
        p_clean: p(answer) at the last position.
    """

    states: dict[str, torch.Tensor]
    answer: int
    p_clean: float

    def __repr__(self) -> str:
        return (
            f"CleanRun(states={len(self.states)}, answer={self.answer}, "
            f"p_clean={self.p_clean:.4g})"
        )


@torch.no_grad()
def record_clean(
    model: Model, tokens: Int[torch.Tensor, " pos"], names: Collection[str], answer: str | None
) -> CleanRun:
    """Run the clean prompt once, keeping the states ``names``.

    Args:
        model: the model.
        tokens: the clean prompt's tokens.
        names: hook names of the states to keep.
        answer: the answer text (its first token is measured); ``None``: the clean top-1 token.
    """
    resid, states = access.run_with_states(model, tokens[None], names)
    probs = access.decode_residual(model, cast(torch.Tensor, resid)[0, -1]).softmax(-1)
    answer_id = int(probs.argmax()) if answer is None else int(target_tokens(model, answer)[0])
    return CleanRun({name: states[name][0] for name in names}, answer_id, float(probs[answer_id]))


@dataclass(repr=False)
class CorruptedRun:
    """The corrupted run, recorded once: what every restored run shares.

    Attributes:
        resid_pre: ``hook_resid_pre`` of every layer, each ``[rows, pos, d_model]``.
        kv: every layer's attention keys and values (``None`` where the model cannot freeze
            prefixes; then only the reference method runs).
        final_last: the last block's output at the last position, ``[rows, d_model]``.
        first_changed: first position whose input differs from the clean run. States before it
            are identical in the clean and corrupted runs, so restoring them changes nothing.
    """

    resid_pre: list[torch.Tensor]
    kv: access.KeyValueRecord | None
    final_last: Float[torch.Tensor, "rows d_model"]
    first_changed: int

    @classmethod
    @torch.no_grad()
    def record(
        cls,
        model: Model,
        tokens: Int[torch.Tensor, "rows pos"],
        hooks: list[Hook],
        first_changed: int,
    ) -> CorruptedRun:
        """Run ``tokens`` with ``hooks`` (e.g. the noise) and keep residuals, keys and values."""
        n_layers = access.n_layers(model)
        names = {access.resid_pre_hook_name(layer) for layer in range(n_layers)}
        kv: access.KeyValueRecord | None = None
        with model.hooks(fwd_hooks=hooks):
            if access.supports_frozen_prefix(model):
                final, states, kv = access.run_with_keys_values(model, tokens, names)
            else:
                final, states = access.run_with_states(model, tokens, names)
        return cls(
            resid_pre=[states[access.resid_pre_hook_name(layer)] for layer in range(n_layers)],
            kv=kv,
            final_last=cast(torch.Tensor, final)[:, -1],
            first_changed=first_changed,
        )

    def prefix(self, model: Model, width: int, rows: slice | torch.Tensor) -> access.FrozenPrefix:
        """A frozen prefix holding positions ``[0, width)`` of ``rows``."""
        if self.kv is None:
            raise TypeError("this corrupted run recorded no keys and values")
        return access.frozen_prefix_from(model, self.kv, width, rows)

    def __repr__(self) -> str:
        rows, pos, _ = self.resid_pre[0].shape if self.resid_pre else (0, 0, 0)
        return (
            f"CorruptedRun(rows={rows}, positions={pos}, layers={len(self.resid_pre)}, "
            f"first_changed={self.first_changed}, keys_values={self.kv is not None})"
        )


def restore_position_hook(
    clean: Float[torch.Tensor, "pos d_model"], pos: int
) -> Callable[..., torch.Tensor]:
    """Hook that puts position ``pos`` of every row back to its clean value."""

    def fn(act: torch.Tensor, hook: Any = None) -> torch.Tensor:
        act[:, pos] = clean[pos]
        return act

    return fn


def restoration_grids(
    model: Model,
    kinds: Sequence[str],
    window: int,
    clean: dict[str, torch.Tensor],
    corrupted: CorruptedRun,
    answer: int,
    method: str,
    batch_size: int,
    reference_run: Callable[[list[Hook]], torch.Tensor],
) -> dict[str, Float[torch.Tensor, "layer pos"]]:
    """Restored p(answer) for every kind, layer (or window centre) and position.

    Args:
        model: the model.
        kinds: state kinds (keys of :data:`STATE_HOOKS`).
        window: layers restored together for ``"mlp"`` and ``"attn"`` (centred).
        clean: the clean states ``{hook name: [pos, d_model]}``.
        corrupted: the recorded corrupted run (the batched method starts from it).
        answer: the answer token.
        method: ``"batched"`` or ``"reference"``.
        batch_size: rows per batched forward pass.
        reference_run: ``reference_run(hooks)`` runs the corrupted input from scratch with
            extra hooks and returns full logits (the reference method).

    Returns:
        ``{kind: tensor [n_layers, n_tokens]}``.
    """
    n_layers = access.n_layers(model)
    n_tok = int(corrupted.resid_pre[0].shape[1])
    scores: dict[str, torch.Tensor] = {}
    for kind in kinds:
        grid = torch.zeros(n_layers, n_tok)
        for layer in range(n_layers):
            layers = [layer] if kind == "resid" else _window_layers(layer, window, n_layers)
            names = [STATE_HOOKS[kind](lyr) for lyr in layers]
            if method == "reference":
                grid[layer] = _reference_cells(reference_run, names, clean, answer, n_tok)
            else:
                grid[layer] = _batched_cells(
                    model, corrupted, layers[0], names, clean, answer, batch_size
                )
        scores[kind] = grid
    return scores


def _window_layers(layer: int, window: int, n_layers: int) -> list[int]:
    """The ``window`` layers centred on ``layer``, clipped to the model."""
    start = max(0, layer - window // 2)
    end = min(n_layers, layer - (-window // 2))
    return list(range(start, end))


@torch.no_grad()
def _reference_cells(
    reference_run: Callable[[list[Hook]], torch.Tensor],
    names: list[str],
    clean: dict[str, torch.Tensor],
    answer: int,
    n_tok: int,
) -> Float[torch.Tensor, " pos"]:
    """p(answer) restoring ``names`` at each position, one full forward pass per position."""
    out = torch.zeros(n_tok)
    for pos in range(n_tok):
        logits = reference_run([(name, restore_position_hook(clean[name], pos)) for name in names])
        out[pos] = float(logits[:, -1].softmax(-1)[:, answer].mean())
    return out


def _rows_position_hook(
    clean: Float[torch.Tensor, "pos d_model"], row_pos: Int[torch.Tensor, " rows"], offset: int
) -> Callable[..., torch.Tensor]:
    """Hook that puts each row's chosen position back to its clean value.

    ``row_pos`` are absolute positions; the activation starts at position ``offset``.
    """

    def fn(act: torch.Tensor, hook: Any = None) -> torch.Tensor:
        rows = torch.arange(act.shape[0], device=act.device)
        act[rows, row_pos - offset] = clean[row_pos]
        return act

    return fn


def _position_buckets(first: int, n_tok: int, buckets: int) -> list[tuple[int, int]]:
    """Split positions ``[first, n_tok)`` into at most ``buckets`` runs, the later ones shorter.

    A bucket ``[lo, hi)`` costs ``(hi - lo) x (n_tok - lo)`` token-rows, so cuts are placed to
    roughly equalise that cost.
    """
    span = n_tok - first
    if span <= 0:
        return []
    count = max(1, min(buckets, span))
    cuts = [first]
    for i in range(1, count):
        # equal-area cuts of a triangle: more, shorter runs towards the end
        cuts.append(first + round(span * (1 - ((count - i) / count) ** 0.5)))
    cuts.append(n_tok)
    cuts = sorted(set(cuts))
    return list(zip(cuts[:-1], cuts[1:], strict=True))


@torch.no_grad()
def _batched_cells(
    model: Model,
    corrupted: CorruptedRun,
    start: int,
    names: list[str],
    clean: dict[str, torch.Tensor],
    answer: int,
    batch_size: int,
    buckets: int = 3,
) -> Float[torch.Tensor, " pos"]:
    """p(answer) for restoring ``names`` at every position (all rows), starting at ``start``.

    Restoring position ``t`` changes nothing before ``t``. Positions are grouped into a few
    buckets ``[lo, hi)``; a bucket's runs take positions ``[0, lo)`` from the corrupted run's
    frozen key-value cache and compute only ``[lo, n)`` through blocks ``start..``. Positions
    before ``corrupted.first_changed`` hold clean states already, so their restored runs are
    the corrupted run itself. Logits are decoded at the last position only, all rows at once.
    """
    resid = corrupted.resid_pre[start]
    n_rows, n_tok, _ = resid.shape
    p_corrupted = answer_probability(model, corrupted.final_last, answer).mean()
    out = torch.full((n_tok,), float(p_corrupted))
    first_pos = max(0, corrupted.first_changed)
    step = max(1, batch_size)
    finals = []
    for lo, hi in _position_buckets(first_pos, n_tok, buckets):
        # row r restores position lo + r // n_rows in sample r % n_rows
        row_pos = torch.arange(lo, hi, device=resid.device).repeat_interleave(n_rows)
        sample = torch.arange(n_rows, device=resid.device).repeat(hi - lo)
        for first in range(0, row_pos.shape[0], step):
            pos_c, sample_c = row_pos[first : first + step], sample[first : first + step]
            hooks: list[Hook] = [(n, _rows_position_hook(clean[n], pos_c, lo)) for n in names]
            mask = torch.ones(pos_c.shape[0], n_tok, dtype=torch.int, device=resid.device)
            with model.hooks(fwd_hooks=hooks):
                final = access.run_blocks_from(
                    model,
                    resid[sample_c, lo:],
                    start,
                    prefix=corrupted.prefix(model, lo, sample_c),
                    attention_mask=mask,
                )
            finals.append(final[:, -1])
    if finals:
        last = torch.cat(finals)  # decoded together: the unembedding dominates small models
        probs = torch.cat([
            answer_probability(model, last[i : i + step], answer)
            for i in range(0, last.shape[0], step)
        ])
        out[first_pos:] = probs.reshape(n_tok - first_pos, n_rows).mean(-1).cpu()
    return out
