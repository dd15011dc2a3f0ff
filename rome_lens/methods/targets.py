"""Target hidden states z of many requests (MEMIT's first step), batched and cached.

For each request, a change ``delta`` of the raw MLP output of the LAST layer of the edited range
(at the last subject token of every value prompt) is optimised exactly as ROME's v*
(:func:`rome_lens.rome.optimise_values`: NLL of the new object over context-prefixed prompts, KL
on "{subject} is a", decay, clamp). The target of each prompt (row) is then the residual stream
leaving that layer with ``delta`` added: the hidden state the layers' updates must produce
together (``z``: its mean over the request's prompts).

Requests are optimised ``hparams.z_batch`` at a time (each independently: own loss, clamp and
early stop). The deltas can be cached on disk per (base model, applied edits, request,
hyperparameters, layer), so runs and methods that share requests share them.

Example:
    >>> from rome_lens.methods import default_memit_hparams
    >>> hp = default_memit_hparams(model)
    >>> chunks = request_chunks(model, [request], hp)
    >>> targets = optimise_targets(model, chunks, hp, z_layer=hp.layers[-1])
    >>> targets.z.shape, targets.delta.shape            # [n_requests, d_model] each
    (torch.Size([1, 32]), torch.Size([1, 32]))
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from tqdm.auto import tqdm

from rome_lens._cache import atomic_path, cache_dir
from rome_lens._typing import Model
from rome_lens.edits import applied_ids, base_fingerprint, base_weights
from rome_lens.models import access
from rome_lens.requests import EditRequest
from rome_lens.rome import (
    RomeHyperParams,
    ValueBatch,
    optimise_values,
    subject_keys,
    value_batch,
)
from rome_lens.rome.forwards import ValueLoop, effective_loop, make_forward
from rome_lens.statistics import context_templates
from rome_lens.threads import fit_threads

logger = logging.getLogger(__name__)

# Fields of the hyperparameters that change a request's delta (the cache key).
_Z_FIELDS = (
    "v_num_grad_steps", "v_lr", "clamp_norm_factor", "kl_factor", "v_weight_decay",
    "early_stop_loss", "n_contexts_short", "context_len_short", "n_contexts_long",
    "context_len_long", "context_top_k", "kl_prompt", "seed", "z_precision",
)


@dataclass
class RequestChunk:
    """A group of requests optimised together, with their prompts.

    Attributes:
        requests: the requests.
        batch: their value and KL prompts (:func:`rome_lens.rome.value_batch`).
        key_tokens: the value prompts cut after the last subject token ``[rows, width]``.
        key_last: position of the last subject token of every row.
        row_request: index (within the chunk) of every row's request.
    """

    requests: list[EditRequest]
    batch: ValueBatch
    key_tokens: Int[torch.Tensor, "rows width"]
    key_last: Int[torch.Tensor, " rows"]
    row_request: Int[torch.Tensor, " rows"]


@dataclass
class Targets:
    """What the lower layers must produce: ``z`` per request, and the optimised ``delta``."""

    z: Float[torch.Tensor, "n d_model"]
    delta: Float[torch.Tensor, "n d_model"]
    final_losses: list[float]
    cached: int
    seconds: float = 0.0  # optimisation time of all deltas (as first measured, if cached)
    z_rows: Float[torch.Tensor, "rows d_model"] | None = None  # z of every prompt (row)


def request_chunks(
    model: Model, requests: Sequence[EditRequest], hparams: Any
) -> list[RequestChunk]:
    """Build the prompts of every request, ``hparams.z_batch`` requests per chunk.

    Raises:
        SubjectNotFoundError, InvalidRequestError, PromptTooLongError: a bad request (before
            any expensive work).
    """
    templates = context_templates(model, hparams)
    chunks = []
    for first in range(0, len(requests), hparams.z_batch):
        part = list(requests[first : first + hparams.z_batch])
        batch = value_batch(model, part, templates, hparams.kl_prompt)
        last = batch.subject_last[: batch.n_value]
        width = int(last.max()) + 1
        tokens = batch.tokens[: batch.n_value, :width].clone()
        chunks.append(RequestChunk(part, batch, tokens, last, batch.row_request[: batch.n_value]))
    return chunks


def subject_rows(
    model: Model, chunk: RequestChunk, hooks: Sequence[str], stop_at_layer: int,
) -> dict[str, Float[torch.Tensor, "rows d"]]:
    """Activations of ``hooks`` at the last subject token of every row of ``chunk``."""
    with torch.no_grad():
        _, states = access.run_with_states(
            model, chunk.key_tokens, list(hooks), stop_at_layer=stop_at_layer,
            attention_mask=torch.ones_like(chunk.key_tokens),
        )
    rows = torch.arange(chunk.key_tokens.shape[0])
    return {hook: states[hook][rows, chunk.key_last.to(states[hook].device)].float()
            for hook in hooks}


def chunk_index(chunks: Sequence[RequestChunk]) -> Int[torch.Tensor, " rows"]:
    """Index of every row's request over all ``chunks`` (rows in chunk order).

    Example:
        >>> hp = rome_lens.MemitHyperParams(n_contexts_short=1, n_contexts_long=1)
        >>> chunk_index(request_chunks(model, [request], hp))   # bare + 2 context rows
        tensor([0, 0, 0])
    """
    index, offset = [], 0
    for chunk in chunks:
        index.append(chunk.row_request + offset)
        offset += len(chunk.requests)
    return torch.cat(index)


def first_rows(index: Int[torch.Tensor, " rows"]) -> Int[torch.Tensor, " n"]:
    """The first row of every request (its bare edit prompt: the ``"{}"`` template comes first).

    Example:
        >>> first_rows(torch.tensor([0, 0, 1, 1, 1]))
        tensor([0, 2])
    """
    n, rows = int(index.max()) + 1, torch.arange(len(index))
    return torch.full((n,), len(index)).scatter_reduce_(0, index.cpu(), rows, "amin")


def request_means(
    rows: Float[torch.Tensor, "rows d"], row_request: Int[torch.Tensor, " rows"], n: int
) -> Float[torch.Tensor, "n d"]:
    """Mean of the rows of each request."""
    sums = torch.zeros(n, rows.shape[-1], dtype=rows.dtype, device=rows.device)
    sums.index_add_(0, row_request.to(rows.device), rows)
    counts = torch.bincount(row_request.to(rows.device), minlength=n)
    return sums / counts[:, None].to(sums.dtype)


def subject_means(
    model: Model, chunk: RequestChunk, hooks: Sequence[str], stop_at_layer: int,
) -> dict[str, Float[torch.Tensor, "n d"]]:
    """Activations of ``hooks`` at the last subject token, averaged over each request's rows."""
    picked = subject_rows(model, chunk, hooks, stop_at_layer)
    n = len(chunk.requests)
    return {hook: request_means(rows, chunk.row_request, n) for hook, rows in picked.items()}


def target_states(
    model: Model, chunk: RequestChunk, z_layer: int, delta: Float[torch.Tensor, "n d_model"]
) -> Float[torch.Tensor, "rows d_model"]:
    """Residual leaving ``z_layer`` at the last subject token of every row, ``delta`` added."""
    mask = torch.zeros(*chunk.key_tokens.shape, 1)
    mask[torch.arange(mask.shape[0]), chunk.key_last] = 1.0
    rows = delta[chunk.row_request][:, None, :]

    def add(out: torch.Tensor) -> torch.Tensor:
        return out + mask.to(out.device, out.dtype) * rows.to(out.device, out.dtype)

    hook = access.resid_post_hook_name(z_layer)
    with access.raw_mlp_output_hook(model, z_layer, add):
        return subject_rows(model, chunk, [hook], z_layer + 1)[hook]


def _cache_key(model: Model, request: EditRequest, hparams: Any, z_layer: int, loop: str) -> str:
    spec = {
        "base": base_fingerprint(model), "applied": list(applied_ids(model)),
        "request": request.to_dict(), "layer": z_layer, "loop": loop,
        "hparams": {name: getattr(hparams, name, None) for name in _Z_FIELDS},
    }
    if _base_scale(model, hparams):  # else the same computation as without the option
        spec["value_scale"] = "base"
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:32]


def _base_scale(model: Model, hparams: Any) -> bool:
    """Whether the targets' clamp scale comes from the base model and differs from now."""
    return bool(getattr(hparams, "base_value_scale", False)) and bool(applied_ids(model))


def _optimise_chunk(
    model: Model, chunk: RequestChunk, hparams: RomeHyperParams, z_layer: int, loop: ValueLoop
) -> tuple[torch.Tensor, list[float]]:
    k_star, resid = subject_keys(model, z_layer, chunk.batch, keep_residual=loop == "residual")
    # v_orig only scales the deltas' clamp and decay: from the base model when asked.
    scale_from = base_weights(model) if _base_scale(model, hparams) else nullcontext()
    with torch.no_grad(), scale_from:
        v_orig = access.mlp_value(model, z_layer, k_star)
    forward = make_forward(model, z_layer, chunk.batch, loop, resid, v_orig.dtype)
    delta, _, final = optimise_values(model, z_layer, chunk.batch, v_orig, forward, hparams)
    return delta, final


def optimise_targets(
    model: Model,
    chunks: Sequence[RequestChunk],
    hparams: Any,
    z_layer: int,
    loop: ValueLoop = "prefix_cache",
    cache: bool = False,
    progress: bool = True,
) -> Targets:
    """Optimise (or load) every request's delta at ``z_layer`` and compute its target z.

    Args:
        model: the model, with any earlier edits applied (the targets are computed on it).
        chunks: from :func:`request_chunks`.
        hparams: value-optimisation settings (any :class:`~rome_lens.rome.RomeHyperParams`).
        z_layer: the last layer of the edited range.
        loop: forward strategy of the optimisation (:mod:`rome_lens.rome.forwards`).
        cache: read and write deltas in the on-disk cache (``targets/``).
        progress: show a progress bar.
    """
    from safetensors.torch import load_file, save_file

    loop = effective_loop(model, loop)
    zs, deltas, finals, n_cached, seconds = [], [], [], 0, 0.0
    for chunk in tqdm(chunks, desc=f"targets z (layer {z_layer})", disable=not progress):
        keys = [_cache_key(model, r, hparams, z_layer, loop) for r in chunk.requests]
        paths = [cache_dir("targets") / f"{k}.safetensors" for k in keys]
        if cache and all(p.exists() for p in paths):
            loaded = [load_file(str(p)) for p in paths]
            delta = torch.stack([d["delta"] for d in loaded]).to(model.cfg.device)
            final = [float(d["loss"]) for d in loaded]
            seconds += sum(float(d["seconds"]) for d in loaded if "seconds" in d)
            n_cached += len(paths)
        else:
            fit_threads()  # per chunk: a busy spell at the start must not last the whole run
            t0 = time.perf_counter()
            delta, final = _optimise_chunk(model, chunk, hparams, z_layer, loop)
            share = (time.perf_counter() - t0) / len(chunk.requests)
            seconds += share * len(chunk.requests)
            for path, row, loss in zip(paths, delta, final, strict=True) if cache else ():
                entry = {"delta": row.cpu().contiguous(), "loss": torch.tensor(loss),
                         "seconds": torch.tensor(share)}
                with atomic_path(path) as tmp:
                    save_file(entry, str(tmp))
        zs.append(target_states(model, chunk, z_layer, delta).cpu())
        deltas.append(delta.cpu())
        finals.extend(final)
    z_rows = torch.cat(zs)
    z = request_means(z_rows, chunk_index(chunks), len(finals))
    return Targets(z, torch.cat(deltas), finals, n_cached, seconds, z_rows)
