"""Subject keys k*: the MLP key of the last subject token, averaged over context prefixes.

The MLP of block L reads a key ``k`` (``blocks.L.mlp.hook_post``, the input of the output
projection). ROME (and MEMIT, per layer) averages the subject's key over the edit prompt behind
model-written context prefixes, so the edit fires for the subject in any context. The same
averaged key is used in every later step (the r-ROME fix of Gupta et al. 2024).

Example:
    >>> from rome_lens.rome.prompts import value_batch
    >>> from rome_lens.statistics import context_templates
    >>> hp = rome_lens.default_hparams(model)
    >>> batch = value_batch(model, [request], context_templates(model, hp), hp.kl_prompt)
    >>> keys, _ = subject_keys(model, 1, batch)
    >>> keys.shape                                   # [n_requests, d_mlp]
    torch.Size([1, ...])
"""

from __future__ import annotations

import torch
from jaxtyping import Float

from rome_lens._typing import Model
from rome_lens.errors import NonFiniteError
from rome_lens.models import access
from rome_lens.rome.prompts import ValueBatch


def subject_keys(
    model: Model, layer: int, batch: ValueBatch, keep_residual: bool = False
) -> tuple[Float[torch.Tensor, "n_requests d_mlp"], Float[torch.Tensor, "rows pos d_model"] | None]:
    """k* of every request of ``batch`` at ``layer``, and optionally the residual entering it.

    One forward pass (blocks ``0..layer``) serves both.

    Args:
        model: the model (not modified).
        layer: the block whose keys are read.
        batch: value rows of the requests (see :func:`~rome_lens.rome.prompts.value_batch`).
        keep_residual: also return ``blocks.layer.hook_resid_pre`` of every row.

    Returns:
        ``(keys [n_requests, d_mlp], residual or None)``.

    Raises:
        NonFiniteError: a key is NaN or infinite.
    """
    hook = access.key_hook_name(layer)
    resid_hook = access.resid_pre_hook_name(layer)
    wanted = (hook, resid_hook) if keep_residual else (hook,)
    with torch.no_grad():
        _, states = access.run_with_states(
            model, batch.tokens, wanted, stop_at_layer=layer + 1,
            attention_mask=torch.ones_like(batch.tokens),
        )
    acts = states[hook]
    keys = []
    for request in range(batch.n_requests):
        rows = batch.value_rows_of(request)
        last = batch.subject_last[rows].to(acts.device)
        keys.append(acts[rows.to(acts.device), last].mean(0))
    k_star = torch.stack(keys)
    if not torch.isfinite(k_star).all():
        raise NonFiniteError(f"the subject's key at layer {layer} is not finite")
    return k_star, states[resid_hook] if keep_residual else None
