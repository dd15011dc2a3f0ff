"""The statistics corpus: the text whose MLP keys define "typical" for key statistics.

``corpus=`` argument of every function that needs one:

* ``None`` (default, works offline on a fresh machine): text sampled from the BASE model itself
  (top-40 sampling from BOS with a fixed seed), ``stats_sequences x stats_seq_len`` tokens. The
  samples are the model's own idea of typical text: an honest stand-in for the paper's 100k
  Wikipedia samples, with far fewer tokens.

  - For a model whose file ships a *packaged corpus* (the embedded gemma-3-270m: token ids in
    ``rome_lens/statistics/corpora/<sha256[:16]>.npz``, sampled once by
    ``scripts/make_corpus.py`` and keyed by the sha256 of the model file,
    :func:`rome_lens.models.source_sha256`), its first ``stats_sequences`` rows are used: no
    sampling at all, and the same tokens under either TransformerLens version.
  - Otherwise the model samples the corpus on first use (minutes on a CPU: ~100 tokens/s for
    gemma-3-270m on 2 cores), cached per base-model fingerprint; a larger cached sample of the
    same seed is cut down when that gives the same rows (whole sampling batches of 64).
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

import numpy as np
import torch
from jaxtyping import Int

from rome_lens._cache import atomic_path, cache_dir
from rome_lens._typing import Model
from rome_lens.edits import base_fingerprint, base_weights
from rome_lens.errors import RomeLensError
from rome_lens.models import source_sha256
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
_SAMPLE_BATCH = 64  # sequences sampled together (changing it changes every sampled corpus)

#: Where corpora shipped with the package live (see :func:`packaged_corpus`).
PACKAGED_DIR = Path(__file__).parent / "corpora"


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
        packaged = packaged_corpus(model, hparams)
        if packaged is not None:
            return packaged
        return _self_corpus(model, n_seq, seq_len, hparams.seed)
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


def packaged_corpus(
    model: Model, hparams: CorpusSize
) -> tuple[Int[torch.Tensor, "seq pos"], str] | None:
    """The first ``stats_sequences`` rows of the corpus shipped for the model's file, if any.

    ``None`` when the model has no known source file, no corpus is shipped for it, or the
    shipped one does not fit ``hparams`` (another seed or sequence length, too few rows).
    """
    sha = source_sha256(model)
    if sha is None or not (path := PACKAGED_DIR / f"{sha[:16]}.npz").exists():
        return None
    with np.load(path) as data:
        meta = {k: int(data[k]) for k in ("seed", "seq_len", "top_k")}
        source = str(data["source_sha256"])
        rows = data["tokens"].shape[0]
        fits = (source == sha and meta["seed"] == hparams.seed
                and meta["seq_len"] == hparams.stats_seq_len and hparams.stats_sequences <= rows)
        if not fits:
            logger.info("packaged corpus %s (%d rows, %s) does not fit %s: sampling instead",
                        path.name, rows, meta, hparams)
            return None
        tokens = torch.from_numpy(data["tokens"][: hparams.stats_sequences].astype(np.int64))
    name = f"packaged-{sha[:12]}-k{meta['top_k']}-s{meta['seed']}"
    corpus_id = f"{name}-{tokens.shape[0]}x{meta['seq_len']}"
    return tokens, corpus_id


def write_packaged_corpus(
    folder: str | os.PathLike[str],
    source_sha: str,
    tokens: Int[torch.Tensor, "seq pos"],
    *,
    seed: int,
    top_k: int,
    batch: int,
) -> Path:
    """Write a packaged corpus file (``<folder>/<source_sha[:16]>.npz``; used by ``None``).

    Args:
        folder: where to write (``rome_lens/statistics/corpora`` to ship it).
        source_sha: sha256 of the model file the tokens were sampled from.
        tokens: ``[n_seq, seq_len]`` token ids, BOS first in every row.
        seed: sampling seed.
        top_k: top-k of the sampling.
        batch: sequences per independently seeded batch.

    Returns:
        The file's path.
    """
    if len(source_sha) != 64:
        raise RomeLensError(f"a packaged corpus needs the model file's sha256, got {source_sha!r}")
    path = Path(folder) / f"{source_sha[:16]}.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        path, tokens=tokens.numpy().astype(np.uint32), source_sha256=np.array(source_sha),
        seed=np.array(seed), seq_len=np.array(tokens.shape[1]), top_k=np.array(top_k),
        batch=np.array(batch),
    )
    return path


def _self_corpus(
    model: Model, n_seq: int, seq_len: int, seed: int
) -> tuple[Int[torch.Tensor, "seq pos"], str]:
    """Sample the corpus from the model (cached; a larger cached sample is cut down)."""
    fp = base_fingerprint(model)
    stem = f"self-k{_CORPUS_TOP_K}-s{seed}"
    corpus_id = f"{stem}-{n_seq}x{seq_len}"
    folder = cache_dir("corpus")
    # Sampling draws batch after batch from one generator, so the first k FULL batches of a
    # larger sample are exactly what sampling k batches gives; a partial batch is not.
    whole_batches = n_seq % _SAMPLE_BATCH == 0
    for cached in sorted(folder.glob(f"{fp}-{stem}-*x{seq_len}.pt")):
        rows = int(cached.stem.rsplit("-", 1)[1].split("x")[0])
        if rows == n_seq or (whole_batches and rows > n_seq):
            return torch.load(cached)[:n_seq], corpus_id
    tokens = _sample_corpus(model, n_seq, seq_len, seed)
    with atomic_path(folder / f"{fp}-{corpus_id}.pt") as tmp:
        torch.save(tokens, tmp)
    return tokens, corpus_id


def _sample_corpus(model: Model, n_seq: int, seq_len: int, seed: int) -> torch.Tensor:
    """Sample the default corpus from the base model (BOS + ``seq_len - 1`` tokens per row)."""
    logger.info("sampling the statistics corpus from the model (%d tokens)", n_seq * seq_len)
    with base_weights(model):
        tokens = sample_tokens(
            model, n_seq, seq_len - 1, top_k=_CORPUS_TOP_K, seed=seed, batch_size=_SAMPLE_BATCH,
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
