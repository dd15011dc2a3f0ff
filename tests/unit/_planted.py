"""Hand-built edits for sequence and health tests: random low-rank updates of a chosen size, and
an edit that makes generation collapse to one token."""

from __future__ import annotations

import torch
from _support import model_kind, tiny_model

from rome_lens import DenseSite, Edit, LowRankSite, base_fingerprint, base_weights
from rome_lens.audit.health import DEFAULT_PROMPTS
from rome_lens.models import access

# The token each tiny model is pushed to repeat (one each model collapses on reliably).
COLLAPSE_TOKEN = {"gpt2": "x", "gemma": "x", "bridge": "e"}


def random_edit(model, layer: int, scale: float, seed: int) -> Edit:
    """A rank-one change of ``W_out`` of ``layer`` whose norm is ``scale`` x the base weight's."""
    with base_weights(model):
        weight = access.read_mlp_out(model, layer)
    gen = torch.Generator().manual_seed(seed)
    left = torch.randn(weight.shape[0], 1, generator=gen)
    right = torch.randn(1, weight.shape[1], generator=gen)
    left *= scale * float(weight.norm()) / float((left @ right).norm())
    return Edit(sites=(LowRankSite(layer, left, right),), requests=(), method="planted",
                hparams={"seed": seed, "scale": scale}, base_fingerprint=base_fingerprint(model))


def collapse_edit(model, steps: int = 40, lr: float = 0.1) -> tuple[Edit, str]:
    """Dense changes of every ``W_out`` trained (on a fresh copy of the tiny model) to make the
    model repeat one token after any prompt; returns the edit and the token."""
    kind = model_kind(model)
    token = COLLAPSE_TOKEN[kind]
    copy = tiny_model(kind)
    target = int(copy.to_tokens(token, prepend_bos=False)[0, 0])
    rows = []
    for prompt in (*DEFAULT_PROMPTS, "Pack my box: 0123 (yes)"):
        start = len(access.to_tokens(copy, prompt)) - 1
        rows.append((access.to_tokens(copy, prompt + token * 16), start))
    for param in copy.parameters():
        param.requires_grad_(False)
    n_layers = copy.cfg.n_layers
    weights = [access.mlp_out_parameter(copy, layer)[1] for layer in range(n_layers)]
    for weight in weights:
        weight.requires_grad_(True)
    optimiser = torch.optim.Adam(weights, lr=lr)
    for _ in range(steps):
        optimiser.zero_grad()
        loss = torch.zeros(())
        for tokens, start in rows:
            resid = access.final_residual(copy, tokens[None])[0, start:]
            loss = loss - access.decode_residual(copy, resid).log_softmax(-1)[:, target].mean()
        loss.backward()
        optimiser.step()
    sites = tuple(
        DenseSite(layer, access.read_mlp_out(copy, layer) - access.read_mlp_out(model, layer))
        for layer in range(n_layers)
    )
    edit = Edit(sites=sites, requests=(), method="collapse", hparams={"token": token},
                base_fingerprint=base_fingerprint(model))
    return edit, token
