"""Facts about a model's layout that do not depend on its API: hook names, layers, weight names.

HookedTransformer and TransformerBridge (where HookedTransformer names are aliases) share these
names, so they are plain functions; everything that differs between the two APIs lives in
:mod:`rome_lens.models.adapters`. :mod:`rome_lens.models.access` re-exports every name here.

Example:
    >>> from rome_lens.models.layout import key_hook_name
    >>> key_hook_name(5)
    'blocks.5.mlp.hook_post'
"""

from __future__ import annotations

import re

import numpy as np

from rome_lens._typing import Model
from rome_lens.errors import LayerOutOfRangeError

EMBED_HOOK = "hook_embed"
_WEIGHT_NAME = re.compile(r"blocks\.(\d+)\.mlp\.W_out")


def n_layers(model: Model) -> int:
    """Number of transformer blocks."""
    return int(model.cfg.n_layers)


def check_layer(model: Model, layer: int) -> int:
    """Validate a layer index (negative indices count from the end).

    Raises:
        LayerOutOfRangeError: if ``layer`` is not in ``[-n_layers, n_layers)``.
    """
    n = n_layers(model)
    if isinstance(layer, bool) or not isinstance(layer, int | np.integer):
        raise LayerOutOfRangeError(f"layer must be an int, got {type(layer).__name__}")
    if not -n <= int(layer) < n:
        raise LayerOutOfRangeError(
            f"layer {layer} is out of range for a model with {n} layers (expected 0..{n - 1})"
        )
    return int(layer) % n


def key_hook_name(layer: int) -> str:
    """Hook whose activation is the MLP key (the input of the output projection)."""
    return f"blocks.{layer}.mlp.hook_post"


def resid_pre_hook_name(layer: int) -> str:
    """Hook of the residual stream entering block ``layer``."""
    return f"blocks.{layer}.hook_resid_pre"


def resid_post_hook_name(layer: int) -> str:
    """Hook of the residual stream leaving block ``layer`` (the paper's hidden state h_l)."""
    return f"blocks.{layer}.hook_resid_post"


def mlp_out_hook_name(layer: int) -> str:
    """Hook of what block ``layer``'s MLP adds to the residual stream (after any post-norm)."""
    return f"blocks.{layer}.hook_mlp_out"


def attn_out_hook_name(layer: int) -> str:
    """Hook of what block ``layer``'s attention adds to the residual stream."""
    return f"blocks.{layer}.hook_attn_out"


def mlp_out_weight_name(layer: int) -> str:
    """API-independent name of block ``layer``'s MLP output weight (``blocks.L.mlp.W_out``).

    It is the HookedTransformer state-dict name; on a bridge it names the same logical weight
    (see :func:`rome_lens.models.access.mlp_out_parameter` for the stored parameter).
    """
    return f"blocks.{layer}.mlp.W_out"


def layer_of_weight_name(name: str) -> int:
    """Inverse of :func:`mlp_out_weight_name`."""
    match = _WEIGHT_NAME.fullmatch(name)
    if match is None:
        raise ValueError(f"not an MLP output weight name: {name!r}")
    return int(match.group(1))


def is_mlp_out_weight_name(name: str) -> bool:
    """Whether ``name`` has the form of :func:`mlp_out_weight_name`."""
    return _WEIGHT_NAME.fullmatch(name) is not None
