"""The model-access layer: the one door through which rome_lens reaches into a model.

Every feature of rome_lens (ROME and its statistics, tracing, patching, probes, evaluation)
reaches into a model through these functions: hook names, the MLP output weight of a block, the
raw MLP output (before any post-MLP norm), running a slice of the blocks, and decoding a residual
through the final norm and unembedding. Two model APIs are supported, each by an adapter in
:mod:`rome_lens.models.adapters` (this module validates arguments and delegates to the
adapter; it never tests the model class itself):

* TransformerLens 3.9's ``HookedTransformer``: ``blocks[l].mlp.W_out`` is the parameter,
  laid out ``[d_mlp, d_model]``.
* TransformerLens's ``TransformerBridge`` (3.9 and 4.x) around a Hugging Face model: the
  parameter is ``blocks[l].mlp.out.weight`` in Hugging Face layout ``[d_model, d_mlp]``
  (``blocks[l].mlp.W_out`` is only a transposed view). rome_lens always works in the
  ``[d_mlp, d_model]`` layout and transposes at the boundary (:func:`read_mlp_out`,
  :func:`write_mlp_out`). HookedTransformer hook names (``blocks.L.hook_resid_pre``, ...) are
  aliases on the bridge, so the hook names below are the same for both.

Example:
    >>> from rome_lens.models import access
    >>> w = access.read_mlp_out(model, 1)          # [d_mlp, d_model] on either API
    >>> tuple(w.shape) == (model.cfg.d_mlp, model.cfg.d_model)
    True
    >>> access.key_hook_name(5)
    'blocks.5.mlp.hook_post'
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import nn

from rome_lens._typing import Model
from rome_lens.errors import PromptTooLongError
from rome_lens.models.adapters import FrozenPrefix, KeyValueRecord, adapter_for
from rome_lens.models.layout import (
    EMBED_HOOK,
    attn_out_hook_name,
    check_layer,
    is_mlp_out_weight_name,
    key_hook_name,
    layer_of_weight_name,
    mlp_out_hook_name,
    mlp_out_weight_name,
    n_layers,
    resid_post_hook_name,
    resid_pre_hook_name,
)

__all__ = [
    "EMBED_HOOK",
    "FrozenPrefix",
    "IncrementalDecoder",
    "KeyValueRecord",
    "api_name",
    "attn_out_hook_name",
    "check_fits",
    "check_layer",
    "decode_residual",
    "embedding_matrix",
    "final_residual",
    "frozen_prefix_from",
    "is_bridge",
    "key_hook_name",
    "layer_of_weight_name",
    "mlp_out_bias",
    "mlp_out_hook_name",
    "mlp_out_parameter",
    "mlp_out_weight",
    "mlp_out_weight_name",
    "mlp_value",
    "model_label",
    "n_layers",
    "parameters_checksum",
    "raw_mlp_output_hook",
    "read_mlp_out",
    "resid_post_hook_name",
    "resid_pre_hook_name",
    "residual_before",
    "run_blocks_from",
    "run_prefix",
    "run_with_keys_values",
    "post_mlp",
    "run_with_states",
    "supports_frozen_prefix",
    "to_tokens",
    "weight_space",
    "weights_fingerprint",
    "write_mlp_out",
]

# Largest number of elements hashed from one tensor by the fingerprint; bigger tensors are
# sampled with a fixed stride (the embedding of a 262k vocabulary would otherwise dominate).
_FINGERPRINT_MAX_ELEMENTS = 1 << 20


def is_bridge(model: object) -> bool:
    """Whether ``model`` is a TransformerLens ``TransformerBridge`` (else a HookedTransformer)."""
    return adapter_for(model).name == "bridge"


def api_name(model: Model) -> str:
    """``"bridge"`` for a TransformerBridge, ``"hooked"`` for a HookedTransformer."""
    return adapter_for(model).name


def weight_space(model: Model) -> str:
    """Which weights an edit computed on ``model`` lives in.

    ``"hooked"``: HookedTransformer weights (processed or not, as loaded); ``"bridge-raw"``:
    the Hugging Face weights of a TransformerBridge; ``"bridge-compat"``: a bridge after
    ``enable_compatibility_mode()`` (folded norms, centred unembedding). The fingerprint
    (:func:`weights_fingerprint`) tells two weight sets apart; this names the kind.
    """
    return adapter_for(model).weight_space(model)


def embedding_matrix(model: Model) -> Float[torch.Tensor, "d_vocab d_model"]:
    """Token embedding matrix whose rows are what ``hook_embed`` emits.

    On a bridge around Gemma, ``hook_embed`` fires after the ``sqrt(d_model)`` scaling that
    HookedTransformer folds into ``W_E``; the scale is applied here so both APIs agree.
    """
    return adapter_for(model).embedding_matrix(model)


def mlp_out_parameter(model: Model, layer: int) -> tuple[str, nn.Parameter, bool]:
    """The parameter that holds block ``layer``'s MLP output projection, as stored.

    Returns:
        ``(state-dict name, parameter, transposed)``; ``transposed`` is true when the
        parameter is laid out ``[d_model, d_mlp]`` (a bridge's ``nn.Linear``).
    """
    return adapter_for(model).mlp_out_parameter(model, check_layer(model, layer))


def mlp_out_weight(model: Model, layer: int) -> torch.Tensor:
    """The MLP output projection of block ``layer``, laid out ``[d_mlp, d_model]``.

    On a HookedTransformer this is the parameter itself; on a bridge a transposed view of it.
    Change weights only through :func:`write_mlp_out`.
    """
    _, weight, transposed = mlp_out_parameter(model, layer)
    return weight.T if transposed else weight


def read_mlp_out(model: Model, layer: int) -> Float[torch.Tensor, "d_mlp d_model"]:
    """A detached view of :func:`mlp_out_weight` (no copy)."""
    return mlp_out_weight(model, layer).detach()


def write_mlp_out(model: Model, layer: int, value: Float[torch.Tensor, "d_mlp d_model"]) -> None:
    """Overwrite block ``layer``'s MLP output weight with ``value`` (``[d_mlp, d_model]``)."""
    _, weight, transposed = mlp_out_parameter(model, layer)
    with torch.no_grad():
        weight.copy_(value.T if transposed else value)


def mlp_out_bias(model: Model, layer: int) -> torch.Tensor | None:
    """Bias of the MLP output projection (``None`` when the model has none)."""
    return adapter_for(model).mlp_out_bias(model, check_layer(model, layer))


def post_mlp(model: Model, layer: int) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The map from block ``layer``'s raw MLP output to its residual-stream contribution.

    ``None`` when the raw output is added unchanged; Gemma 2/3 apply an RMSNorm (``ln2_post``)
    first, so a wanted change of the residual stream is not the change of the raw output.
    """
    return adapter_for(model).post_mlp(model, check_layer(model, layer))


def mlp_value(
    model: Model, layer: int, keys: Float[torch.Tensor, "... d_mlp"]
) -> Float[torch.Tensor, "... d_model"]:
    """Raw MLP output (before any post-MLP norm) for given keys: ``keys @ W_out + b_out``."""
    out = keys @ mlp_out_weight(model, layer)
    bias = mlp_out_bias(model, layer)
    return out + bias if bias is not None else out


@contextmanager
def raw_mlp_output_hook(
    model: Model,
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


def to_tokens(model: Model, text: str) -> Int[torch.Tensor, " pos"]:
    """Tokenise one string the way the model expects (BOS prepended when the model uses one)."""
    tokens = model.to_tokens(text, truncate=False)[0]
    check_fits(model, int(tokens.shape[0]), what=repr(text[:60]))
    return tokens


def check_fits(model: Model, length: int, what: str = "prompt") -> None:
    """Raise :class:`PromptTooLongError` if ``length`` tokens exceed the context window."""
    if length > int(model.cfg.n_ctx):
        raise PromptTooLongError(
            f"{what} is {length} tokens long; the model's context window is {model.cfg.n_ctx}"
        )


def residual_before(
    model: Model,
    tokens: Int[torch.Tensor, "batch pos"],
    layer: int,
    *,
    prefix: FrozenPrefix | None = None,
    attention_mask: Int[torch.Tensor, "batch all_pos"] | None = None,
) -> Float[torch.Tensor, "batch pos d_model"]:
    """Residual stream entering block ``layer`` (the blocks above are not run).

    Args:
        model: the model.
        tokens: input tokens (the continuation of ``prefix`` when one is given).
        layer: the block whose input is returned.
        prefix: a :class:`FrozenPrefix` the tokens continue (see :func:`run_prefix`).
        attention_mask: mask over prefix and tokens (``None``: attend to everything).

    Raises:
        TypeError: a ``prefix`` on a model without frozen prefixes (a TransformerBridge).
    """
    return adapter_for(model).residual_before(model, tokens, layer, prefix, attention_mask)


def supports_frozen_prefix(model: Model) -> bool:
    """Whether ``model`` can freeze prefixes (HookedTransformer: yes; bridge: no).

    :func:`run_prefix`, :func:`run_with_keys_values`, :func:`frozen_prefix_from` and the
    ``prefix`` arguments work only where this is true.
    """
    return adapter_for(model).supports_frozen_prefix


def run_prefix(
    model: Model,
    tokens: Int[torch.Tensor, "batch pos"],
    attention_mask: Int[torch.Tensor, "batch pos"],
) -> FrozenPrefix:
    """Run ``tokens`` through every block once and freeze their keys and values.

    Raises:
        TypeError: the model has no TransformerLens key-value cache (a TransformerBridge).
    """
    return adapter_for(model).run_prefix(model, tokens, attention_mask)


def run_with_keys_values(
    model: Model,
    tokens: Int[torch.Tensor, "batch pos"],
    names: Collection[str],
    **kwargs: Any,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], KeyValueRecord]:
    """:func:`run_with_states` through every block that also records each layer's keys and values.

    The record lets later passes continue any rows and leading positions of this run without
    recomputing them (:func:`frozen_prefix_from`).

    Args:
        model: the model.
        tokens: input tokens.
        names: hook names to keep.
        **kwargs: passed to the forward pass (e.g. ``attention_mask``).

    Returns:
        ``(residual after the last block, {name: activation}, keys and values)``.

    Raises:
        TypeError: the model has no TransformerLens key-value cache (a TransformerBridge);
            check :func:`supports_frozen_prefix` first.
    """
    return adapter_for(model).run_with_keys_values(model, tokens, names, **kwargs)


def frozen_prefix_from(
    model: Model, record: KeyValueRecord, width: int, rows: slice | torch.Tensor
) -> FrozenPrefix:
    """A :class:`FrozenPrefix` of positions ``[0, width)`` of the chosen ``rows`` of a record.

    Args:
        model: the model the record was made on.
        record: keys and values from :func:`run_with_keys_values`.
        width: number of leading positions kept.
        rows: the record's rows to keep (a slice, or indices; repeats allowed).

    Raises:
        TypeError: the model has no TransformerLens key-value cache (a TransformerBridge).
    """
    return adapter_for(model).prefix_from_keys_values(model, record, width, rows)


def final_residual(
    model: Model, tokens: Int[torch.Tensor, "batch pos"], **kwargs: Any
) -> Float[torch.Tensor, "batch pos d_model"]:
    """The residual stream after the last block (before the final norm); no logits computed.

    ``kwargs`` go to the forward pass (e.g. ``attention_mask``).
    """
    return adapter_for(model).final_residual(model, tokens, **kwargs)


def run_with_states(
    model: Model,
    tokens: Int[torch.Tensor, "batch pos"],
    names: Collection[str],
    stop_at_layer: int | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One forward pass that keeps the activations of the hooks ``names``.

    Args:
        model: the model.
        tokens: input tokens.
        names: hook names to keep (HookedTransformer names; aliases on a bridge).
        stop_at_layer: ``None`` runs every block; ``k`` stops before block ``k``.
        **kwargs: passed to the forward pass (e.g. ``attention_mask``).

    Returns:
        ``(residual, states)``: the residual after the last block run (never logits) and
        ``{name: activation}`` for the names that fired.
    """
    return adapter_for(model).run_with_states(model, tokens, names, stop_at_layer, **kwargs)


def run_blocks_from(
    model: Model,
    resid: Float[torch.Tensor, "batch pos d_model"],
    layer: int,
    *,
    prefix: FrozenPrefix | None = None,
    attention_mask: Int[torch.Tensor, "batch all_pos"] | None = None,
) -> Float[torch.Tensor, "batch pos d_model"]:
    """Run blocks ``layer..n_layers-1`` on a residual; returns the last block's output.

    Args:
        model: the model.
        resid: the residual entering block ``layer``.
        layer: first block run.
        prefix: a :class:`FrozenPrefix` the positions of ``resid`` continue.
        attention_mask: mask over prefix and ``resid`` positions (with ``prefix``).

    A TransformerBridge on TransformerLens 3.9 cannot start at a layer; there the forward runs
    from placeholder tokens and ``blocks.{layer}.hook_resid_pre`` is replaced by ``resid``
    (same result, the blocks below ``layer`` run for nothing).

    Raises:
        TypeError: a ``prefix`` on a model without frozen prefixes (a TransformerBridge).
    """
    return adapter_for(model).run_blocks_from(model, resid, layer, prefix, attention_mask)


def decode_residual(
    model: Model, resid: Float[torch.Tensor, "... d_model"]
) -> Float[torch.Tensor, "... d_vocab"]:
    """Logits of residual vectors: final norm, unembedding and any logit soft-cap.

    Only pass the positions you need: with a 262k vocabulary the unembedding costs more than the
    whole body of a small model.
    """
    return adapter_for(model).decode_residual(model, resid)


class IncrementalDecoder:
    """Next-token logits for a growing batch of sequences, with a key-value cache.

    HookedTransformer: TransformerLens's key-value cache and :func:`decode_residual` on the
    last position only. Bridge: the wrapped Hugging Face model's own cache, logits of the last
    position only. Weight edits are seen by both (they change the parameters).

    Example:
        >>> step = IncrementalDecoder(model, batch=2)
        >>> prompt_tokens = model.to_tokens(["The Eiffel", "The Space"])   # [2, pos]
        >>> logits = step(prompt_tokens)        # [2, d_vocab], for the next token
        >>> next_tokens = logits.argmax(-1, keepdim=True)
        >>> logits = step(next_tokens)          # feed one new token per row
        >>> logits.shape[0]
        2
    """

    def __init__(self, model: Model, batch: int) -> None:
        self.model = model
        self._adapter = adapter_for(model)
        self.cache: object = self._adapter.start_decoding(model, batch)

    @torch.no_grad()
    def __call__(
        self, tokens: Int[torch.Tensor, "batch new"]
    ) -> Float[torch.Tensor, "batch d_vocab"]:
        """Feed ``tokens`` (the prompt first, then one token per row); logits of the next."""
        logits, self.cache = self._adapter.decode_step(self.model, self.cache, tokens)
        return logits


def weights_fingerprint(model: Model, overrides: dict[str, torch.Tensor] | None = None) -> str:
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
    overrides = _native_overrides(model, overrides or {})
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


def _native_overrides(model: Model, overrides: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map ``blocks.L.mlp.W_out`` overrides ([d_mlp, d_model]) to the stored parameters."""
    native = {}
    for name, tensor in overrides.items():
        if not is_mlp_out_weight_name(name):
            native[name] = tensor
            continue
        stored, _, transposed = mlp_out_parameter(model, layer_of_weight_name(name))
        native[stored] = tensor.T if transposed else tensor
    return native


def parameters_checksum(model: Model) -> str:
    """Exact sha256 over every parameter's bytes (slow on big models; for tests and audits)."""
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        digest.update(name.encode())
        digest.update(param.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def model_label(model: Model) -> str:
    """Human-readable model name (``cfg.model_name``)."""
    return str(getattr(model.cfg, "model_name", "unknown"))
