"""Adapter for TransformerLens's ``TransformerBridge`` (3.9 and 4.x) around a Hugging Face model.

The MLP output parameter is ``blocks[l].mlp.out.weight`` in Hugging Face layout
``[d_model, d_mlp]`` (``blocks[l].mlp.W_out`` is only a transposed view); rome_lens works in
``[d_mlp, d_model]`` and :mod:`rome_lens.models.access` transposes at the boundary.
HookedTransformer hook names are aliases on the bridge. The bridge has no TransformerLens
key-value cache (no frozen prefixes), and on TransformerLens 3.9 it cannot start at a layer,
so :meth:`BridgeAdapter.run_blocks_from` replaces ``hook_resid_pre`` in a full forward pass.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import nn

from rome_lens._typing import Model
from rome_lens.models.adapters.base import FrozenPrefix, ModelAdapter
from rome_lens.models.layout import n_layers, resid_pre_hook_name

_Hook = tuple[str | Callable[..., Any], Callable[..., Any]]
# Hook whose input is the last block's output (before the final norm).
_FINAL_HOOK = "ln_final.hook_in"


class _StopForward(Exception):
    """Raised by a hook to end a bridge forward pass once the wanted state is captured."""


def _forward_to_final(
    model: Model,
    tokens: Int[torch.Tensor, "batch pos"],
    extra_hooks: list[_Hook] | None = None,
    **kwargs: Any,
) -> Float[torch.Tensor, "batch pos d_model"]:
    """Bridge forward that returns the last block's output and never computes the logits."""
    captured: dict[str, torch.Tensor] = {}

    def capture(act: torch.Tensor, hook: object = None) -> None:
        captured["final"] = act
        raise _StopForward

    hooks: list[_Hook] = [*(extra_hooks or []), (_FINAL_HOOK, capture)]
    try:
        with model.hooks(fwd_hooks=hooks):
            model(tokens, **kwargs)
    except _StopForward:
        pass
    if "final" not in captured:  # pragma: no cover - the hook always fires
        raise RuntimeError("the bridge's final-norm hook did not fire")
    return captured["final"]


class BridgeAdapter(ModelAdapter):
    """TransformerBridge in raw or compatibility mode."""

    name = "bridge"
    description = "a TransformerBridge"
    supports_frozen_prefix = False

    def matches(self, model: object) -> bool:
        """Whether ``model`` is a ``TransformerBridge``."""
        try:
            from transformer_lens.model_bridge import TransformerBridge
        except ImportError:  # pragma: no cover - every supported TransformerLens has the bridge
            return False
        return isinstance(model, TransformerBridge)

    def weight_space(self, model: Model) -> str:
        """``"bridge-raw"`` or, after ``enable_compatibility_mode()``, ``"bridge-compat"``."""
        return "bridge-compat" if getattr(model, "compatibility_mode", False) else "bridge-raw"

    def embedding_matrix(self, model: Model) -> Float[torch.Tensor, "d_vocab d_model"]:
        """``W_E`` times the embedding scale (Gemma's ``sqrt(d_model)``) if any."""
        # hook_embed fires after Gemma's sqrt(d_model) scale, which HookedTransformer folds
        # into W_E: apply it here so both APIs agree.
        weight = model.W_E
        embed = getattr(model.embed, "original_component", None)
        scale = getattr(embed, "embed_scale", None)
        if scale is None:
            return weight
        return weight * torch.as_tensor(scale).to(weight.device, weight.dtype)

    def mlp_out_parameter(self, model: Model, layer: int) -> tuple[str, nn.Parameter, bool]:
        """The ``nn.Linear`` weight of ``blocks[layer].mlp.out`` (usually transposed)."""
        bridge: Any = model
        weight = bridge.blocks[layer].mlp.out.original_component.weight
        d_mlp = int(bridge.cfg.d_mlp)
        transposed = weight.ndim == 2 and weight.shape[1] == d_mlp
        if not transposed and not (weight.ndim == 2 and weight.shape[0] == d_mlp):
            raise TypeError(f"blocks.{layer}.mlp.out.weight has shape {tuple(weight.shape)}")
        names = {id(p): n for n, p in model.named_parameters()}
        return names[id(weight)], weight, bool(transposed)

    def mlp_out_bias(self, model: Model, layer: int) -> torch.Tensor | None:
        """The bias of ``blocks[layer].mlp.out`` when it has one."""
        bridge: Any = model
        bias = getattr(bridge.blocks[layer].mlp.out.original_component, "bias", None)
        return bias if isinstance(bias, torch.Tensor) else None

    def post_mlp(self, model: Model, layer: int) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """The Hugging Face layer's ``post_feedforward_layernorm`` (Gemma 2/3), else ``None``."""
        bridge: Any = model
        layer_module = getattr(bridge.blocks[layer], "original_component", None)
        norm = getattr(layer_module, "post_feedforward_layernorm", None)
        return norm if callable(norm) else None

    def residual_before(
        self,
        model: Model,
        tokens: Int[torch.Tensor, "batch pos"],
        layer: int,
        prefix: FrozenPrefix | None,
        attention_mask: Int[torch.Tensor, "batch all_pos"] | None,
    ) -> Float[torch.Tensor, "batch pos d_model"]:
        """``stop_at_layer`` (a bridge has no frozen prefixes)."""
        if prefix is not None:
            raise self.no_key_value_cache()
        kwargs: dict[str, Any] = {}
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        return model(tokens, stop_at_layer=layer, **kwargs)

    def final_residual(
        self, model: Model, tokens: Int[torch.Tensor, "batch pos"], **kwargs: Any
    ) -> Float[torch.Tensor, "batch pos d_model"]:
        """Forward pass cut at the final norm's input."""
        return _forward_to_final(model, tokens, **kwargs)

    def run_with_states(
        self,
        model: Model,
        tokens: Int[torch.Tensor, "batch pos"],
        names: Collection[str],
        stop_at_layer: int | None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Keeper hooks; a full run is cut at the final norm's input."""
        states: dict[str, torch.Tensor] = {}

        def keeper(name: str) -> Callable[..., Any]:
            def keep(act: torch.Tensor, hook: object = None) -> None:
                states[name] = act

            return keep

        hooks: list[_Hook] = [(name, keeper(name)) for name in set(names)]
        if stop_at_layer is None or stop_at_layer >= n_layers(model):
            return _forward_to_final(model, tokens, extra_hooks=hooks, **kwargs), states
        with model.hooks(fwd_hooks=hooks):
            out = model(tokens, stop_at_layer=stop_at_layer, **kwargs)
        return out, states

    def run_blocks_from(
        self,
        model: Model,
        resid: Float[torch.Tensor, "batch pos d_model"],
        layer: int,
        prefix: FrozenPrefix | None,
        attention_mask: Int[torch.Tensor, "batch all_pos"] | None,
    ) -> Float[torch.Tensor, "batch pos d_model"]:
        """Full forward from placeholder tokens with ``hook_resid_pre`` replaced."""
        if prefix is not None:
            raise self.no_key_value_cache()
        placeholder = torch.zeros(resid.shape[:2], dtype=torch.long, device=resid.device)

        def replace(act: torch.Tensor, hook: object = None) -> torch.Tensor:
            return resid.to(act.dtype)

        return _forward_to_final(
            model, placeholder, extra_hooks=[(resid_pre_hook_name(layer), replace)]
        )

    def decode_residual(
        self, model: Model, resid: Float[torch.Tensor, "... d_model"]
    ) -> Float[torch.Tensor, "... d_vocab"]:
        """Final norm, unembedding and the Hugging Face config's logit soft-cap."""
        x = model.ln_final(resid.unsqueeze(0) if resid.ndim == 2 else resid)
        logits = model.unembed(x)
        if resid.ndim == 2:
            logits = logits[0]
        config = getattr(getattr(model, "original_model", None), "config", None)
        cap = float(getattr(config, "final_logit_softcapping", None) or -1.0)
        if cap > 0:
            logits = cap * torch.tanh(logits / cap)
        return logits

    def start_decoding(self, model: Model, batch: int) -> object:
        """No cache yet: the Hugging Face model creates its own on the first step."""
        return None

    def decode_step(
        self, model: Model, cache: object, tokens: Int[torch.Tensor, "batch new"]
    ) -> tuple[Float[torch.Tensor, "batch d_vocab"], object]:
        """The Hugging Face model's own cache; logits of the last position only."""
        bridge: Any = model
        out = bridge.original_model(
            input_ids=tokens, past_key_values=cache, use_cache=True, logits_to_keep=1
        )
        return out.logits[:, -1, :], out.past_key_values
