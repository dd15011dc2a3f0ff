"""Baselines for ROME: constrained fine-tuning of the same MLP output weight (FT-L).

FT-L (Zhu et al. 2020, as used in the ROME paper, Table 4 "FT+L"): fine-tune ``W_out`` of one
block on the new object's NLL after the edit prompt, keeping every entry of the change inside an
L-infinity ball, ``|W' - W|_max <= norm_bound``. The change is optimised as a separate tensor
(the model is never modified while computing) and returned as a :class:`DenseEdit`, which applies,
stacks and reverts exactly like a :class:`~rome_lens.rome.edit.RomeEdit` (same registry).

Example:
    >>> edit = compute_ft_l(model, EditRequest("{} is located in", "The Eiffel Tower", "Rome"))
    >>> with edit.applied(model):
    ...     ...
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from jaxtyping import Float

from rome_lens._typing import Model
from rome_lens.errors import InvalidRequestError, NonFiniteError
from rome_lens.models import access
from rome_lens.requests import EditRequest, subject_token_span, target_tokens
from rome_lens.rome.edit import RomeEdit, base_fingerprint
from rome_lens.rome.hparams import default_hparams

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FTLHyperParams:
    """FT-L settings (the ROME paper's GPT-2 XL values: Adam, lr 5e-4, 25 steps, bound 5e-4).

    Attributes:
        steps: Adam steps.
        lr: learning rate.
        norm_bound: L-infinity bound on every entry of the weight change.
        early_stop_loss: stop when the NLL falls below this.
    """

    steps: int = 25
    lr: float = 5e-4
    norm_bound: float = 5e-4
    early_stop_loss: float = 1e-2

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form."""
        return asdict(self)


@dataclass(eq=False)
class DenseEdit(RomeEdit):
    """A full-matrix change of ``blocks[layer].mlp.W_out`` (e.g. FT-L), applied like a RomeEdit.

    ``left``/``right`` are zero placeholders of the right shapes (for the shape checks);
    :meth:`delta` returns ``dense``.
    """

    dense: Float[torch.Tensor, "d_mlp d_model"] = field(default_factory=lambda: torch.zeros(0))

    @property
    def id(self) -> str:
        """Content hash of the change."""
        digest = hashlib.sha256(f"dense:{self.layer}:{self.fingerprint}".encode())
        digest.update(self.dense.detach().cpu().float().numpy().tobytes())
        return digest.hexdigest()[:16]

    def delta(self) -> Float[torch.Tensor, "d_mlp d_model"]:
        """The weight change [d_mlp, d_model]."""
        return self.dense.to(self.left.device, self.left.dtype)

    def save(self, path: Any) -> Any:
        """Not supported: dense baselines are for benchmarks, not for distribution."""
        raise NotImplementedError("saving a DenseEdit (FT-L baseline) is not supported")


def compute_ft_l(
    model: Model,
    request: EditRequest,
    layer: int | None = None,
    hparams: FTLHyperParams | None = None,
) -> DenseEdit:
    """Fine-tune ``W_out`` of ``layer`` on the request with an L-infinity bound (model unchanged).

    Args:
        model: the model.
        request: the fact; the loss is the NLL of ``target_new`` after the prompt.
        layer: block (default: the model's ROME layer).
        hparams: FT-L settings.

    Returns:
        A :class:`DenseEdit` with ``|delta|_max <= norm_bound``.

    Raises:
        InvalidRequestError, SubjectNotFoundError, LayerOutOfRangeError: bad input.
        NonFiniteError: the loss is not finite.
    """
    if not isinstance(request, EditRequest):
        raise InvalidRequestError(f"request must be an EditRequest, got {type(request).__name__}")
    hparams = hparams or FTLHyperParams()
    if hparams.norm_bound <= 0 or hparams.steps < 1:
        raise InvalidRequestError("FT-L needs norm_bound > 0 and steps >= 1")
    if layer is None:
        layer = default_hparams(model).layer
        if layer is None:
            raise InvalidRequestError("no default layer for this model: pass layer=")
    layer = access.check_layer(model, layer)
    prompt, _ = subject_token_span(model, request.text, request.subject)
    new_ids = target_tokens(model, request.target_new)
    tokens = torch.cat([prompt, new_ids[:-1]]).to(model.cfg.device)[None]
    access.check_fits(model, tokens.shape[1], what="edit prompt with target")
    positions = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(new_ids))
    weight = access.mlp_out_weight(model, layer).detach()
    delta = torch.zeros_like(weight, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=hparams.lr)
    keys: dict[str, torch.Tensor] = {}

    def store_key(act: torch.Tensor, hook: Any = None) -> None:
        keys["k"] = act

    def add_change(out: torch.Tensor) -> torch.Tensor:
        return out + keys["k"] @ delta

    t0 = time.perf_counter()
    losses: list[float] = []
    for step in range(hparams.steps):
        with model.hooks(fwd_hooks=[(access.key_hook_name(layer), store_key)]), \
                access.raw_mlp_output_hook(model, layer, add_change):
            final = access.final_residual(model, tokens)
        logp = access.decode_residual(model, final[0, positions]).log_softmax(-1)
        loss = -logp.gather(-1, new_ids.to(logp.device)[:, None]).mean()
        if not torch.isfinite(loss):
            raise NonFiniteError(f"FT-L loss is not finite at step {step}")
        losses.append(float(loss.detach()))
        if losses[-1] < hparams.early_stop_loss:
            break
        (grad,) = torch.autograd.grad(loss, [delta])
        delta.grad = grad
        opt.step()
        with torch.no_grad():
            delta.clamp_(-hparams.norm_bound, hparams.norm_bound)
    d_mlp, d_model = weight.shape
    return DenseEdit(
        layer=layer,
        left=torch.zeros(d_mlp, dtype=weight.dtype),
        right=torch.zeros(d_model, dtype=weight.dtype),
        k_star=torch.zeros(d_mlp),
        v_star=torch.zeros(d_model),
        request=request,
        hparams=default_hparams(model),
        fingerprint=base_fingerprint(model),
        model_name=access.model_label(model),
        info={"method": "ft-l", "losses": losses, "ft_l": hparams.to_dict(),
              "timings": {"total_s": time.perf_counter() - t0}},
        dense=delta.detach().clone(),
    )
