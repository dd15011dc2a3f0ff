"""Activation patching between a fact prompt and a counterfactual prompt of the same length.

Where causal tracing corrupts the subject with noise, activation patching corrupts it with
another subject: run the *corrupt* prompt (e.g. "The Colosseum is located in the city of"),
restore one state at a time from the *clean* prompt ("The Eiffel Tower is located in the city
of") and measure p(answer of the clean prompt). This is ``transformer_lens.patching``'s
technique restricted to the three state kinds of the ROME paper, computed with the restoration
engine that :func:`~rome_lens.tracing.causal_trace` uses (:mod:`rome_lens.tracing.restore`:
one corrupted run cached, restored runs batched, logits only at the last position), and
returned as the same result value, with the same heatmaps and dataframe.

Example:
    >>> res = activation_patch(model, "The Eiffel Tower is located in the city of",
    ...                        "The Space Needle is located in the city of", answer="Paris")
    >>> res
    CausalTraceResult(prompt='The Eiffel Tower is located in the city of', ...,
                      corrupt_prompt='The Space Needle is located in the city of', ...)
    >>> fig = res.plot()
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from rome_lens._typing import Model
from rome_lens.errors import InvalidRequestError
from rome_lens.models import access
from rome_lens.tracing.causal import CausalTraceResult
from rome_lens.tracing.restore import (
    KINDS,
    STATE_HOOKS,
    CorruptedRun,
    Hook,
    record_clean,
    resolve_method,
    restoration_grids,
    state_hook_names,
)


@torch.no_grad()
def activation_patch(
    model: Model,
    clean_prompt: str,
    corrupt_prompt: str,
    answer: str | None = None,
    kinds: Sequence[str] = KINDS,
    window: int = 10,
    method: Literal["batched", "reference"] = "batched",
    batch_size: int = 256,
) -> CausalTraceResult:
    """Patch clean states into the corrupt prompt's run, one (layer, token) at a time.

    Args:
        model: the model (not modified).
        clean_prompt: the prompt whose states are restored.
        corrupt_prompt: the counterfactual prompt, same token length.
        answer: measured answer (first token, leading space); ``None``: clean top-1.
        kinds: state kinds (``"resid"``, ``"mlp"``, ``"attn"``).
        window: layers patched together for mlp/attn.
        method: ``"batched"`` or ``"reference"`` (one forward per cell).
        batch_size: rows per batched forward.

    Returns:
        A :class:`~rome_lens.tracing.CausalTraceResult`: ``p_clean`` on the clean prompt,
        ``p_corrupted`` on the corrupt one, ``subject_span`` covering the tokens that differ.

    Raises:
        InvalidRequestError: prompts of different token lengths, or an unknown kind.
    """
    if any(k not in STATE_HOOKS for k in kinds):
        raise InvalidRequestError(f"kinds must be among {KINDS}, got {list(kinds)}")
    method = resolve_method(model, method)
    clean_tokens, corrupt_tokens = _equal_length_tokens(model, clean_prompt, corrupt_prompt)
    n_tok = int(clean_tokens.shape[0])
    clean = record_clean(model, clean_tokens, state_hook_names(kinds, access.n_layers(model)),
                         answer)
    differ = (clean_tokens != corrupt_tokens).nonzero().flatten().tolist()
    span = (differ[0], differ[-1] + 1) if differ else (0, 0)
    corrupted = CorruptedRun.record(model, corrupt_tokens[None], [], span[0] if differ else n_tok)
    p_corrupt = access.decode_residual(model, corrupted.final_last[0]).softmax(-1)[clean.answer]

    def reference_run(hooks: list[Hook]) -> torch.Tensor:
        return model.run_with_hooks(corrupt_tokens[None], fwd_hooks=list(hooks))

    scores = restoration_grids(
        model, kinds, window, clean.states, corrupted, clean.answer, method, batch_size,
        reference_run,
    )
    assert model.tokenizer is not None
    return CausalTraceResult(
        prompt=clean_prompt,
        subject="".join(str(t) for t in model.to_str_tokens(clean_tokens[span[0] : span[1]])),
        answer=str(model.tokenizer.decode([clean.answer])),
        answer_token=clean.answer,
        tokens=[str(t) for t in model.to_str_tokens(clean_tokens)],
        subject_span=span,
        p_clean=clean.p_clean,
        p_corrupted=float(p_corrupt),
        scores=scores,
        noise_std=0.0,
        samples=1,
        window=window,
        method=method,
        extra={"corrupt_prompt": corrupt_prompt},
    )


def _equal_length_tokens(
    model: Model, clean_prompt: str, corrupt_prompt: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both prompts' tokens, on the model's device.

    Raises:
        InvalidRequestError: the prompts have different token lengths.
    """
    clean_tokens = access.to_tokens(model, clean_prompt).to(model.cfg.device)
    corrupt_tokens = access.to_tokens(model, corrupt_prompt).to(model.cfg.device)
    if clean_tokens.shape != corrupt_tokens.shape:
        raise InvalidRequestError(
            f"prompts must have the same number of tokens: clean has {clean_tokens.shape[0]}, "
            f"corrupt has {corrupt_tokens.shape[0]} ({model.to_str_tokens(corrupt_tokens)})"
        )
    return clean_tokens, corrupt_tokens
