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
    from safetensors.torch import load_file, save_file

    layer = access.check_layer(model, layer)
    hparams = hparams or StatisticsConfig()
    fp = base_fingerprint(model)
    tokens, corpus_id = corpus_tokens(model, corpus, hparams)
    path = cache_dir("stats") / f"{fp}-L{layer}-{corpus_id}.safetensors"
    if path.exists():
        return load_file(str(path))["mom2"].to(model.cfg.device)
    with base_weights(model):
        mom2 = _accumulate(model, layer, tokens, batch_size)
    with atomic_path(path) as tmp:
        save_file({"mom2": mom2.contiguous()}, str(tmp))
    logger.info("cached key statistics (%d tokens) at %s", tokens.numel(), path)
    return mom2.to(model.cfg.device)


def _accumulate(
    model: Model, layer: int, tokens: Int[torch.Tensor, "seq pos"], batch_size: int
) -> Float[torch.Tensor, "d_mlp d_mlp"]:
    """``E[k k^T]`` over every position of ``tokens`` (float64 accumulation of batches)."""
    d_mlp = int(access.mlp_out_weight(model, layer).shape[0])
    total = torch.zeros(d_mlp, d_mlp, dtype=torch.float64)
    count = 0
    hook = access.key_hook_name(layer)
    with torch.no_grad():
        for first in tqdm(
            range(0, tokens.shape[0], batch_size), desc=f"key statistics L{layer}", leave=False
        ):
            batch = tokens[first : first + batch_size].to(model.cfg.device)
            _, states = access.run_with_states(model, batch, [hook], stop_at_layer=layer + 1)
            keys = states[hook].reshape(-1, d_mlp).to("cpu", torch.float32)
            # float32 products (2x faster than float64 on a CPU; one batch sums a few thousand
            # rows, relative error ~1e-6), accumulated over batches in float64
            total += (keys.T @ keys).double()
            count += keys.shape[0]
    mom2 = (total / count).float()
    if not torch.isfinite(mom2).all():
        raise NonFiniteError(f"key statistics at layer {layer} contain NaN or infinity")
    return mom2
