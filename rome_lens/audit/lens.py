"""Lenses: read the next-token distribution off an intermediate residual stream.

* The **logit lens** decodes the residual after block ``l`` with the model's own final norm and
  unembedding (:func:`logit_lens`). At the last block it is the model's output distribution.
* The **tuned lens** (Belrose et al. 2023) first applies a per-layer affine translator
  ``h -> h + A_l h + b_l``, trained so that the decoded distribution matches the final layer's
  on ordinary text; it is more faithful in early layers. The last block's translator is the
  identity and is never trained.

Training (:func:`train_tuned_lens`) has two stages, both seeded:

1. a closed-form ridge least-squares fit of ``A_l, b_l`` mapping ``h_l`` to the final residual
   (exact and fast; a good start because decoding is the same map for both);
2. Adam on the KL divergence ``KL(p_final || p_lens)``. With a 262k-token vocabulary a full
   softmax per step is too slow on a CPU, so the KL is taken over a fixed vocabulary subset:
   the union of the final layer's top tokens on the training text (``vocab_top_k`` per token,
   capped at ``max_vocab``), renormalised on both sides. On small vocabularies the subset is the
   whole vocabulary and the KL is exact.

The training text is the model-sampled statistics corpus of ROME (cached), or any corpus
:func:`~rome_lens.statistics.corpus_tokens` accepts. Position 0 (BOS, whose residual norm
is an outlier in many models) is left out.

A lens describes the UNEDITED model, like the shared statistics: it is trained on the base
weights (:func:`~rome_lens.edits.base_weights` restores them exactly under any stack of applied
edits) and cached per base-model fingerprint and training settings, so probing an edited model
reads it through the lens of the model before the edit, and the lens is trained once per base
model. ``rome-lens tuned-lens`` trains one from the command line.

Example:
    >>> lens = tuned_lens(model)                  # trains once (progress bar), then cached
    >>> _, cache = model.run_with_cache("The Eiffel Tower is in")
    >>> logits = lens.logits(model, cache["blocks.1.hook_resid_post"][0, -1], layer=1)
    >>> logits.shape == (model.cfg.d_vocab,)
    True
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from tqdm.auto import tqdm

from rome_lens._cache import atomic_path, cache_dir
from rome_lens._typing import Model
from rome_lens.edits import base_fingerprint, base_weights
from rome_lens.errors import CorruptEditFileError, FingerprintMismatchError, LayerOutOfRangeError
from rome_lens.models import access
from rome_lens.statistics import Corpus, StatisticsConfig, corpus_tokens

logger = logging.getLogger(__name__)

_FORMAT = "rome_lens.tuned_lens/1"


def logit_lens(
    model: Model, resid: Float[torch.Tensor, "... d_model"]
) -> Float[torch.Tensor, "... d_vocab"]:
    """Logits of residual vectors through the model's final norm and unembedding."""
    return access.decode_residual(model, resid)


@dataclass(frozen=True)
class TunedLensConfig:
    """Training settings of a tuned lens (they name its cache entry).

    Attributes:
        sequences: corpus sequences used (each ``seq_len`` tokens of the statistics corpus).
        steps: Adam steps of the KL stage (0: least squares only).
        batch_tokens: tokens per Adam step.
        lr: Adam learning rate.
        ridge: ridge of the least-squares stage, as a fraction of the mean feature variance.
        vocab_top_k: final-layer top tokens per training token that enter the KL vocabulary.
        max_vocab: cap on the KL vocabulary (the whole vocabulary when it is smaller).
        seed: seed of the minibatch order.
    """

    sequences: int = 32
    steps: int = 150
    batch_tokens: int = 256
    lr: float = 1e-3
    ridge: float = 1e-3
    vocab_top_k: int = 16
    max_vocab: int = 8192
    seed: int = 0


@dataclass(repr=False)
class TunedLens:
    """Per-layer affine translators ``h -> h + h @ weight[l] + bias[l]``.

    Attributes:
        weight: ``[n_layers, d_model, d_model]``; the last layer's is zero.
        bias: ``[n_layers, d_model]``; the last layer's is zero.
        fingerprint: base-model fingerprint (:func:`~rome_lens.edits.base_fingerprint`) of
            the model it was trained on: the weights with every rome_lens edit removed.
        config: the training settings.
        info: training record (losses, timings, vocabulary size).
    """

    weight: Float[torch.Tensor, "layer d_model d_model"]
    bias: Float[torch.Tensor, "layer d_model"]
    fingerprint: str
    config: TunedLensConfig = field(default_factory=TunedLensConfig)
    info: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def identity(cls, model: Model) -> TunedLens:
        """The untrained lens (every translator zero): equal to the logit lens."""
        n, d = access.n_layers(model), int(model.cfg.d_model)
        return cls(torch.zeros(n, d, d), torch.zeros(n, d), base_fingerprint(model))

    def __repr__(self) -> str:
        """One line: shape, base model, training corpus and size (no tensors)."""
        info = self.info
        trained = (f", corpus={info['corpus']!r}, tokens={info.get('tokens', '?')}, "
                   f"steps={self.config.steps}") if "corpus" in info else ", untrained"
        return (f"TunedLens(layers={self.n_layers}, d_model={int(self.weight.shape[-1])}, "
                f"base={self.fingerprint[:8]}...{trained})")

    @property
    def n_layers(self) -> int:
        """Layers the lens covers."""
        return int(self.weight.shape[0])

    def translate(
        self, resid: Float[torch.Tensor, "... d_model"], layer: int
    ) -> Float[torch.Tensor, "... d_model"]:
        """The translated residual of block ``layer``."""
        if not 0 <= layer < self.n_layers:
            raise LayerOutOfRangeError(f"lens layer {layer} outside [0, {self.n_layers})")
        w = self.weight[layer].to(resid.device, resid.dtype)
        b = self.bias[layer].to(resid.device, resid.dtype)
        return resid + resid @ w + b

    def logits(
        self, model: Model, resid: Float[torch.Tensor, "... d_model"], layer: int
    ) -> Float[torch.Tensor, "... d_vocab"]:
        """Decoded logits of the residual after block ``layer``."""
        return access.decode_residual(model, self.translate(resid, layer))

    def check(self, model: Model) -> None:
        """Raise if the lens was trained on another base model.

        Applied rome_lens edits do not count: the lens describes the unedited model, and an
        edited model is read through the lens of its base.

        Raises:
            FingerprintMismatchError: another base model, or another number of layers.
        """
        fp = base_fingerprint(model)
        if fp != self.fingerprint or self.n_layers != access.n_layers(model):
            raise FingerprintMismatchError(
                f"tuned lens trained on base weights {self.fingerprint}, model's base is {fp}"
            )

    def save(self, path: str | Path) -> Path:
        """Save as a torch file of plain tensors and JSON metadata."""
        path = Path(path)
        meta = {"format": _FORMAT, "fingerprint": self.fingerprint,
                "config": asdict(self.config), "info": self.info}
        with atomic_path(path) as tmp:
            torch.save({"weight": self.weight, "bias": self.bias, "meta": json.dumps(meta)}, tmp)
        return path

    @classmethod
    def load(cls, path: str | Path) -> TunedLens:
        """Inverse of :meth:`save`.

        Raises:
            CorruptEditFileError: not a tuned-lens file.
        """
        try:
            raw = torch.load(Path(path), weights_only=True)
            meta = json.loads(raw["meta"])
            if meta.get("format") != _FORMAT:
                raise ValueError(f"format {meta.get('format')!r}")
            return cls(raw["weight"], raw["bias"], meta["fingerprint"],
                       TunedLensConfig(**meta["config"]), meta.get("info", {}))
        except Exception as exc:
            raise CorruptEditFileError(f"{path} is not a readable tuned-lens file: {exc}") from exc


@torch.no_grad()
def _training_states(
    model: Model, tokens: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residuals after every block ``[layer, n, d]`` and final residuals ``[n, d]`` (no BOS)."""
    n_layers = access.n_layers(model)
    names = [access.resid_post_hook_name(layer) for layer in range(n_layers)]
    states: list[list[torch.Tensor]] = [[] for _ in names]
    for row in tokens.split(8):
        _, cache = access.run_with_states(model, row.to(model.cfg.device), names)
        for i, name in enumerate(names):
            states[i].append(cache[name][:, 1:].reshape(-1, cache[name].shape[-1]).float().cpu())
    stacked = torch.stack([torch.cat(s) for s in states])
    return stacked, stacked[-1]


def _least_squares(
    x: Float[torch.Tensor, "n d"], y: Float[torch.Tensor, "n d"], ridge: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ridge fit of ``x + x @ w + b ~ y`` (float64)."""
    xd, yd = x.double(), (y - x).double()
    mean_x, mean_y = xd.mean(0), yd.mean(0)
    xc, yc = xd - mean_x, yd - mean_y
    gram = xc.T @ xc
    reg = ridge * gram.diagonal().mean().clamp_min(1e-12)
    w = torch.linalg.solve(gram + reg * torch.eye(gram.shape[0], dtype=gram.dtype), xc.T @ yc)
    b = mean_y - mean_x @ w
    return w.float(), b.float()


def train_tuned_lens(
    model: Model,
    corpus: Corpus = None,
    config: TunedLensConfig | None = None,
    progress: bool = True,
) -> TunedLens:
    """Train a tuned lens of the base model on ``corpus`` (default: the statistics corpus).

    Applied rome_lens edits are lifted while the lens trains (the base weights are restored
    exactly, and the edits return on exit), so the lens always describes the unedited model.

    Args:
        model: the model (its weights and edit state are the same on return).
        corpus: ``None`` (model samples, cached) or texts/files (see
            :func:`~rome_lens.statistics.corpus_tokens`).
        config: training settings.
        progress: show a progress bar.

    Returns:
        A :class:`TunedLens` whose last layer is the identity.
    """
    config = config or TunedLensConfig()
    # the corpus is the base model's already (and computed under base_weights, which does not
    # nest), so it is read before the base weights are restored for training
    tokens, corpus_id = corpus_tokens(model, corpus, StatisticsConfig())
    with base_weights(model):
        lens = _train(model, tokens[: config.sequences], config, progress)
    lens.info = {"corpus": corpus_id, **lens.info}
    return lens


def _train(
    model: Model, tokens: torch.Tensor, config: TunedLensConfig, progress: bool
) -> TunedLens:
    """Least squares, then KL, on the residuals of ``tokens`` (on the weights as they are)."""
    states, final = _training_states(model, tokens)
    n_layers, n, d = states.shape
    lens = TunedLens.identity(model)
    lens.config = config
    for layer in range(n_layers - 1):
        w, b = _least_squares(states[layer], final, config.ridge)
        lens.weight[layer], lens.bias[layer] = w, b
    vocab = _kl_vocabulary(model, final, config)
    losses: list[float] = []
    if config.steps > 0 and n_layers > 1:
        losses = _fit_kl(model, lens, states, final, vocab, config, progress)
    lens.info = {"tokens": n, "kl_vocab": int(vocab.numel()),
                 "kl_losses": losses[:: max(1, len(losses) // 20)] + losses[-1:]}
    logger.info("tuned lens trained on %d tokens (KL vocab %d)", n, vocab.numel())
    return lens


@torch.no_grad()
def _kl_vocabulary(
    model: Model, final: torch.Tensor, config: TunedLensConfig
) -> torch.Tensor:
    """Token ids of the KL stage: the final layer's top tokens on the training text."""
    d_vocab = int(model.cfg.d_vocab)
    if d_vocab <= config.max_vocab:
        return torch.arange(d_vocab)
    counts = torch.zeros(d_vocab)
    for chunk in final.split(256):
        top = access.decode_residual(model, chunk.to(model.cfg.device)).topk(config.vocab_top_k)
        counts.index_add_(0, top.indices.flatten().cpu(), torch.ones(top.indices.numel()))
    return counts.topk(config.max_vocab).indices.sort().values


def _fit_kl(
    model: Model,
    lens: TunedLens,
    states: torch.Tensor,
    final: torch.Tensor,
    vocab: torch.Tensor,
    config: TunedLensConfig,
    progress: bool,
) -> list[float]:
    """Adam on the mean (over layers) KL to the final distribution, over ``vocab``."""
    n_layers, n, _ = states.shape
    w_u = model.W_U.detach()[:, vocab.to(model.W_U.device)].float().cpu()
    b_u = model.b_U.detach()[vocab.to(model.b_U.device)].float().cpu()
    weight = lens.weight[:-1].clone().requires_grad_(True)
    bias = lens.bias[:-1].clone().requires_grad_(True)
    opt = torch.optim.Adam([weight, bias], lr=config.lr)
    gen = torch.Generator().manual_seed(config.seed)

    def decode(x: torch.Tensor) -> torch.Tensor:
        if model.cfg.normalization_type is not None:
            x = model.ln_final(x.unsqueeze(0))[0]
        logits = x @ w_u + b_u
        cap = float(getattr(model.cfg, "output_logits_soft_cap", -1.0) or -1.0)
        return cap * torch.tanh(logits / cap) if cap > 0 else logits

    losses: list[float] = []
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:  # no gradients into the model (ln_final) while fitting the lens
        p.requires_grad_(False)
    try:
        _adam_steps(model, states, final, idx_gen=gen, decode=decode, weight=weight, bias=bias,
                    opt=opt, config=config, progress=progress, losses=losses)
    finally:
        for p in frozen:
            p.requires_grad_(True)
    lens.weight[:-1] = weight.detach()
    lens.bias[:-1] = bias.detach()
    return losses


def _adam_steps(
    model: Model, states: torch.Tensor, final: torch.Tensor, *,
    idx_gen: torch.Generator, decode: Any, weight: torch.Tensor, bias: torch.Tensor,
    opt: torch.optim.Optimizer, config: TunedLensConfig, progress: bool, losses: list[float],
) -> None:
    n_layers, n, _ = states.shape
    gen = idx_gen
    for _ in tqdm(range(config.steps), desc="tuned lens", disable=not progress):
        idx = torch.randint(0, n, (min(config.batch_tokens, n),), generator=gen)
        with torch.no_grad():
            target = decode(final[idx]).log_softmax(-1)
        h = states[:-1, idx]  # [layer, batch, d]
        translated = h + torch.einsum("lbd,lde->lbe", h, weight) + bias[:, None]
        logq = decode(translated.reshape(-1, h.shape[-1])).log_softmax(-1)
        logq = logq.reshape(n_layers - 1, len(idx), -1)
        kl = (target.exp() * (target - logq)).sum(-1).mean()
        opt.zero_grad()
        kl.backward()
        opt.step()
        losses.append(float(kl.detach()))


def tuned_lens(
    model: Model,
    corpus: Corpus = None,
    config: TunedLensConfig | None = None,
    train: bool = True,
    progress: bool = True,
) -> TunedLens:
    """The base model's tuned lens from the cache, trained (and cached) on first use.

    The cache key is the base-model fingerprint (equal to the weights fingerprint when no edit
    is applied) with the corpus and settings, so the lens is the same, and trained once, with
    or without edits applied.

    Args:
        model: the model (its edit state does not matter, see :func:`train_tuned_lens`).
        corpus: training corpus (part of the cache key).
        config: training settings (part of the cache key).
        train: train when missing; if ``False`` a missing lens raises ``FileNotFoundError``.
        progress: progress bar while training.
    """
    config = config or TunedLensConfig()
    key = json.dumps({"corpus": repr(corpus), "config": asdict(config)}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    path = cache_dir("tuned_lens") / f"{base_fingerprint(model)}-{digest}.pt"
    if path.exists():
        lens = TunedLens.load(path)
        lens.check(model)
        return lens
    if not train:
        raise FileNotFoundError(f"no cached tuned lens at {path}; run `rome-lens tuned-lens`")
    lens = train_tuned_lens(model, corpus, config, progress)
    lens.save(path)
    return lens
