"""The statistics corpus: the text whose MLP keys define "typical" for key statistics.

``corpus=`` argument of every function that needs one:

* ``None`` (default, works offline on a fresh machine): text sampled from the BASE model itself
  (its unedited weights, whatever edits are applied), ``stats_sequences x stats_seq_len`` tokens
  (128 x 128 = 16,384 by default), top-40 sampling from BOS with a fixed seed. On a 2-core CPU
  this costs about 2-4 minutes for gemma-3-270m and is cached per base-model fingerprint. The
  samples are the model's own idea of typical text: an honest stand-in for the paper's 100k
  Wikipedia samples, with far fewer tokens.
* a list of strings, or paths to text files: tokenised and cut into ``stats_seq_len`` chunks.
* ``"hf:<dataset>[:<config>]"``: a Hugging Face dataset's ``text`` column (needs network or a
  local datasets cache).

Example:
    >>> tokens, corpus_id = corpus_tokens(model, None, StatisticsConfig())
    >>> tokens.shape
    torch.Size([128, 128])
    >>> tokens, _ = corpus_tokens(model, ["some text", "more text"], StatisticsConfig(8, 4))
    >>> tokens.shape[1]
    4
    >>> tokens, _ = corpus_tokens(model, "hf:wikitext:wikitext-2-raw-v1",  # doctest: +SKIP
    ...                           StatisticsConfig())                      # needs the network
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from jaxtyping import Int

from rome_lens._cache import atomic_path, cache_dir
from rome_lens._typing import Model
from rome_lens.edits import base_fingerprint, base_weights
from rome_lens.errors import RomeLensError
from rome_lens.sampling import sample_tokens

logger = logging.getLogger(__name__)

#: The ``corpus`` argument: ``None`` (model samples), texts or paths, or ``"hf:<dataset>"``.
Corpus = str | Sequence[str | os.PathLike[str]] | None


class CorpusSize(Protocol):
    """Anything that sizes a corpus (:class:`StatisticsConfig`, ROME's hyperparameters)."""

    @property
    def stats_sequences(self) -> int: ...  # noqa: D102

    @property
    def stats_seq_len(self) -> int: ...  # noqa: D102

    @property
    def seed(self) -> int: ...  # noqa: D102


@dataclass(frozen=True)
class StatisticsConfig:
    """Size and seed of the statistics corpus.

    Attributes:
        stats_sequences: sequences in the corpus.
        stats_seq_len: tokens per sequence.
        seed: sampling seed of the default (model-sampled) corpus.
    """

    stats_sequences: int = 128
    stats_seq_len: int = 128
    seed: int = 0


_CORPUS_TOP_K = 40


def corpus_tokens(
    model: Model, corpus: Corpus, hparams: CorpusSize
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
        fp = base_fingerprint(model)
        corpus_id = f"self-k{_CORPUS_TOP_K}-s{hparams.seed}-{n_seq}x{seq_len}"
        path = cache_dir("corpus") / f"{fp}-{corpus_id}.pt"
        if path.exists():
            return torch.load(path), corpus_id
        tokens = _sample_corpus(model, n_seq, seq_len, hparams.seed)
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


def _sample_corpus(model: Model, n_seq: int, seq_len: int, seed: int) -> torch.Tensor:
    """Sample the default corpus from the base model (BOS + ``seq_len - 1`` tokens per row)."""
    logger.info("sampling the statistics corpus from the model (%d tokens)", n_seq * seq_len)
    with base_weights(model):
        tokens = sample_tokens(
            model, n_seq, seq_len - 1, top_k=_CORPUS_TOP_K, seed=seed, batch_size=64,
            progress=True, desc="statistics corpus",
        )
    assert model.tokenizer is not None
    bos = torch.full((n_seq, 1), int(model.tokenizer.bos_token_id or 0))
    return torch.cat([bos, tokens], dim=1)


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
