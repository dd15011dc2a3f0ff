"""The corruption of causal tracing: seeded Gaussian noise on the subject's token embeddings.

The noise scale is derived from the model (:func:`embedding_std`; causal tracing uses three
times it, as in Meng et al. 2022) and every draw comes from an explicit seed, so a trace, a
restoration experiment and an audit's corrupted control see exactly the same noise.

Example:
    >>> tokens = model.to_tokens("The Eiffel Tower is in")          # [1, pos]
    >>> std = 3 * embedding_std(model)
    >>> noise = subject_noise_hook(model, span=(2, 5), samples=10, std=std, seed=0)
    >>> logits = model.run_with_hooks(tokens.expand(10, -1), fwd_hooks=[("hook_embed", noise)])
    >>> logits.shape[0]                                             # one row per noise sample
    10
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from rome_lens._typing import Model
from rome_lens.models import access


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


def subject_noise_hook(
    model: Model, span: tuple[int, int], samples: int, std: float, seed: int
) -> Callable[..., torch.Tensor]:
    """A ``hook_embed`` hook adding seeded Gaussian noise to the subject's positions.

    Row ``i`` of the batch gets the ``i``-th of ``samples`` independent draws; the draws depend
    only on ``seed``, ``samples``, the span's length and ``d_model``.

    Args:
        model: the model (its ``d_model``, device and dtype).
        span: half-open token span of the subject.
        samples: number of draws (the batch may have up to this many rows).
        std: standard deviation of the noise.
        seed: seed of the draws (a CPU generator, so devices agree).

    Returns:
        A hook function ``(activation, hook) -> noised copy of activation``.
    """
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
