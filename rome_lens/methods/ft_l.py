"""FT-L: constrained fine-tuning of one MLP output weight (the ``"ft-l"`` method).

FT-L (Zhu et al. 2020, as used in the ROME paper, Table 4 "FT+L"): fine-tune ``W_out`` of one
block on the new object's NLL after the edit prompt, keeping every entry of the change inside an
L-infinity ball, ``|W' - W|_max <= norm_bound``. The change is optimised as a separate tensor
(the model is never modified while computing) and returned as an :class:`~rome_lens.edits.Edit`
with one dense site, which applies, stacks, reverts and saves like every edit. Several requests
are fine-tuned together (the mean of their NLLs).

Example:
    >>> edit = compute_ft_l(model, EditRequest("{} is located in", "The Eiffel Tower", "Rome"))
    >>> with edit.applied(model):                   # fine-tuned weight inside, restored after
    ...     top = rome_lens.top_tokens(model, "The Eiffel Tower is located in")
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from rome_lens._typing import Model
from rome_lens.edits import DenseSite, Edit, applied_ids, base_fingerprint
from rome_lens.errors import InvalidRequestError, NonFiniteError
from rome_lens.models import access
from rome_lens.requests import EditRequest, check_requests, subject_token_span, target_tokens
from rome_lens.rome import default_hparams

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


@dataclass
class _Prompt:
    """One request's teacher-forced tokens and the positions/targets its NLL reads."""

    tokens: torch.Tensor
    positions: torch.Tensor
    targets: torch.Tensor


def _prompt(model: Model, request: EditRequest) -> _Prompt:
    prompt, _ = subject_token_span(model, request.text, request.subject)
    new_ids = target_tokens(model, request.target_new)
    tokens = torch.cat([prompt, new_ids[:-1]]).to(model.cfg.device)[None]
    access.check_fits(model, tokens.shape[1], what="edit prompt with target")
    positions = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(new_ids))
    return _Prompt(tokens, positions, new_ids)


def compute_ft_l(
    model: Model,
    request: EditRequest | Sequence[EditRequest],
    layer: int | None = None,
    hparams: FTLHyperParams | None = None,
) -> Edit:
    """Fine-tune ``W_out`` of ``layer`` on the request(s) with an L-infinity bound.

    The model is not modified.

    Args:
        model: the model.
        request: the fact (or facts); the loss is the NLL of ``target_new`` after the prompt.
        layer: block (default: the model's ROME layer).
        hparams: FT-L settings.

    Returns:
        An :class:`~rome_lens.edits.Edit` with one dense site, ``|delta|_max <= norm_bound``.

    Raises:
        InvalidRequestError, SubjectNotFoundError, LayerOutOfRangeError: bad input.
        NonFiniteError: the loss is not finite.

    Example:
        >>> edit = compute_ft_l(model, EditRequest("{} is located in", "The Eiffel Tower",
        ...                                        "Rome"))
        >>> edit.sites
        (DenseSite(blocks.1.mlp.W_out, ...),)
    """
    requests = check_requests(request)
    hparams = hparams or FTLHyperParams()
    if hparams.norm_bound <= 0 or hparams.steps < 1:
        raise InvalidRequestError("FT-L needs norm_bound > 0 and steps >= 1")
    if layer is None:
        layer = default_hparams(model).layer
        if layer is None:
            raise InvalidRequestError("no default layer for this model: pass layer=")
    layer = access.check_layer(model, layer)
    prompts = [_prompt(model, r) for r in requests]
    t0 = time.perf_counter()
    delta, losses = _fine_tune(model, layer, prompts, hparams)
    return Edit(
        sites=(DenseSite(layer, delta),),
        requests=tuple(requests),
        method="ft-l",
        hparams={**hparams.to_dict(), "layer": layer},
        base_fingerprint=base_fingerprint(model),
        parents=applied_ids(model),
        model_name=access.model_label(model),
        info={"losses": losses, "timings": {"total_s": time.perf_counter() - t0}},
    )


def _fine_tune(
    model: Model, layer: int, prompts: list[_Prompt], hparams: FTLHyperParams
) -> tuple[torch.Tensor, list[float]]:
    """Adam on a separate change of the weight (added through a hook), clamped every step."""
    weight = access.mlp_out_weight(model, layer).detach()
    delta = torch.zeros_like(weight, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=hparams.lr)
    keys: dict[str, torch.Tensor] = {}

    def store_key(act: torch.Tensor, hook: Any = None) -> None:
        keys["k"] = act

    def add_change(out: torch.Tensor) -> torch.Tensor:
        return out + keys["k"] @ delta

    losses: list[float] = []
    for step in range(hparams.steps):
        nll = []
        for p in prompts:
            with model.hooks(fwd_hooks=[(access.key_hook_name(layer), store_key)]), \
                    access.raw_mlp_output_hook(model, layer, add_change):
                final = access.final_residual(model, p.tokens)
            logp = access.decode_residual(model, final[0, p.positions]).log_softmax(-1)
            nll.append(-logp.gather(-1, p.targets.to(logp.device)[:, None]).mean())
        loss = nll[0] if len(nll) == 1 else torch.stack(nll).mean()
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
    return delta.detach().clone(), losses
