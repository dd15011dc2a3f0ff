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

Candidate keys are the costly part of a scan against a dataset's subjects (one forward row per
subject and template). With ``cache=True`` they are stored per layer under the cache directory
(``subject_keys/``), named by the weights that feed that layer's keys: the base fingerprint
plus the ids of the applied edits with a site BELOW the layer (an edit at layer ``L`` or above
cannot change a key at ``L``), the dtype, the templates and the subjects. A scan with the base
weights, or of single-layer edits at or above the layer, so reads the keys computed once for the
base model.

Example:
    >>> keys = subject_keys_at(model, [1], ["Alice Smith", "Bob Jones"], ["{}"])
    >>> keys[1].shape                                 # [n_subjects, d_mlp]
    torch.Size([2, ...])
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from jaxtyping import Float, Int
from tqdm.auto import tqdm

from rome_lens._cache import atomic_path, cache_dir
from rome_lens._typing import Model
from rome_lens.audit.health import held_out_tokens
from rome_lens.audit.lens import TunedLens, logit_lens
from rome_lens.edits.registry import applied_edits, base_fingerprint, in_base_weights
from rome_lens.models import access
from rome_lens.requests import subject_token_span

logger = logging.getLogger(__name__)

#: Texts run through the model at once when candidate keys are computed.
KEY_BATCH = 64
#: Texts (subjects x templates) whose keys are held before they are averaged per subject.
KEY_CHUNK_ROWS = 4096


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
    # rows of similar length share a batch, so little of each batch is padding
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    for start in range(0, len(rows), KEY_BATCH):
        chosen = order[start:start + KEY_BATCH]
        tokens = _pad(model, [rows[i] for i in chosen])
        pos = torch.tensor([positions[i] for i in chosen], device=tokens.device)
        _, states = access.run_with_states(
            model, tokens, list(hooks.values()), stop_at_layer=max(layers) + 1,
            attention_mask=torch.ones_like(tokens),
        )
        for layer, hook in hooks.items():
            acts = states[hook]
            out[layer].append(acts[torch.arange(acts.shape[0], device=acts.device), pos].float())
    inverse = torch.argsort(torch.tensor(order))
    return {layer: torch.cat(parts).cpu()[inverse] for layer, parts in out.items()}


def subject_keys_at(
    model: Model, layers: Sequence[int], subjects: Sequence[str], templates: Sequence[str],
    *, cache: bool = False,
) -> dict[int, Float[torch.Tensor, "n_subjects d_mlp"]]:
    """Each subject's key at each of ``layers``, averaged over ``templates`` (``{}`` slots).

    Args:
        model: the model whose keys are read (as it is: edited or not).
        layers: the blocks.
        subjects: the subject strings.
        templates: context templates, one ``{}`` slot each.
        cache: read and write each layer's keys in the on-disk cache (module docstring); the
            layers not found there are computed together, in one pass per chunk of subjects.

    Returns:
        ``{layer: [n_subjects, d_mlp] float32 keys}`` on the CPU.

    Raises:
        SubjectNotFoundError: a template does not place the subject where expected.
    """
    paths = ({layer: key_cache_path(model, layer, subjects, templates) for layer in layers}
             if cache else {})
    found = {layer: keys for layer, path in paths.items()
             if (keys := _read_keys(path, len(subjects))) is not None}
    missing = [layer for layer in dict.fromkeys(layers) if layer not in found]
    if missing:
        computed = _compute_subject_keys(model, missing, subjects, templates)
        for layer, keys in computed.items():
            if layer in paths:
                _write_keys(paths[layer], keys)
        found |= computed
    return {layer: found[layer] for layer in layers}


def _compute_subject_keys(
    model: Model, layers: Sequence[int], subjects: Sequence[str], templates: Sequence[str]
) -> dict[int, Float[torch.Tensor, "n_subjects d_mlp"]]:
    """Keys averaged over templates, a chunk of subjects at a time (bounded memory)."""
    n = len(templates)
    step = max(1, KEY_CHUNK_ROWS // n)
    parts: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    starts = range(0, len(subjects), step)
    bar = tqdm(starts, desc=f"subject keys L{max(layers)}", unit="chunk", leave=False,
               disable=len(starts) < 2)
    for start in bar:
        chunk = subjects[start:start + step]
        rows, last = _subject_rows(model, chunk, templates)
        for layer, keys in keys_at_positions(model, layers, rows, last).items():
            parts[layer].append(keys.reshape(len(chunk), n, -1).mean(1))
    return {layer: torch.cat(chunks) for layer, chunks in parts.items()}


def key_state(model: Model, layer: int) -> str:
    """Name the weights that feed ``layer``'s keys: base fingerprint + applied edits below it.

    Inside :func:`~rome_lens.edits.base_weights` the model is its base, whatever is applied.
    """
    edits = [] if in_base_weights(model) else applied_edits(model)
    below = [e.id for e in edits if any(site.layer < layer for site in e.sites)]
    return "+".join([base_fingerprint(model), *below])


def key_cache_path(
    model: Model, layer: int, subjects: Sequence[str], templates: Sequence[str]
) -> Path:
    """Where the keys of ``subjects`` at ``layer`` of the model as it is are cached."""
    dtype = str(access.read_mlp_out(model, layer).dtype)
    spec = json.dumps([key_state(model, layer), layer, dtype, list(templates), list(subjects)])
    digest = hashlib.sha256(spec.encode()).hexdigest()[:24]
    return cache_dir("subject_keys") / f"{base_fingerprint(model)}-L{layer}-{digest}.safetensors"


def _read_keys(path: Path, n_subjects: int) -> torch.Tensor | None:
    if not path.exists():
        return None
    from safetensors.torch import load_file

    keys = load_file(str(path))["keys"]
    if keys.shape[0] != n_subjects:  # a damaged or foreign file: computed again
        logger.warning("ignoring %s: %d keys, expected %d", path, keys.shape[0], n_subjects)
        return None
    return keys


def _write_keys(path: Path, keys: torch.Tensor) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({"keys": keys.contiguous()}, str(tmp))
    logger.info("cached %d candidate keys at %s", keys.shape[0], path)

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
