"""Seeded text sampling from a model (for context templates and the default statistics corpus).

TransformerLens's ``generate`` draws from the global RNG; rome_lens needs samples that are a pure
function of (model, seed), so that cached context templates and statistics are reproducible.
This sampler uses a key-value cache and its own ``torch.Generator``.
"""

from __future__ import annotations

import torch
from jaxtyping import Int
from tqdm.auto import tqdm

from rome_lens._typing import Model
from rome_lens.errors import NonFiniteError
from rome_lens.models import access
from rome_lens.threads import fit_threads


@torch.no_grad()
def sample_tokens(
    model: Model,
    n_sequences: int,
    length: int,
    *,
    top_k: int | None = None,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 32,
    progress: bool = False,
    desc: str = "sampling",
    prompt: str | None = None,
) -> Int[torch.Tensor, "n_sequences length"]:
    """Sample ``n_sequences`` continuations of BOS (or of ``prompt``), ``length`` tokens each.

    Args:
        model: the model to sample from.
        n_sequences: number of sequences.
        length: tokens generated per sequence.
        top_k: sample among the k most likely tokens (``None``: the full distribution).
        temperature: softmax temperature.
        seed: seed of the private generator (the result depends only on model and arguments).
        batch_size: sequences sampled in parallel.
        progress: show a tqdm progress bar.
        desc: progress bar label.
        prompt: text to continue (BOS prepended); ``None`` starts from BOS alone.

    Returns:
        Token ids of the continuations (without BOS or the prompt).
    """
    assert model.tokenizer is not None
    fit_threads()
    bos = model.tokenizer.bos_token_id
    if bos is None:
        bos = model.tokenizer.eos_token_id
    device = model.cfg.device
    generator = torch.Generator(device="cpu").manual_seed(seed)
    chunks: list[torch.Tensor] = []
    bar = tqdm(total=n_sequences * length, desc=desc, unit="tok", disable=not progress)
    for first in range(0, n_sequences, batch_size):
        batch = min(batch_size, n_sequences - first)
        step = access.IncrementalDecoder(model, batch)
        if prompt is None:
            tokens = torch.full((batch, 1), int(bos), dtype=torch.long, device=device)
        else:
            tokens = model.to_tokens(prompt, truncate=False).to(device).expand(batch, -1)
        out = []
        for _ in range(length):
            logits = step(tokens)
            logits = logits.float().cpu() / max(temperature, 1e-6)
            if not torch.isfinite(logits).all():
                raise NonFiniteError("the model produces NaN or infinite logits; cannot sample")
            if top_k is not None:
                values, indices = logits.topk(top_k, dim=-1)
                choice = torch.multinomial(values.softmax(-1), 1, generator=generator)
                next_tok = indices.gather(-1, choice)
            else:
                next_tok = torch.multinomial(logits.softmax(-1), 1, generator=generator)
            out.append(next_tok)
            tokens = next_tok.to(device)
            bar.update(batch)
        chunks.append(torch.cat(out, dim=1))
    bar.close()
    return torch.cat(chunks, dim=0)
