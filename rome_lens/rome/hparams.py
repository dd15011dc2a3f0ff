"""ROME hyperparameters: one typed dataclass, with per-model defaults.

The defaults follow the ROME paper's GPT-2 XL configuration (../shared/REFERENCE.md §1): 20 Adam
steps at learning rate 0.5, ``clamp_norm_factor`` 4, ``kl_factor`` 0.0625, ``v_weight_decay``
0.5, 10 + 10 model-generated context prefixes of 5 and 10 tokens. Only the edit layer (and the
size of the statistics corpus) differs between models; :func:`default_hparams` looks the model
up by its exact TransformerLens name, never by substring.

Example:
    >>> hp = default_hparams(model)              # gemma-3-270m: layer 1
    >>> hp = dataclasses.replace(hp, layer=2, v_num_grad_steps=30)
    >>> hp.layer, hp.v_num_grad_steps, hp.v_lr
    (2, 30, 0.5)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import torch

from rome_lens._typing import Model
from rome_lens.errors import InvalidRequestError

PRECISIONS: tuple[str, ...] = ("float32", "bfloat16")


@dataclass(frozen=True)
class RomeHyperParams:
    """Hyperparameters of one ROME edit.

    Attributes:
        layer: block whose MLP output weight is edited (``None``: the model's default).
        v_num_grad_steps: maximum Adam steps of the v* optimisation.
        v_lr: Adam learning rate for delta.
        clamp_norm_factor: ``||delta|| <= clamp_norm_factor * ||v_orig||`` after every step.
        kl_factor: weight of the KL term that keeps "{subject} is a" unchanged.
        v_weight_decay: weight of ``||delta|| / ||v_orig||^2``.
        early_stop_loss: stop when the total loss falls below this (the erasure objective:
            and its erasure term is below this fraction of its start).
        n_contexts_short: context prefixes of ``context_len_short`` tokens.
        context_len_short: tokens in a short context prefix.
        n_contexts_long: context prefixes of ``context_len_long`` tokens.
        context_len_long: tokens in a long context prefix.
        context_top_k: top-k sampling for the context prefixes.
        kl_prompt: prompt template of the KL (essence) term.
        stats_sequences: sequences in the statistics corpus.
        stats_seq_len: tokens per statistics sequence.
        mom2_ridge: ridge added to C before solving, as a fraction of ``mean(diag(C))``; a
            finite corpus leaves small eigenvalues noisy and this keeps ``C^-1 k*`` stable.
        seed: seed of the context prefixes and the statistics corpus.
        z_precision: ``"float32"`` (the dataclass default: the reference computation) or
            ``"bfloat16"``: the value optimisation's forward and backward passes under
            bfloat16 autocast (the delta, Adam and the update stay float32). On a CPU with
            AVX-512 BF16 this is 1.7x faster with the same CounterFact scores (README, "Edit
            speed"); :func:`default_hparams` chooses it where the hardware has fast bfloat16.
    """

    layer: int | None = None
    v_num_grad_steps: int = 20
    v_lr: float = 0.5
    clamp_norm_factor: float = 4.0
    kl_factor: float = 0.0625
    v_weight_decay: float = 0.5
    early_stop_loss: float = 0.05
    n_contexts_short: int = 10
    context_len_short: int = 5
    n_contexts_long: int = 10
    context_len_long: int = 10
    context_top_k: int = 5
    kl_prompt: str = "{} is a"
    stats_sequences: int = 128
    stats_seq_len: int = 128
    mom2_ridge: float = 1e-2
    seed: int = 0
    z_precision: str = "float32"

    def __post_init__(self) -> None:
        if self.v_num_grad_steps < 0 or self.v_lr <= 0:
            raise InvalidRequestError("v_num_grad_steps must be >= 0 and v_lr > 0")
        if self.clamp_norm_factor <= 0 or self.kl_factor < 0 or self.v_weight_decay < 0:
            raise InvalidRequestError("clamp_norm_factor must be > 0, kl/decay factors >= 0")
        if "{}" not in self.kl_prompt:
            raise InvalidRequestError(f"kl_prompt needs a '{{}}' slot: {self.kl_prompt!r}")
        if self.stats_sequences < 1 or self.stats_seq_len < 2 or self.mom2_ridge < 0:
            raise InvalidRequestError("statistics corpus must be non-empty; mom2_ridge >= 0")
        if self.z_precision not in PRECISIONS:
            raise InvalidRequestError(
                f"z_precision must be 'bfloat16' or 'float32', got {self.z_precision!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (for JSON)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RomeHyperParams:
        """Inverse of :meth:`to_dict` (unknown keys are ignored)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


# Exact TransformerLens model names -> overrides. Layers for GPT models are the ROME paper's;
# gemma-3-270m's layer was chosen from a CounterFact layer sweep (see README, "Default layer").
_MODEL_DEFAULTS: dict[str, dict[str, Any]] = {
    "gpt2-xl": {"layer": 17},
    "gpt2-large": {"layer": 12},
    "gpt2-medium": {"layer": 8},
    "gpt-j-6B": {"layer": 5},
    "gemma-3-270m": {"layer": 1},
}


def default_hparams(model: Model) -> RomeHyperParams:
    """Hyperparameters for ``model``, with its default layer filled in.

    Models without an entry get layer ``round(0.25 * n_layers)``: causal tracing puts factual
    recall in the early-to-middle MLPs (GPT-2 XL 17/48, GPT-J 5/28). ``z_precision`` is
    ``"bfloat16"`` where the model's device computes bfloat16 fast (a CUDA GPU with bfloat16, a
    CPU with AVX-512 BF16 or AMX), else ``"float32"``.
    """
    # TransformerLens names ("gemma-3-270m") or Hugging Face ids ("google/gemma-3-270m", a
    # TransformerBridge's model_name) select the same entry.
    name = str(model.cfg.model_name).rsplit("/", 1)[-1]
    overrides = _MODEL_DEFAULTS.get(name, {})
    base = RomeHyperParams(**overrides)
    if base.layer is None:
        base = replace(base, layer=max(0, round(0.25 * model.cfg.n_layers)))
    if "z_precision" not in overrides:
        base = replace(base, z_precision=default_precision(model.cfg.device))
    return base


def default_precision(device: torch.device | str | None) -> str:
    """The targets' default ``z_precision`` on ``device``, for every method.

    ``"bfloat16"`` where the device computes it fast (1.7x faster than float32 on a CPU with
    AVX-512 BF16, same loss curve to ~1%), else ``"float32"`` (emulated bfloat16 matmuls
    measured 170x slower than float32 on an AVX2 EPYC).

    Example:
        >>> default_precision("cpu") in ("bfloat16", "float32")
        True
    """
    return "bfloat16" if fast_bfloat16(device) else "float32"


def fast_bfloat16(device: torch.device | str | None) -> bool:
    """Whether ``device`` (a torch device or its name; None: CPU) has fast bfloat16 matmuls."""
    kind = torch.device(device or "cpu").type
    if kind == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if kind != "cpu":
        return False
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)
