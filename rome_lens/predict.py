"""Small prediction helpers shared by the demo, CLI, tests and evaluation."""

from __future__ import annotations

import torch

from rome_lens._typing import Model
from rome_lens.models import access
from rome_lens.requests import target_tokens


@torch.no_grad()
def next_token_logprobs(model: Model, prompt: str) -> torch.Tensor:
    """Log-probabilities of the next token after ``prompt`` (only the last position decoded)."""
    tokens = access.to_tokens(model, prompt)[None]
    resid = access.final_residual(model, tokens)
    return access.decode_residual(model, resid[0, -1]).log_softmax(-1)


def top_tokens(model: Model, prompt: str, k: int = 5) -> list[tuple[str, float]]:
    """The ``k`` most likely next tokens after ``prompt`` with their probabilities.

    Example:
        >>> top_tokens(model, "The Eiffel Tower is located in the city of", k=3)
        [(..., ...), (..., ...), (..., ...)]

        On gemma-3-270m this is ``[(' Paris', 0.81), (' Lyon', 0.06), (' ', 0.01)]``.
    """
    logp = next_token_logprobs(model, prompt)
    values, indices = logp.topk(k)
    assert model.tokenizer is not None
    return [
        (str(model.tokenizer.decode([int(i)])), float(v.exp()))
        for v, i in zip(values, indices, strict=True)
    ]


@torch.no_grad()
def target_logprob(model: Model, prompt: str, target: str) -> float:
    """Mean per-token log-probability of ``target`` (with a leading space) after ``prompt``.

    This is the CounterFact comparison quantity (REFERENCE.md §3): the negative mean NLL.
    """
    prompt_ids = access.to_tokens(model, prompt)
    target_ids = target_tokens(model, target).to(prompt_ids.device)
    tokens = torch.cat([prompt_ids, target_ids])[None]
    access.check_fits(model, tokens.shape[1])
    resid = access.final_residual(model, tokens)
    n = prompt_ids.shape[0]
    positions = torch.arange(n - 1, n - 1 + target_ids.shape[0], device=tokens.device)
    logp = access.decode_residual(model, resid[0, positions]).log_softmax(-1)
    return float(logp.gather(-1, target_ids[:, None]).mean())
