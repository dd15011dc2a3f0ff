"""Second moment of MLP keys, C = E[k k^T], the "memory" ROME's update is whitened by.

ROME's update direction is ``C^-1 k*``: it changes the output for the subject's key while
disturbing keys that typical text produces as little as possible (MEMIT and AlphaEdit use the
same C). C is a property of the BASE model: it is computed on the unedited weights (exactly, via
the edit registry) from the keys (``blocks.L.mlp.hook_post``) at every position of the
statistics corpus (:mod:`rome_lens.statistics.corpus`), and cached on disk under (base-model
fingerprint, layer, corpus, token count). So it is computed once per model and layer, reused
under any stack of applied edits, and can never be reused for another model, layer or corpus by
accident.

Example:
    >>> C = second_moment(model, layer=1)                     # model-sampled corpus, cached
    >>> C.shape == (model.cfg.d_mlp, model.cfg.d_mlp), C.dtype
    (True, torch.float32)
    >>> texts = ["The quick brown fox jumps over the lazy dog. "] * 60   # your own texts
    >>> C = second_moment(model, 1, corpus=texts, hparams=StatisticsConfig(16, 32))  # 16 x 32
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from jaxtyping import Float, Int
from tqdm.auto import tqdm

from rome_lens._cache import atomic_path, cache_dir
from rome_lens._typing import Model
from rome_lens.edits import base_fingerprint, base_weights
from rome_lens.errors import NonFiniteError
from rome_lens.models import access
from rome_lens.statistics.corpus import Corpus, CorpusSize, StatisticsConfig, corpus_tokens

logger = logging.getLogger(__name__)


def second_moment(
    model: Model,
    layer: int,
    corpus: Corpus = None,
    hparams: CorpusSize | None = None,
    batch_size: int = 16,
) -> Float[torch.Tensor, "d_mlp d_mlp"]:
    """Uncentered second moment ``E[k k^T]`` of the MLP keys at ``layer`` (cached on disk).

    Args:
        model: the model.
        layer: block index.
        corpus: statistics corpus (see module docstring); ``None`` = model samples.
        hparams: corpus size and seed (defaults: :class:`StatisticsConfig`; ROME's
            hyperparameters work too).
        batch_size: sequences per forward pass.

    Returns:
        A float32 ``[d_mlp, d_mlp]`` matrix on the model's device.

    Raises:
        NonFiniteError: if the keys contain NaN or infinity.
    """
    return second_moments(model, [layer], corpus, hparams, batch_size)[layer]


def second_moments(
    model: Model,
    layers: Sequence[int],
    corpus: Corpus = None,
    hparams: CorpusSize | None = None,
    batch_size: int = 16,
) -> dict[int, Float[torch.Tensor, "d_mlp d_mlp"]]:
    """:func:`second_moment` of several layers, the uncached ones from ONE pass of the corpus.

    Example:
        >>> moments = second_moments(model, range(model.cfg.n_layers))   # every layer at once
        >>> sorted(moments) == list(range(model.cfg.n_layers))
        True
    """
    from safetensors.torch import load_file, save_file

    wanted = sorted({access.check_layer(model, layer) for layer in layers})
    hparams = hparams or StatisticsConfig()
    fp = base_fingerprint(model)
    tokens, corpus_id = corpus_tokens(model, corpus, hparams)
    paths = {layer: cache_dir("stats") / f"{fp}-L{layer}-{corpus_id}.safetensors"
             for layer in wanted}
    out = {layer: load_file(str(path))["mom2"] for layer, path in paths.items() if path.exists()}
    missing = [layer for layer in wanted if layer not in out]
    if missing:
        with base_weights(model):
            computed = _accumulate(model, missing, tokens, batch_size)
        for layer, mom2 in computed.items():
            with atomic_path(paths[layer]) as tmp:
                save_file({"mom2": mom2.contiguous()}, str(tmp))
        logger.info("cached key statistics of layers %s (%d tokens)", missing, tokens.numel())
        out.update(computed)
    return {layer: out[layer].to(model.cfg.device) for layer in wanted}


def _accumulate(
    model: Model, layers: Sequence[int], tokens: Int[torch.Tensor, "seq pos"], batch_size: int
) -> dict[int, Float[torch.Tensor, "d_mlp d_mlp"]]:
    """``E[k k^T]`` at each of ``layers`` over every position of ``tokens`` (one pass)."""
    hooks = {layer: access.key_hook_name(layer) for layer in layers}
    sizes = {layer: int(access.mlp_out_weight(model, layer).shape[0]) for layer in layers}
    totals = {layer: torch.zeros(n, n, dtype=torch.float64) for layer, n in sizes.items()}
    count = 0
    name = f"L{layers[0]}" if len(layers) == 1 else f"{len(layers)} layers"
    with torch.no_grad():
        for first in tqdm(
            range(0, tokens.shape[0], batch_size), desc=f"key statistics {name}", leave=False
        ):
            batch = tokens[first : first + batch_size].to(model.cfg.device)
            _, states = access.run_with_states(model, batch, list(hooks.values()),
                                               stop_at_layer=max(layers) + 1)
            for layer, hook in hooks.items():
                keys = states[hook].reshape(-1, sizes[layer]).to("cpu", torch.float32)
                # float32 products (2x faster than float64 on a CPU; one batch sums a few
                # thousand rows, relative error ~1e-6), accumulated over batches in float64
                totals[layer] += (keys.T @ keys).double()
            count += batch.numel()
    out = {}
    for layer, total in totals.items():
        mom2 = (total / count).float()
        if not torch.isfinite(mom2).all():
            raise NonFiniteError(f"key statistics at layer {layer} contain NaN or infinity")
        out[layer] = mom2
    return out
