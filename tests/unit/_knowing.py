"""A tiny model that KNOWS a planted table of facts: a tiny HookedTransformer fitted, for a
few seconds, to continue each fact's prompt with its answer (ripple evaluation tests)."""

from __future__ import annotations

import torch
from _support import one_thread, tiny_model

from rome_lens.models import access
from rome_lens.requests import target_tokens


def knowing_model(facts: dict[str, str], steps: int = 300, lr: float = 1e-2, seed: int = 0):
    """A tiny gpt2-layout model trained so that each ``prompt`` continues with ``" " + answer``
    (loss on the answer tokens only; deterministic for a seed)."""
    torch.manual_seed(seed)
    model = tiny_model("gpt2", seed=seed)
    rows, masks = [], []
    for prompt, answer in facts.items():
        prompt_ids = access.to_tokens(model, prompt)
        ids = torch.cat([prompt_ids, target_tokens(model, answer)])
        mask = torch.zeros(len(ids) - 1, dtype=torch.bool)
        mask[len(prompt_ids) - 1:] = True  # positions that predict an answer token
        rows.append(ids)
        masks.append(mask)
    width = max(len(r) for r in rows)
    tokens = torch.zeros(len(rows), width, dtype=torch.long)
    loss_mask = torch.zeros(len(rows), width - 1, dtype=torch.bool)
    for i, (ids, mask) in enumerate(zip(rows, masks, strict=True)):
        tokens[i, : len(ids)] = ids
        loss_mask[i, : len(mask)] = mask
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    with one_thread():
        for _ in range(steps):
            optimiser.zero_grad()
            logp = model(tokens).log_softmax(-1)[:, :-1]
            nll = -logp.gather(-1, tokens[:, 1:, None])[..., 0]
            loss = nll[loss_mask].mean()
            loss.backward()
            optimiser.step()
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model
