"""Causal tracing (Meng et al. 2022, Sec. 2): which hidden states carry a fact?

Three runs make a trace. The *clean* run records every state on the fact prompt. The *corrupted*
runs add Gaussian noise to the subject's token embeddings (``hook_embed``; std = 3 x the std of
the model's token embeddings by default), so the model loses track of the subject and p(answer)
drops. The *restored* runs are corrupted runs in which one state (one token at one layer, or for
MLP/attention outputs a window of layers) is put back to its clean value. A state whose
restoration brings p(answer) back is causally important; the indirect effect is
``p_restored - p_corrupted`` and the total effect ``p_clean - p_corrupted``.

The noise is :mod:`rome_lens.tracing.noise`; the clean, corrupted and restored runs are the
restoration engine of :mod:`rome_lens.tracing.restore`, shared with activation patching.
Speed: the corrupted run is computed once per noise sample and cached layer by layer; a run
that restores states from layer ``a`` on starts at layer ``a`` from that cache instead of
recomputing the layers below. Many restored runs share one batched forward pass (chunked to
``batch_size`` rows), and logits are decoded only at the last position. ``method="reference"``
keeps the plain loop (one full forward pass per cell, full logits) for checking and
benchmarking; both use the same noise and agree to float precision.

Example:
    >>> trace = causal_trace(model, "The Eiffel Tower is located in the city of",
    ...                      "The Eiffel Tower")
    >>> layer = trace.best_layer("mlp")    # layer of the strongest MLP effect at the subject
    >>> fig = trace.plot()                 # the paper's three heatmaps
    >>> list(trace.to_dataframe().columns)
    ['kind', 'layer', 'position', 'token', 'is_subject', 'p_restored', 'indirect_effect']
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from jaxtyping import Float

from rome_lens._typing import Model
from rome_lens.errors import InvalidRequestError
from rome_lens.models import access
from rome_lens.plotting import trace_heatmaps
from rome_lens.requests import subject_token_span
from rome_lens.threads import fit_threads
from rome_lens.tracing.noise import embedding_std, subject_noise_hook
from rome_lens.tracing.restore import (
    KINDS,
    STATE_HOOKS,
    CorruptedRun,
    Hook,
    Kind,
    answer_probability,
    record_clean,
    resolve_method,
    restoration_grids,
    restore_position_hook,
    state_hook_names,
)

logger = logging.getLogger(__name__)

__all__ = [
    "KINDS",
    "CausalTraceResult",
    "CorruptedRun",
    "Kind",
    "causal_trace",
    "embedding_std",
    "restored_probability",
    "subject_noise_hook",
]


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

    def __repr__(self) -> str:
        grid = next(iter(self.scores.values())).shape if self.scores else None
        shape = f"{grid[0]} layers x {grid[1]} tokens" if grid is not None else "none"
        corrupt = self.extra.get("corrupt_prompt")
        against = f", corrupt_prompt={_clip(corrupt)!r}" if corrupt is not None else ""
        return (
            f"CausalTraceResult(prompt={_clip(self.prompt)!r}, subject={self.subject!r}, "
            f"answer={self.answer!r}{against}, p_clean={self.p_clean:.4g}, "
            f"p_corrupted={self.p_corrupted:.4g}, kinds={tuple(self.scores)}, grid={shape}, "
            f"method={self.method!r})"
        )

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
        return trace_heatmaps(self, path=path, title=title)


def _clip(text: str, width: int = 60) -> str:
    """``text`` shortened to ``width`` characters for a repr."""
    return text if len(text) <= width else text[: width - 3] + "..."


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
        method: ``"batched"`` (fast) or ``"reference"`` (one forward per cell). A model that
            cannot freeze prefixes (the bridge API, see
            :func:`rome_lens.models.access.supports_frozen_prefix`) always runs
            ``"reference"`` (same numbers, slower).
        batch_size: rows per batched forward pass (memory budget).

    Returns:
        A :class:`CausalTraceResult`.

    Raises:
        SubjectNotFoundError: the subject is not in the prompt.
        InvalidRequestError: unknown kind, ``samples < 1`` or ``window < 1``.
    """
    _check_trace_arguments(kinds, samples, window)
    method = resolve_method(model, method)
    fit_threads()
    tokens, span = subject_token_span(model, prompt, subject)
    tokens = tokens.to(model.cfg.device)
    std = 3.0 * embedding_std(model) if noise is None else float(noise)
    add_noise = subject_noise_hook(model, span, samples, std, seed)

    clean = record_clean(model, tokens, state_hook_names(kinds, access.n_layers(model)), answer)
    batch = tokens[None].expand(samples, int(tokens.shape[0]))
    corrupted = CorruptedRun.record(model, batch, [(access.EMBED_HOOK, add_noise)], span[0])
    with torch.no_grad():
        p_corrupted = float(answer_probability(model, corrupted.final_last, clean.answer).mean())

    def reference_run(hooks: list[Hook]) -> torch.Tensor:
        return model.run_with_hooks(batch, fwd_hooks=[(access.EMBED_HOOK, add_noise), *hooks])

    scores = restoration_grids(
        model, kinds, window, clean.states, corrupted, clean.answer, method, batch_size,
        reference_run,
    )
    assert model.tokenizer is not None
    return CausalTraceResult(
        prompt=prompt,
        subject=subject,
        answer=str(model.tokenizer.decode([clean.answer])),
        answer_token=clean.answer,
        tokens=[str(t) for t in model.to_str_tokens(tokens)],
        subject_span=span,
        p_clean=clean.p_clean,
        p_corrupted=p_corrupted,
        scores=scores,
        noise_std=std,
        samples=samples,
        window=window,
        method=method,
    )


def _check_trace_arguments(kinds: Sequence[str], samples: int, window: int) -> None:
    """Raise :class:`InvalidRequestError` for an unknown kind, ``samples < 1`` or ``window < 1``."""
    bad = [k for k in kinds if k not in STATE_HOOKS]
    if bad or samples < 1 or window < 1:
        raise InvalidRequestError(
            f"kinds must be among {KINDS} (got {list(kinds)}), samples and window >= 1"
        )


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
    Noise is drawn exactly as in :func:`causal_trace` with the same seed. The states restored
    are those of the blocks (up to the last block's output).

    Returns:
        ``(p_clean, p_corrupted, p_restored)``.
    """
    trace = causal_trace(model, prompt, subject, answer, kinds=(), samples=samples,
                         noise=noise, seed=seed)
    tokens, span = subject_token_span(model, prompt, subject)
    tokens = tokens.to(model.cfg.device)
    add_noise = subject_noise_hook(model, span, samples, trace.noise_std, seed)

    names = sorted({name for name, _ in restore})
    _, clean = access.run_with_states(model, tokens[None], names)
    batch = tokens[None].expand(samples, -1)
    hooks: list[Hook] = [(access.EMBED_HOOK, add_noise)]
    hooks += [(name, restore_position_hook(clean[name][0], pos)) for name, pos in restore]
    logits = model.run_with_hooks(batch, fwd_hooks=hooks)
    p = float(logits[:, -1].softmax(-1)[:, trace.answer_token].mean())
    return trace.p_clean, trace.p_corrupted, p
