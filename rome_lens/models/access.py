"""The model-access layer: the only module that knows which model class it holds.

Every feature of rome_lens (ROME and its statistics, and later tracing, patching and probes)
reaches into a model through these functions: hook names, the MLP output weight of a block, the
raw MLP output (before any post-MLP norm), running a slice of the blocks, and decoding a residual
through the final norm and unembedding. Supporting another model API (TransformerLens 4.x's
``TransformerBridge``) then means one new branch here, not edits everywhere.

Example:
    >>> from rome_lens.models import access
    >>> w = access.mlp_out_weight(model, 5)        # nn.Parameter [d_mlp, d_model]
    >>> access.key_hook_name(5)
    'blocks.5.mlp.hook_post'
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import nn
from transformer_lens import HookedTransformer

from rome_lens.errors import LayerOutOfRangeError, PromptTooLongError

# Largest number of elements hashed from one tensor by the fingerprint; bigger tensors are
# sampled with a fixed stride (the embedding of a 262k vocabulary would otherwise dominate).
_FINGERPRINT_MAX_ELEMENTS = 1 << 20


def n_layers(model: HookedTransformer) -> int:
    """Number of transformer blocks."""
    return int(model.cfg.n_layers)


def check_layer(model: HookedTransformer, layer: int) -> int:
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


EMBED_HOOK = "hook_embed"


def embedding_matrix(model: HookedTransformer) -> Float[torch.Tensor, "d_vocab d_model"]:
    """Token embedding matrix whose rows are what ``hook_embed`` emits."""
    return model.W_E


def mlp_out_weight(model: HookedTransformer, layer: int) -> nn.Parameter:
    """The MLP output projection of block ``layer``, laid out ``[d_mlp, d_model]``."""
    layer = check_layer(model, layer)
    weight = model.blocks[layer].mlp.W_out
    if not isinstance(weight, nn.Parameter) or weight.ndim != 2:
        raise TypeError(f"blocks.{layer}.mlp.W_out is not a 2-D parameter: {type(weight)}")
    return weight


def mlp_out_weight_name(layer: int) -> str:
    """State-dict name of :func:`mlp_out_weight`."""
    return f"blocks.{layer}.mlp.W_out"


def mlp_out_bias(model: HookedTransformer, layer: int) -> torch.Tensor | None:
    """Bias of the MLP output projection (``None`` when the model has none)."""
    bias = getattr(model.blocks[check_layer(model, layer)].mlp, "b_out", None)
    return bias if isinstance(bias, torch.Tensor) else None


def mlp_value(
    model: HookedTransformer, layer: int, keys: Float[torch.Tensor, "... d_mlp"]
) -> Float[torch.Tensor, "... d_model"]:
    """Raw MLP output (before any post-MLP norm) for given keys: ``keys @ W_out + b_out``."""
    out = keys @ mlp_out_weight(model, layer)
    bias = mlp_out_bias(model, layer)
    return out + bias if bias is not None else out


@contextmanager
def raw_mlp_output_hook(
    model: HookedTransformer,
    layer: int,
    fn: Callable[[torch.Tensor], torch.Tensor | None],
) -> Iterator[None]:
    """Temporarily pass the raw MLP output of block ``layer`` through ``fn``.

    The raw output is the output projection's result, before a post-MLP norm (Gemma 2/3's
    ``ln2_post``) and before ``hook_mlp_out``; ROME's values live there. ``fn`` may return a
    replacement tensor or ``None`` (read-only). The hook is removed even on exceptions.
    """
    mlp = model.blocks[check_layer(model, layer)].mlp

    def _hook(_module: nn.Module, _inputs: object, output: torch.Tensor) -> torch.Tensor | None:
        return fn(output)

    handle = mlp.register_forward_hook(_hook)
    try:
        yield
    finally:
        handle.remove()


def to_tokens(model: HookedTransformer, text: str) -> Int[torch.Tensor, " pos"]:
    """Tokenise one string the way the model expects (BOS prepended when the model uses one)."""
    tokens = model.to_tokens(text, truncate=False)[0]
    check_fits(model, int(tokens.shape[0]), what=repr(text[:60]))
    return tokens


def check_fits(model: HookedTransformer, length: int, what: str = "prompt") -> None:
    """Raise :class:`PromptTooLongError` if ``length`` tokens exceed the context window."""
    if length > int(model.cfg.n_ctx):
        raise PromptTooLongError(
            f"{what} is {length} tokens long; the model's context window is {model.cfg.n_ctx}"
        )


def residual_before(
    model: HookedTransformer, tokens: Int[torch.Tensor, "batch pos"], layer: int
) -> Float[torch.Tensor, "batch pos d_model"]:
    """Residual stream entering block ``layer`` (the blocks above are not run)."""
    return model(tokens, stop_at_layer=layer)


def run_blocks_from(
    model: HookedTransformer, resid: Float[torch.Tensor, "batch pos d_model"], layer: int
) -> Float[torch.Tensor, "batch pos d_model"]:
    """Run blocks ``layer..n_layers-1`` on a residual; returns the last block's output."""
    return model(resid, start_at_layer=layer, stop_at_layer=n_layers(model))


def decode_residual(
    model: HookedTransformer, resid: Float[torch.Tensor, "... d_model"]
) -> Float[torch.Tensor, "... d_vocab"]:
    """Logits of residual vectors: final norm, unembedding and any logit soft-cap.

    Only pass the positions you need: with a 262k vocabulary the unembedding costs more than the
    whole body of a small model.
    """
    x = resid
    if model.cfg.normalization_type is not None:
        x = model.ln_final(x.unsqueeze(0) if x.ndim == 2 else x)
        if resid.ndim == 2:
            x = x[0]
    logits = x @ model.W_U + model.b_U
    cap = float(getattr(model.cfg, "output_logits_soft_cap", -1.0) or -1.0)
    if cap > 0:
        logits = cap * torch.tanh(logits / cap)
    return logits


def weights_fingerprint(
    model: HookedTransformer, overrides: dict[str, torch.Tensor] | None = None
) -> str:
    """A short hash that identifies a model's weights (and so its weight space).

    Every parameter contributes its name, shape, dtype and values (tensors above ~1M elements
    are sampled with a fixed stride, which still catches any re-training, weight processing
    such as ``fold_ln``, or a different checkpoint). ``overrides`` substitutes tensors by name;
    the edit registry uses it to fingerprint the *unedited* weights of an edited model.

    Args:
        model: the model.
        overrides: optional ``{parameter name: tensor}`` used instead of the live parameters.

    Returns:
        A 24-character hex digest.
    """
    overrides = overrides or {}
    digest = hashlib.sha256()
    digest.update(type(model).__name__.encode())
    for name, param in model.named_parameters():
        tensor = overrides.get(name, param).detach()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        flat = tensor.reshape(-1)
        step = max(1, flat.numel() // _FINGERPRINT_MAX_ELEMENTS)
        sample = flat[::step].to("cpu", torch.float32).contiguous()
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:24]


def parameters_checksum(model: HookedTransformer) -> str:
    """Exact sha256 over every parameter's bytes (slow on big models; for tests and audits)."""
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        digest.update(name.encode())
        digest.update(param.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def model_label(model: HookedTransformer) -> str:
    """Human-readable model name (``cfg.model_name``)."""
    return str(getattr(model.cfg, "model_name", "unknown"))
