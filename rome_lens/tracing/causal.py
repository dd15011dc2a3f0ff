"""Causal tracing (Meng et al. 2022, Sec. 2): which hidden states carry a fact?

Three runs make a trace. The *clean* run records every state on the fact prompt. The *corrupted*
runs add Gaussian noise to the subject's token embeddings (``hook_embed``; std = 3 x the std of
the model's token embeddings by default), so the model loses track of the subject and p(answer)
drops. The *restored* runs are corrupted runs in which one state (one token at one layer, or for
MLP/attention outputs a window of layers) is put back to its clean value. A state whose
restoration brings p(answer) back is causally important; the indirect effect is
``p_restored - p_corrupted`` and the total effect ``p_clean - p_corrupted``.

Speed: the corrupted run is computed once per noise sample and cached layer by layer; a run
that restores states from layer ``a`` on starts at layer ``a`` from that cache instead of
recomputing the layers below. Many restored runs share one batched forward pass (chunked to
``batch_size`` rows), and logits are decoded only at the last position. ``method="reference"``
keeps the plain loop (one full forward pass per cell, full logits) for checking and
benchmarking; both use the same noise and agree to float precision.

Example:
    >>> trace = causal_trace(model, "The Eiffel Tower is located in the city of",
    ...                      "The Eiffel Tower")
    >>> trace.best_layer("mlp")            # layer of the strongest MLP effect at the subject
    >>> trace.plot()                       # the paper's three heatmaps
    >>> trace.to_dataframe().head()
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import torch
from jaxtyping import Float, Int

from rome_lens._typing import Model
from rome_lens.errors import InvalidRequestError
from rome_lens.models import access
from rome_lens.requests import subject_token_span, target_tokens

logger = logging.getLogger(__name__)

Kind = Literal["resid", "mlp", "attn"]
Hook = tuple[str | Callable[..., Any], Callable[..., Any]]
KINDS: tuple[Kind, ...] = ("resid", "mlp", "attn")
_HOOKS: dict[str, Callable[[int], str]] = {
    "resid": access.resid_post_hook_name,
    "mlp": access.mlp_out_hook_name,
    "attn": access.attn_out_hook_name,
}


def embedding_std(model: Model) -> float:
    """Standard deviation of all token-embedding entries (chunked, float64)."""
    w = access.embedding_matrix(model).detach()
    total, total_sq, count = 0.0, 0.0, 0
    for chunk in torch.split(w, 8192):
        c = chunk.double()
        total += float(c.sum())
        total_sq += float((c * c).sum())
        count += c.numel()
    mean = total / count
    return float((total_sq / count - mean * mean) ** 0.5)


@dataclass
class CausalTraceResult:
    """A causal trace: restored probabilities per kind, layer and token.

    Attributes:
        prompt: the prompt traced.
        subject: the corrupted subject.
        answer: the answer token's text.
        answer_token: its id.
        tokens: the prompt's tokens as strings (BOS included).
        subject_span: half-open token span of the subject.
        p_clean: p(answer) on the clean prompt.
        p_corrupted: mean p(answer) over the noised runs.
        scores: ``{kind: tensor [n_layers, n_tokens]}`` of restored p(answer).
        noise_std: std of the embedding noise.
        samples: noise samples per run.
        window: layers restored together for mlp/attn.
        method: ``"batched"`` or ``"reference"``.
    """

    prompt: str
    subject: str
    answer: str
    answer_token: int
    tokens: list[str]
    subject_span: tuple[int, int]
    p_clean: float
    p_corrupted: float
    scores: dict[str, Float[torch.Tensor, "layer pos"]]
    noise_std: float
    samples: int
    window: int
    method: str = "batched"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def total_effect(self) -> float:
        """``p_clean - p_corrupted``."""
        return self.p_clean - self.p_corrupted

    @property
    def last_subject_token(self) -> int:
        """Position of the subject's last token."""
        return self.subject_span[1] - 1

    def indirect_effect(self, kind: str = "resid") -> Float[torch.Tensor, "layer pos"]:
        """``p_restored - p_corrupted`` for every (layer, token) of ``kind``."""
        return self.scores[kind] - self.p_corrupted

    def best_layer(self, kind: str = "mlp", token: int | None = None) -> int:
        """Layer with the largest indirect effect at ``token`` (default: last subject token)."""
        pos = self.last_subject_token if token is None else token
        return int(self.indirect_effect(kind)[:, pos].argmax())

    def to_dataframe(self) -> Any:
        """Long-format ``pandas.DataFrame``: kind, layer, position, token, p, indirect effect."""
        import pandas as pd

        rows = []
        for kind, grid in self.scores.items():
            for layer in range(grid.shape[0]):
                for pos in range(grid.shape[1]):
                    rows.append({
                        "kind": kind,
                        "layer": layer,
                        "position": pos,
                        "token": self.tokens[pos],
                        "is_subject": self.subject_span[0] <= pos < self.subject_span[1],
                        "p_restored": float(grid[layer, pos]),
                        "indirect_effect": float(grid[layer, pos]) - self.p_corrupted,
                    })
        return pd.DataFrame(rows)

    def plot(self, path: str | None = None, title: str | None = None) -> Any:
        """The paper's heatmaps (one per kind); saved to ``path`` if given.

        Returns:
            The matplotlib ``Figure``.
        """
        from rome_lens.plotting import trace_heatmaps

        return trace_heatmaps(self, path=path, title=title)


def _subject_noise_hook(
    model: Model, span: tuple[int, int], samples: int, std: float, seed: int
) -> Callable[..., torch.Tensor]:
    """``hook_embed`` hook adding seeded Gaussian noise (one draw per sample row) to the subject."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    shape = (samples, span[1] - span[0], int(model.cfg.d_model))
    noise = (torch.randn(shape, generator=generator) * std).to(
        device=model.cfg.device, dtype=model.cfg.dtype
    )

    def add_noise(act: torch.Tensor, hook: Any = None) -> torch.Tensor:
        act = act.clone()
        act[:, span[0] : span[1]] += noise[: act.shape[0]]
        return act

    return add_noise


def _answer_probability(
    model: Model, last_resid: Float[torch.Tensor, "rows d_model"], answer: int
) -> Float[torch.Tensor, " rows"]:
    return access.decode_residual(model, last_resid).softmax(-1)[:, answer]


def _window(layer: int, window: int, n_layers: int) -> list[int]:
    start = max(0, layer - window // 2)
    end = min(n_layers, layer - (-window // 2))
    return list(range(start, end))


def causal_trace(
    model: Model,
    prompt: str,
    subject: str,
    answer: str | None = None,
    kinds: Sequence[str] = KINDS,
    samples: int = 10,
    noise: float | None = None,
    window: int = 10,
    seed: int = 0,
    method: Literal["batched", "reference"] = "batched",
    batch_size: int = 256,
) -> CausalTraceResult:
    """Trace which (layer, token) states carry the fact ``prompt -> answer``.

    Args:
        model: the model (not modified).
        prompt: the full prompt containing ``subject``.
        subject: the tokens to corrupt.
        answer: the answer whose probability is measured (its first token, with a leading
            space); ``None`` uses the clean model's top-1 next token.
        kinds: any of ``"resid"`` (``hook_resid_post`` of one layer), ``"mlp"``
            (``hook_mlp_out``, window of layers), ``"attn"`` (``hook_attn_out``, window).
        samples: noise samples (rows averaged).
        noise: noise std (default ``3 x`` :func:`embedding_std`).
        window: layers restored together for mlp and attn (centred, as in the paper).
        seed: seed of the noise.
        method: ``"batched"`` (fast) or ``"reference"`` (one forward per cell). A
            TransformerBridge always runs ``"reference"`` (same numbers, slower).
        batch_size: rows per batched forward pass (memory budget).

    Returns:
        A :class:`CausalTraceResult`.

    Raises:
        SubjectNotFoundError: the subject is not in the prompt.
        InvalidRequestError: unknown kind, ``samples < 1`` or ``window < 1``.
    """
    bad = [k for k in kinds if k not in _HOOKS]
    if bad or samples < 1 or window < 1:
        raise InvalidRequestError(
            f"kinds must be among {KINDS} (got {list(kinds)}), samples and window >= 1"
        )
    if method == "batched" and access.is_bridge(model):
        method = "reference"  # the batched grids reuse TransformerLens key-value caches
    tokens, span = subject_token_span(model, prompt, subject)
    tokens = tokens.to(model.cfg.device)
    n_layers, n_tok = access.n_layers(model), int(tokens.shape[0])
    std = 3.0 * embedding_std(model) if noise is None else float(noise)
    add_noise = _subject_noise_hook(model, span, samples, std, seed)

    hook_names = [_HOOKS[k](layer) for k in kinds for layer in range(n_layers)]
    with torch.no_grad():
        clean_resid, clean_cache = access.run_with_states(model, tokens[None], hook_names)
        clean_final = clean_resid[0, -1]
        clean_logp = access.decode_residual(model, clean_final).softmax(-1)
        if answer is None:
            answer_id = int(clean_logp.argmax())
        else:
            answer_id = int(target_tokens(model, answer)[0])
        p_clean = float(clean_logp[answer_id])
        batch = tokens[None].expand(samples, n_tok)
        corrupted = CorruptedRun.record(model, batch, [(access.EMBED_HOOK, add_noise)], span[0])
        p_corrupted = float(_answer_probability(model, corrupted.final_last, answer_id).mean())

    clean = {name: clean_cache[name][0] for name in hook_names}
    scores = _restoration_grids(
        model,
        kinds,
        window,
        clean,
        corrupted,
        answer_id,
        method,
        batch_size,
        reference_run=lambda hooks: model.run_with_hooks(
            batch, fwd_hooks=[(access.EMBED_HOOK, add_noise), *hooks]
        ),
        n_tok=n_tok,
    )
    assert model.tokenizer is not None
    return CausalTraceResult(
        prompt=prompt,
        subject=subject,
        answer=str(model.tokenizer.decode([answer_id])),
        answer_token=answer_id,
        tokens=[str(t) for t in model.to_str_tokens(tokens)],
        subject_span=span,
        p_clean=p_clean,
        p_corrupted=p_corrupted,
        scores=scores,
        noise_std=std,
        samples=samples,
        window=window,
        method=method,
    )


@dataclass
class CorruptedRun:
    """The corrupted run, recorded once: what every restored run shares.

    Attributes:
        resid_pre: ``hook_resid_pre`` of every layer, each ``[rows, pos, d_model]``.
        keys: per-layer attention keys ``[rows, pos, kv_heads, d_head]`` (as cached by
            TransformerLens, before any positional rotation).
        values: per-layer attention values, same shape.
        final_last: the last block's output at the last position, ``[rows, d_model]``.
        first_changed: first position whose input differs from the clean run. States before it
            are identical in the clean and corrupted runs, so restoring them changes nothing.
    """

    resid_pre: list[torch.Tensor]
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
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
        if access.is_bridge(model):  # no TransformerLens key-value cache: reference grids only
            with model.hooks(fwd_hooks=hooks):
                final, cache = access.run_with_states(model, tokens, names)
            keys: list[torch.Tensor] = []
            values: list[torch.Tensor] = []
        else:
            from transformer_lens import TransformerLensKeyValueCache

            kv = TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device,
                                                         tokens.shape[0])
            with model.hooks(fwd_hooks=hooks):
                final, cache = access.run_with_states(model, tokens, names, past_kv_cache=kv)
            keys = [entry.past_keys for entry in kv.entries]
            values = [entry.past_values for entry in kv.entries]
        return cls(
            resid_pre=[cache[access.resid_pre_hook_name(layer)] for layer in range(n_layers)],
            keys=keys,
            values=values,
            final_last=cast(torch.Tensor, final)[:, -1],
            first_changed=first_changed,
        )

    def prefix_cache(self, pos: int, rows: slice | torch.Tensor) -> Any:
        """A frozen key-value cache holding positions ``[0, pos)`` of ``rows``."""
        from transformer_lens import TransformerLensKeyValueCache
        from transformer_lens.cache.key_value_cache_entry import (
            TransformerLensKeyValueCacheEntry,
        )

        entries = [
            TransformerLensKeyValueCacheEntry(k[rows, :pos], v[rows, :pos], frozen=True)
            for k, v in zip(self.keys, self.values, strict=True)
        ]
        n_rows = entries[0].past_keys.shape[0]
        mask = torch.ones(n_rows, pos, dtype=torch.int, device=self.keys[0].device)
        return TransformerLensKeyValueCache(entries, mask, frozen=True)


def _restoration_grids(
    model: Model,
    kinds: Sequence[str],
    window: int,
    clean: dict[str, torch.Tensor],
    corrupted: CorruptedRun,
    answer_id: int,
    method: str,
    batch_size: int,
    reference_run: Callable[[list[Hook]], torch.Tensor],
    n_tok: int,
) -> dict[str, torch.Tensor]:
    """Restored p(answer) for every kind, layer (or window centre) and position.

    ``corrupted`` is the recorded corrupted run (batched method); ``reference_run(hooks)`` runs
    the corrupted input from scratch with extra hooks and returns full logits (reference method).
    """
    n_layers = access.n_layers(model)
    scores: dict[str, torch.Tensor] = {}
    for kind in kinds:
        grid = torch.zeros(n_layers, n_tok)
        for layer in range(n_layers):
            layers = [layer] if kind == "resid" else _window(layer, window, n_layers)
            names = [_HOOKS[kind](lyr) for lyr in layers]
            if method == "reference":
                for pos in range(n_tok):
                    with torch.no_grad():
                        logits = reference_run(
                            [(name, _fixed_patch(clean[name], pos)) for name in names]
                        )
                    grid[layer, pos] = float(logits[:, -1].softmax(-1)[:, answer_id].mean())
            else:
                grid[layer] = _batched_layer(
                    model,
                    corrupted,
                    layers[0],
                    names,
                    clean,
                    answer_id,
                    batch_size,
                )
        scores[kind] = grid
    return scores


def _fixed_patch(
    clean: Float[torch.Tensor, "pos d_model"], pos: int
) -> Callable[..., torch.Tensor]:
    """Hook that puts position ``pos`` of every row back to its clean value."""

    def fn(act: torch.Tensor, hook: Any = None) -> torch.Tensor:
        act[:, pos] = clean[pos]
        return act

    return fn


def _patch_hook(
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
def _batched_layer(
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
    p_corrupted = _answer_probability(model, corrupted.final_last, answer).mean()
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
            hooks: list[Hook] = [(n, _patch_hook(clean[n], pos_c, lo)) for n in names]
            mask = torch.ones(pos_c.shape[0], n_tok, dtype=torch.int, device=resid.device)
            with model.hooks(fwd_hooks=hooks):
                final = model(
                    resid[sample_c, lo:],
                    start_at_layer=start,
                    stop_at_layer=access.n_layers(model),
                    past_kv_cache=corrupted.prefix_cache(lo, sample_c),
                    attention_mask=mask,
                )
            finals.append(final[:, -1])
    if finals:
        last = torch.cat(finals)  # decoded together: the unembedding dominates small models
        probs = torch.cat([
            _answer_probability(model, last[i : i + step], answer)
            for i in range(0, last.shape[0], step)
        ])
        out[first_pos:] = probs.reshape(n_tok - first_pos, n_rows).mean(-1).cpu()
    return out


@torch.no_grad()
def restored_probability(
    model: Model,
    prompt: str,
    subject: str,
    restore: Sequence[tuple[str, int]],
    answer: str | None = None,
    samples: int = 10,
    noise: float | None = None,
    seed: int = 0,
) -> tuple[float, float, float]:
    """p(answer) clean, corrupted, and with arbitrary ``(hook name, position)`` states restored.

    The building block for custom experiments (e.g. restoring ``blocks.0.hook_resid_pre``).
    Noise is drawn exactly as in :func:`causal_trace` with the same seed.

    Returns:
        ``(p_clean, p_corrupted, p_restored)``.
    """
    trace = causal_trace(model, prompt, subject, answer, kinds=(), samples=samples,
                         noise=noise, seed=seed)
    tokens, span = subject_token_span(model, prompt, subject)
    tokens = tokens.to(model.cfg.device)
    add_noise = _subject_noise_hook(model, span, samples, trace.noise_std, seed)

    names = sorted({name for name, _ in restore})
    _, cache = model.run_with_cache(tokens[None], names_filter=lambda n: n in names)
    batch = tokens[None].expand(samples, -1)
    hooks: list[Hook] = [(access.EMBED_HOOK, add_noise)]
    hooks += [(name, _fixed_patch(cache[name][0], pos)) for name, pos in restore]
    logits = model.run_with_hooks(batch, fwd_hooks=hooks)
    p = float(logits[:, -1].softmax(-1)[:, trace.answer_token].mean())
    return trace.p_clean, trace.p_corrupted, p
