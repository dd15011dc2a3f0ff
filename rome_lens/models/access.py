"""The model-access layer: the only module that knows which model class it holds.

Every feature of rome_lens (ROME and its statistics, tracing, patching, probes, evaluation)
reaches into a model through these functions: hook names, the MLP output weight of a block, the
raw MLP output (before any post-MLP norm), running a slice of the blocks, and decoding a residual
through the final norm and unembedding. Two model APIs are supported:

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
    >>> w = access.mlp_out_weight(model, 5)        # nn.Parameter [d_mlp, d_model]
    >>> access.key_hook_name(5)
    'blocks.5.mlp.hook_post'
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import nn

from rome_lens._typing import Model
from rome_lens.errors import LayerOutOfRangeError, PromptTooLongError

# Largest number of elements hashed from one tensor by the fingerprint; bigger tensors are
# sampled with a fixed stride (the embedding of a 262k vocabulary would otherwise dominate).
_FINGERPRINT_MAX_ELEMENTS = 1 << 20
_WEIGHT_NAME = re.compile(r"blocks\.(\d+)\.mlp\.W_out")


def is_bridge(model: object) -> bool:
    """Whether ``model`` is a TransformerLens ``TransformerBridge`` (else a HookedTransformer)."""
    try:
        from transformer_lens.model_bridge import TransformerBridge
    except ImportError:  # pragma: no cover - every supported TransformerLens has the bridge
        return False
    return isinstance(model, TransformerBridge)


def api_name(model: Model) -> str:
    """``"bridge"`` for a TransformerBridge, ``"hooked"`` for a HookedTransformer."""
    return "bridge" if is_bridge(model) else "hooked"


def weight_space(model: Model) -> str:
    """Which weights an edit computed on ``model`` lives in.

    ``"hooked"``: HookedTransformer weights (processed or not, as loaded); ``"bridge-raw"``:
    the Hugging Face weights of a TransformerBridge; ``"bridge-compat"``: a bridge after
    ``enable_compatibility_mode()`` (folded norms, centred unembedding). The fingerprint
    (:func:`weights_fingerprint`) tells two weight sets apart; this names the kind.
    """
    if not is_bridge(model):
        return "hooked"
    return "bridge-compat" if getattr(model, "compatibility_mode", False) else "bridge-raw"


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


EMBED_HOOK = "hook_embed"


def embedding_matrix(model: Model) -> Float[torch.Tensor, "d_vocab d_model"]:
    """Token embedding matrix whose rows are what ``hook_embed`` emits.

    On a bridge around Gemma, ``hook_embed`` fires after the ``sqrt(d_model)`` scaling that
    Model folds into ``W_E``; the scale is applied here so both APIs agree.
    """
    if not is_bridge(model):
        return model.W_E
    weight = model.W_E
    embed = getattr(model.embed, "original_component", None)
    scale = getattr(embed, "embed_scale", None)
    if scale is None:
        return weight
    return weight * torch.as_tensor(scale).to(weight.device, weight.dtype)


def mlp_out_parameter(model: Model, layer: int) -> tuple[str, nn.Parameter, bool]:
    """The parameter that holds block ``layer``'s MLP output projection, as stored.

    Returns:
        ``(state-dict name, parameter, transposed)``; ``transposed`` is true when the
        parameter is laid out ``[d_model, d_mlp]`` (a bridge's ``nn.Linear``).
    """
    layer = check_layer(model, layer)
    if is_bridge(model):
        bridge: Any = model
        weight = bridge.blocks[layer].mlp.out.original_component.weight
        d_mlp = int(bridge.cfg.d_mlp)
        transposed = weight.ndim == 2 and weight.shape[1] == d_mlp
        if not transposed and not (weight.ndim == 2 and weight.shape[0] == d_mlp):
            raise TypeError(f"blocks.{layer}.mlp.out.weight has shape {tuple(weight.shape)}")
        names = {id(p): n for n, p in model.named_parameters()}
        return names[id(weight)], weight, bool(transposed)
    weight = model.blocks[layer].mlp.W_out
    if not isinstance(weight, nn.Parameter) or weight.ndim != 2:
        raise TypeError(f"blocks.{layer}.mlp.W_out is not a 2-D parameter: {type(weight)}")
    return f"blocks.{layer}.mlp.W_out", weight, False


def mlp_out_weight(model: Model, layer: int) -> torch.Tensor:
    """The MLP output projection of block ``layer``, laid out ``[d_mlp, d_model]``.

    On a Model this is the parameter itself; on a bridge a transposed view of it.
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


def mlp_out_weight_name(layer: int) -> str:
    """API-independent name of block ``layer``'s MLP output weight (``blocks.L.mlp.W_out``).

    It is the HookedTransformer state-dict name; on a bridge it names the same logical weight
    (see :func:`mlp_out_parameter` for the stored parameter).
    """
    return f"blocks.{layer}.mlp.W_out"


def layer_of_weight_name(name: str) -> int:
    """Inverse of :func:`mlp_out_weight_name`."""
    match = _WEIGHT_NAME.fullmatch(name)
    if match is None:
        raise ValueError(f"not an MLP output weight name: {name!r}")
    return int(match.group(1))


def mlp_out_bias(model: Model, layer: int) -> torch.Tensor | None:
    """Bias of the MLP output projection (``None`` when the model has none)."""
    if is_bridge(model):
        bridge: Any = model
        bias = getattr(
            bridge.blocks[check_layer(model, layer)].mlp.out.original_component, "bias", None
        )
        return bias if isinstance(bias, torch.Tensor) else None
    bias = getattr(model.blocks[check_layer(model, layer)].mlp, "b_out", None)
    return bias if isinstance(bias, torch.Tensor) else None


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
    """
    kwargs: dict[str, Any] = {}
    if prefix is not None:
        kwargs["past_kv_cache"] = prefix.cache
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    return model(tokens, stop_at_layer=layer, **kwargs)


class FrozenPrefix:
    """Keys and values of a batch of prefixes, computed once and reused by later passes.

    Only models with a TransformerLens key-value cache support it (see
    :func:`supports_frozen_prefix`); the object is opaque outside this module.
    """

    def __init__(self, cache: Any, n_rows: int, width: int) -> None:
        self.cache, self.n_rows, self.width = cache, n_rows, width

    def __repr__(self) -> str:
        return f"FrozenPrefix(rows={self.n_rows}, positions={self.width})"


def supports_frozen_prefix(model: Model) -> bool:
    """Whether :func:`run_prefix` works on ``model`` (HookedTransformer: yes; bridge: no)."""
    return not is_bridge(model)


def run_prefix(
    model: Model,
    tokens: Int[torch.Tensor, "batch pos"],
    attention_mask: Int[torch.Tensor, "batch pos"],
) -> FrozenPrefix:
    """Run ``tokens`` through every block once and freeze their keys and values.

    Raises:
        TypeError: the model has no TransformerLens key-value cache (a TransformerBridge).
    """
    if not supports_frozen_prefix(model):
        raise TypeError("a TransformerBridge has no TransformerLens key-value cache")
    from transformer_lens import TransformerLensKeyValueCache

    cache = TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device, tokens.shape[0])
    with torch.no_grad():
        model(tokens, past_kv_cache=cache, attention_mask=attention_mask, return_type=None)
    cache.freeze()
    return FrozenPrefix(cache, int(tokens.shape[0]), int(tokens.shape[1]))


class _StopForward(Exception):
    """Raised by a hook to end a bridge forward pass once the wanted state is captured."""


def _bridge_final_hook_name(model: Model) -> str:
    """Hook whose input is the last block's output (before the final norm) on a bridge."""
    return "ln_final.hook_in"


def _bridge_forward_to_final(
    model: Model,
    tokens: Int[torch.Tensor, "batch pos"],
    extra_hooks: list[tuple[str | Callable[..., Any], Callable[..., Any]]] | None = None,
    **kwargs: Any,
) -> Float[torch.Tensor, "batch pos d_model"]:
    """Bridge forward that returns the last block's output and never computes the logits."""
    captured: dict[str, torch.Tensor] = {}

    def capture(act: torch.Tensor, hook: object = None) -> None:
        captured["final"] = act
        raise _StopForward

    hooks: list[tuple[str | Callable[..., Any], Callable[..., Any]]] = [
        *(extra_hooks or []),
        (_bridge_final_hook_name(model), capture),
    ]
    try:
        with model.hooks(fwd_hooks=hooks):
            model(tokens, **kwargs)
    except _StopForward:
        pass
    if "final" not in captured:  # pragma: no cover - the hook always fires
        raise RuntimeError("the bridge's final-norm hook did not fire")
    return captured["final"]


def final_residual(
    model: Model, tokens: Int[torch.Tensor, "batch pos"], **kwargs: Any
) -> Float[torch.Tensor, "batch pos d_model"]:
    """The residual stream after the last block (before the final norm); no logits computed.

    ``kwargs`` go to the forward pass (e.g. ``attention_mask``).
    """
    if is_bridge(model):
        return _bridge_forward_to_final(model, tokens, **kwargs)
    return model(tokens, stop_at_layer=n_layers(model), **kwargs)


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
    wanted = set(names)
    if not is_bridge(model):
        stop = n_layers(model) if stop_at_layer is None else stop_at_layer
        hooked: Any = model
        out, cache = hooked.run_with_cache(
            tokens, names_filter=lambda n: n in wanted, stop_at_layer=stop, **kwargs
        )
        return out, {n: cache[n] for n in wanted if n in cache.cache_dict}
    states: dict[str, torch.Tensor] = {}

    def keeper(name: str) -> Callable[..., Any]:
        def keep(act: torch.Tensor, hook: object = None) -> None:
            states[name] = act

        return keep

    hooks: list[tuple[str | Callable[..., Any], Callable[..., Any]]] = [
        (name, keeper(name)) for name in wanted
    ]
    if stop_at_layer is None or stop_at_layer >= n_layers(model):
        return _bridge_forward_to_final(model, tokens, extra_hooks=hooks, **kwargs), states
    with model.hooks(fwd_hooks=hooks):
        out = model(tokens, stop_at_layer=stop_at_layer, **kwargs)
    return out, states


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
    """
    if not is_bridge(model):
        kwargs: dict[str, Any] = {}
        if prefix is not None:
            kwargs["past_kv_cache"] = prefix.cache
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        return model(resid, start_at_layer=layer, stop_at_layer=n_layers(model), **kwargs)
    if prefix is not None:
        raise TypeError("a TransformerBridge has no TransformerLens key-value cache")
    placeholder = torch.zeros(resid.shape[:2], dtype=torch.long, device=resid.device)

    def replace(act: torch.Tensor, hook: object = None) -> torch.Tensor:
        return resid.to(act.dtype)

    return _bridge_forward_to_final(
        model, placeholder, extra_hooks=[(resid_pre_hook_name(layer), replace)]
    )


def decode_residual(
    model: Model, resid: Float[torch.Tensor, "... d_model"]
) -> Float[torch.Tensor, "... d_vocab"]:
    """Logits of residual vectors: final norm, unembedding and any logit soft-cap.

    Only pass the positions you need: with a 262k vocabulary the unembedding costs more than the
    whole body of a small model.
    """
    x = resid
    if is_bridge(model):
        x = model.ln_final(x.unsqueeze(0) if x.ndim == 2 else x)
        logits = model.unembed(x)
        if resid.ndim == 2:
            logits = logits[0]
        config = getattr(getattr(model, "original_model", None), "config", None)
        cap = float(getattr(config, "final_logit_softcapping", None) or -1.0)
    else:
        if model.cfg.normalization_type is not None:
            x = model.ln_final(x.unsqueeze(0) if x.ndim == 2 else x)
            if resid.ndim == 2:
                x = x[0]
        logits = x @ model.W_U + model.b_U
        cap = float(getattr(model.cfg, "output_logits_soft_cap", -1.0) or -1.0)
    if cap > 0:
        logits = cap * torch.tanh(logits / cap)
    return logits


class IncrementalDecoder:
    """Next-token logits for a growing batch of sequences, with a key-value cache.

    HookedTransformer: TransformerLens's key-value cache and :func:`decode_residual` on the
    last position only. Bridge: the wrapped Hugging Face model's own cache, logits of the last
    position only. Weight edits are seen by both (they change the parameters).

    Example:
        >>> step = IncrementalDecoder(model, batch=2)
        >>> logits = step(prompt_tokens)        # [2, d_vocab], for the next token
        >>> logits = step(next_tokens)          # feed one new token per row
    """

    def __init__(self, model: Model, batch: int) -> None:
        self.model = model
        if is_bridge(model):
            self.cache: object = None
        else:
            from transformer_lens import TransformerLensKeyValueCache

            self.cache = TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device, batch)

    @torch.no_grad()
    def __call__(
        self, tokens: Int[torch.Tensor, "batch new"]
    ) -> Float[torch.Tensor, "batch d_vocab"]:
        """Feed ``tokens`` (the prompt first, then one token per row); logits of the next."""
        if is_bridge(self.model):
            bridge: Any = self.model
            out = bridge.original_model(
                input_ids=tokens, past_key_values=self.cache, use_cache=True, logits_to_keep=1
            )
            self.cache = out.past_key_values
            return out.logits[:, -1, :]
        resid = self.model(
            tokens,
            past_kv_cache=self.cache,
            attention_mask=torch.ones_like(tokens),
            stop_at_layer=n_layers(self.model),
        )
        return decode_residual(self.model, resid[:, -1, :])


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
        match = _WEIGHT_NAME.fullmatch(name)
        if match is None:
            native[name] = tensor
            continue
        stored, _, transposed = mlp_out_parameter(model, int(match.group(1)))
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
