"""Second moment of MLP keys, C = E[k k^T], the "memory" ROME's update is whitened by.

ROME's update direction is ``C^-1 k*``: it changes the output for the subject's key while
disturbing keys that typical text produces as little as possible. C is computed once per
(model fingerprint, layer, corpus, token count) from the keys (``blocks.L.mlp.hook_post``) at
every position of a text corpus, and cached on disk under exactly that key, so a statistic can
never be reused for another model, layer or corpus by accident.

Corpus (``corpus=`` argument):

* ``None`` (default, works offline on a fresh machine): text sampled from the model itself,
  ``stats_sequences x stats_seq_len`` tokens (128 x 128 = 16,384 by default), top-40 sampling
  from BOS with a fixed seed. On a 2-core CPU this costs about 2-3 minutes for gemma-3-270m
  (dominated by the 262k-token unembedding at every sampled step) and is cached. The samples are
  the model's own idea of typical text; they are an honest stand-in for the paper's 100k
  Wikipedia samples, with far fewer tokens.
* a list of strings, or paths to text files: tokenised and cut into ``stats_seq_len`` chunks.
* ``"hf:<dataset>[:<config>]"``: a Hugging Face dataset's ``text`` column (needs network or a
  local datasets cache).

Example:
    >>> C = second_moment(model, layer=4)                     # [d_mlp, d_mlp], float32
    >>> C = second_moment(model, 4, corpus=["some text", ...])
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from jaxtyping import Float, Int
from tqdm.auto import tqdm

from rome_lens._cache import atomic_path, cache_dir
from rome_lens._typing import Model
from rome_lens.errors import NonFiniteError, RomeLensError
from rome_lens.models import access
from rome_lens.rome.hparams import RomeHyperParams
from rome_lens.sampling import sample_tokens

logger = logging.getLogger(__name__)

from rome_lens.corpus_types import Corpus  # noqa: E402

_CORPUS_TOP_K = 40


def corpus_tokens(
    model: Model, corpus: Corpus, hparams: RomeHyperParams
) -> tuple[Int[torch.Tensor, "seq pos"], str]:
    """Tokens of the statistics corpus and a short id that names it in cache keys.

    Args:
        model: the model (its tokenizer, and its samples for the default corpus).
        corpus: see the module docstring.
        hparams: corpus size (``stats_sequences``, ``stats_seq_len``) and seed.

    Returns:
        ``(tokens [n_seq, seq_len], corpus_id)``.
    """
    n_seq, seq_len = hparams.stats_sequences, hparams.stats_seq_len
    if corpus is None:
        fp = access.weights_fingerprint(model)
        corpus_id = f"self-k{_CORPUS_TOP_K}-s{hparams.seed}-{n_seq}x{seq_len}"
        path = cache_dir("corpus") / f"{fp}-{corpus_id}.pt"
        if path.exists():
            return torch.load(path), corpus_id
        logger.info("sampling the statistics corpus from the model (%d tokens)", n_seq * seq_len)
        tokens = sample_tokens(
            model,
            n_seq,
            seq_len - 1,
            top_k=_CORPUS_TOP_K,
            seed=hparams.seed,
            batch_size=64,
            progress=True,
            desc="statistics corpus",
        )
        assert model.tokenizer is not None
        bos = torch.full((n_seq, 1), int(model.tokenizer.bos_token_id or 0))
        tokens = torch.cat([bos, tokens], dim=1)
        with atomic_path(path) as tmp:
            torch.save(tokens, tmp)
        return tokens, corpus_id
    texts = _read_texts(corpus)
    digest = hashlib.sha256("\x00".join(texts).encode()).hexdigest()[:16]
    ids: list[int] = []
    for text in texts:
        ids.extend(model.to_tokens(text, prepend_bos=False, truncate=False)[0].tolist())
    if len(ids) < seq_len:
        raise RomeLensError(f"statistics corpus has {len(ids)} tokens; need >= {seq_len}")
    n = min(n_seq, len(ids) // seq_len)
    tokens = torch.tensor(ids[: n * seq_len]).reshape(n, seq_len)
    return tokens, f"texts-{digest}-{n}x{seq_len}"


def _read_texts(corpus: str | Sequence[str | os.PathLike[str]]) -> list[str]:
    if isinstance(corpus, str) and corpus.startswith("hf:"):
        from datasets import load_dataset  # optional, needs network or a local cache

        parts = corpus[3:].split(":")
        data = load_dataset(parts[0], parts[1] if len(parts) > 1 else None, split="train")
        return [t for t in data["text"] if t.strip()]
    items = [corpus] if isinstance(corpus, str) else list(corpus)
    texts = []
    for item in items:
        path = Path(item)
        if isinstance(item, os.PathLike) or _is_file(path):
            texts.append(path.read_text())
        else:
            texts.append(str(item))
    if not any(t.strip() for t in texts):
        raise RomeLensError("statistics corpus is empty")
    return texts


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except (OSError, ValueError):  # a long text or one with NUL is not a path
        return False


def second_moment(
    model: Model,
    layer: int,
    corpus: Corpus = None,
    hparams: RomeHyperParams | None = None,
    batch_size: int = 16,
) -> Float[torch.Tensor, "d_mlp d_mlp"]:
    """Uncentered second moment ``E[k k^T]`` of the MLP keys at ``layer`` (cached on disk).

    Args:
        model: the model.
        layer: block index.
        corpus: statistics corpus (see module docstring); ``None`` = model samples.
        hparams: corpus size and seed (defaults: :class:`RomeHyperParams`).
        batch_size: sequences per forward pass.

    Returns:
        A float32 ``[d_mlp, d_mlp]`` matrix on the model's device.

    Raises:
        NonFiniteError: if the keys contain NaN or infinity.
    """
    from safetensors.torch import load_file, save_file

    layer = access.check_layer(model, layer)
    hparams = hparams or RomeHyperParams()
    fp = access.weights_fingerprint(model)
    tokens, corpus_id = corpus_tokens(model, corpus, hparams)
    path = cache_dir("stats") / f"{fp}-L{layer}-{corpus_id}.safetensors"
    if path.exists():
        return load_file(str(path))["mom2"].to(model.cfg.device)
    d_mlp = int(access.mlp_out_weight(model, layer).shape[0])
    total = torch.zeros(d_mlp, d_mlp, dtype=torch.float64)
    count = 0
    hook = access.key_hook_name(layer)
    with torch.no_grad():
        for first in tqdm(
            range(0, tokens.shape[0], batch_size), desc=f"key statistics L{layer}", leave=False
        ):
            batch = tokens[first : first + batch_size].to(model.cfg.device)
            _, cache = model.run_with_cache(
                batch, names_filter=hook, stop_at_layer=layer + 1, return_type=None
            )
            keys = cache[hook].reshape(-1, d_mlp).to("cpu", torch.float64)
            total += keys.T @ keys
            count += keys.shape[0]
    mom2 = (total / count).float()
    if not torch.isfinite(mom2).all():
        raise NonFiniteError(f"key statistics at layer {layer} contain NaN or infinity")
    with atomic_path(path) as tmp:
        save_file({"mom2": mom2.contiguous()}, str(tmp))
    logger.info("cached key statistics (%d tokens) at %s", count, path)
    return mom2.to(model.cfg.device)
