"""Reading a weight change: its value directions as tokens, its key directions as subjects.

An MLP output weight maps keys ``k`` (``blocks.L.mlp.hook_post``) to raw outputs ``W^T k``. A
change ``D`` of it adds ``D^T k`` to the raw output of every token whose key is ``k``.

* **Value side (the new object).** A direction ``v`` of raw-output space reaches the residual
  stream through the model's post-MLP map first: Gemma 2/3 normalise the raw output
  (``ln2_post``, an RMSNorm). An RMSNorm of a single direction is its gain-weighted direction
  (``RMSNorm(v) = g * v / rms(v)``, odd and scale-free), which is how the change of the raw
  output is seen by the residual stream up to one positive factor and a radial term that
  depends on the unknown unedited output (left out). The residual direction is then decoded
  by the logit lens, ``decode(r) - decode(0)`` (the final norm's bias and the unembedding's
  bias cancel), or through a tuned lens's translator at layer ``L`` first.
* **Key side (the subject).** A candidate subject's key at layer ``L`` is the MLP input at its
  last token behind each context template, averaged (how ROME computes k*, so a ROME edit's
  own subject gives exactly its k*). The edit *fires* on a key by ``||D^T k||``; the firing is
  compared with the firing on the keys of ordinary text (every position of a neutral
  paragraph), whose median sets the scale: a subject score of 10 means the edit changes that
  subject's output ten times as much as a typical token's.

Example:
    >>> keys = subject_keys_at(model, [1], ["Alice Smith", "Bob Jones"], ["{}"])
    >>> keys[1].shape                                 # [n_subjects, d_mlp]
    torch.Size([2, ...])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Float, Int

from rome_lens._typing import Model
from rome_lens.audit.health import held_out_tokens
from rome_lens.audit.lens import TunedLens, logit_lens
from rome_lens.models import access
from rome_lens.requests import subject_token_span

#: Texts run through the model at once when candidate keys are computed.
KEY_BATCH = 64


@torch.no_grad()
def direction_logits(
    model: Model,
    layer: int,
    direction: Float[torch.Tensor, " d_model"],
    lens: TunedLens | None = None,
) -> Float[torch.Tensor, " d_vocab"]:
    """Logit change a raw-MLP-output direction of block ``layer`` pushes toward (see module).

    Args:
        model: the model (its post-MLP norm, final norm and unembedding).
        layer: the block whose MLP output the direction belongs to.
        direction: a direction of raw MLP output (any scale).
        lens: a tuned lens; its translator at ``layer`` maps the residual direction first.

    Returns:
        ``decode(r) - decode(0)`` for the residual direction ``r`` (scaled to rms 1).
    """
    param = access.read_mlp_out(model, layer)
    v = direction.to(param.device, param.dtype)
    norm = access.post_mlp(model, layer)
    if norm is not None:
        v = norm(v[None, None])[0, 0]
    if lens is not None:
        weight = lens.weight[layer].to(v.device, v.dtype)
        v = v + v @ weight
    v = v * (v.shape[-1] ** 0.5) / v.norm().clamp_min(1e-30)
    logits = logit_lens(model, torch.stack([v, torch.zeros_like(v)]))
    return (logits[0] - logits[1]).float().cpu()


def oriented_logits(
    logits: Float[torch.Tensor, " d_vocab"],
) -> tuple[Float[torch.Tensor, " d_vocab"], int]:
    """Choose the sign of a singular direction (SVD leaves it open) by its sharper side.

    A written object is one token pushed far above the rest; the other side of the same
    direction is diffuse. The sign whose largest standardised logit is larger wins.

    Returns:
        ``(logits of the chosen side, sign)``.
    """
    centred = logits - logits.mean()
    return (centred, 1) if centred.max() >= -centred.min() else (-centred, -1)


def top_strings(model: Model, logits: Float[torch.Tensor, " d_vocab"], k: int) -> tuple[str, ...]:
    """The ``k`` tokens with the largest ``logits``, decoded, best first."""
    assert model.tokenizer is not None
    ids = logits.topk(min(k, int(logits.shape[0]))).indices.tolist()
    return tuple(str(model.tokenizer.decode([int(i)])) for i in ids)


def _subject_rows(
    model: Model, subjects: Sequence[str], templates: Sequence[str]
) -> tuple[list[list[int]], list[int]]:
    rows, last = [], []
    for subject in subjects:
        for template in templates:
            text = template.replace("{}", subject)
            tokens, (_, end) = subject_token_span(
                model, text, subject, char_start=template.index("{}")
            )
            rows.append(tokens.tolist())
            last.append(end - 1)
    return rows, last


def _pad(model: Model, rows: list[list[int]]) -> Int[torch.Tensor, "rows pos"]:
    pad = 0
    if model.tokenizer is not None and model.tokenizer.pad_token_id is not None:
        pad = int(model.tokenizer.pad_token_id)
    width = max(len(r) for r in rows)
    padded = torch.full((len(rows), width), pad, dtype=torch.long)
    for i, r in enumerate(rows):
        padded[i, : len(r)] = torch.tensor(r)
    return padded.to(model.cfg.device)


@torch.no_grad()
def keys_at_positions(
    model: Model, layers: Sequence[int], rows: list[list[int]], positions: list[int]
) -> dict[int, Float[torch.Tensor, "rows d_mlp"]]:
    """MLP keys at ``layers`` of each row's chosen position (right-padded batches)."""
    hooks = {layer: access.key_hook_name(layer) for layer in layers}
    out: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    for start in range(0, len(rows), KEY_BATCH):
        tokens = _pad(model, rows[start:start + KEY_BATCH])
        pos = torch.tensor(positions[start:start + KEY_BATCH], device=tokens.device)
        _, states = access.run_with_states(
            model, tokens, list(hooks.values()), stop_at_layer=max(layers) + 1,
            attention_mask=torch.ones_like(tokens),
        )
        for layer, hook in hooks.items():
            acts = states[hook]
            out[layer].append(acts[torch.arange(acts.shape[0], device=acts.device), pos].float())
    return {layer: torch.cat(parts).cpu() for layer, parts in out.items()}


def subject_keys_at(
    model: Model, layers: Sequence[int], subjects: Sequence[str], templates: Sequence[str]
) -> dict[int, Float[torch.Tensor, "n_subjects d_mlp"]]:
    """Each subject's key at each of ``layers``, averaged over ``templates`` (``{}`` slots).

    Raises:
        SubjectNotFoundError: a template does not place the subject where expected.
    """
    rows, last = _subject_rows(model, subjects, templates)
    keys = keys_at_positions(model, layers, rows, last)
    n = len(templates)
    return {layer: k.reshape(len(subjects), n, -1).mean(1) for layer, k in keys.items()}


def reference_keys_at(
    model: Model, layers: Sequence[int]
) -> dict[int, Float[torch.Tensor, "pos d_mlp"]]:
    """Keys of every position of the neutral held-out paragraph (BOS left out)."""
    tokens = held_out_tokens(model).tolist()
    keys = keys_at_positions_all(model, layers, [tokens])
    return {layer: acts[0, 1:] for layer, acts in keys.items()}


@torch.no_grad()
def keys_at_positions_all(
    model: Model, layers: Sequence[int], rows: list[list[int]]
) -> dict[int, Float[torch.Tensor, "rows pos d_mlp"]]:
    """MLP keys at ``layers`` at every position of (equal-length) rows."""
    tokens = _pad(model, rows)
    hooks = {layer: access.key_hook_name(layer) for layer in layers}
    _, states = access.run_with_states(
        model, tokens, list(hooks.values()), stop_at_layer=max(layers) + 1,
        attention_mask=torch.ones_like(tokens),
    )
    return {layer: states[hook].float().cpu() for layer, hook in hooks.items()}


def firing(
    left: Float[torch.Tensor, "d_mlp rank"],
    right: Float[torch.Tensor, "rank d_model"],
    keys: Float[torch.Tensor, "n d_mlp"],
) -> Float[torch.Tensor, " n"]:
    """``||D^T k||`` for ``D = left @ right`` and every key ``k`` (no ``D`` materialised)."""
    return ((keys.to(left.dtype) @ left) @ right).norm(dim=-1)
