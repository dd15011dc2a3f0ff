"""Adapter for TransformerLens 3.9's ``HookedTransformer``.

``blocks[l].mlp.W_out`` is the MLP output parameter, laid out ``[d_mlp, d_model]``; every state
rome_lens needs is a hook point; ``start_at_layer``/``stop_at_layer`` run a slice of the blocks;
TransformerLens's key-value cache freezes prefixes.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import nn

from rome_lens._typing import Model
from rome_lens.models.adapters.base import FrozenPrefix, KeyValueRecord, ModelAdapter
from rome_lens.models.layout import n_layers


def _new_cache(model: Model, batch: int) -> Any:
    """An empty TransformerLens key-value cache for ``batch`` rows."""
    from transformer_lens import TransformerLensKeyValueCache

    return TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device, batch)


def _cache_kwargs(
    prefix: FrozenPrefix | None, attention_mask: torch.Tensor | None
) -> dict[str, Any]:
    """Forward keyword arguments for an optional frozen prefix and attention mask."""
    kwargs: dict[str, Any] = {}
    if prefix is not None:
        kwargs["past_kv_cache"] = prefix.cache
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    return kwargs


class HookedAdapter(ModelAdapter):
    """HookedTransformer; also the default for any model with its interface."""

    name = "hooked"
    description = "a HookedTransformer"
    supports_frozen_prefix = True

    def matches(self, model: object) -> bool:
        """Always true: the fallback after the more specific adapters."""
        return True

    def weight_space(self, model: Model) -> str:
        """``"hooked"``: the weights as loaded (processed or not)."""
        return "hooked"

    def embedding_matrix(self, model: Model) -> Float[torch.Tensor, "d_vocab d_model"]:
        """``W_E``: HookedTransformer folds any embedding scale into it."""
        return model.W_E

    def mlp_out_parameter(self, model: Model, layer: int) -> tuple[str, nn.Parameter, bool]:
        """``blocks[layer].mlp.W_out``, already ``[d_mlp, d_model]``."""
        weight = model.blocks[layer].mlp.W_out
        if not isinstance(weight, nn.Parameter) or weight.ndim != 2:
            raise TypeError(f"blocks.{layer}.mlp.W_out is not a 2-D parameter: {type(weight)}")
        return f"blocks.{layer}.mlp.W_out", weight, False

    def mlp_out_bias(self, model: Model, layer: int) -> torch.Tensor | None:
        """``blocks[layer].mlp.b_out`` when the model has one."""
        bias = getattr(model.blocks[layer].mlp, "b_out", None)
        return bias if isinstance(bias, torch.Tensor) else None

    def post_mlp(self, model: Model, layer: int) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """``blocks[layer].ln2_post`` when the model normalises after the MLP, else ``None``."""
        if not getattr(model.cfg, "use_normalization_before_and_after", False):
            return None
        norm = getattr(model.blocks[layer], "ln2_post", None)
        return norm if callable(norm) else None

    def residual_before(
        self,
        model: Model,
        tokens: Int[torch.Tensor, "batch pos"],
        layer: int,
        prefix: FrozenPrefix | None,
        attention_mask: Int[torch.Tensor, "batch all_pos"] | None,
    ) -> Float[torch.Tensor, "batch pos d_model"]:
        """``stop_at_layer``, continuing the prefix's key-value cache if given."""
        return model(tokens, stop_at_layer=layer, **_cache_kwargs(prefix, attention_mask))

    def final_residual(
        self, model: Model, tokens: Int[torch.Tensor, "batch pos"], **kwargs: Any
    ) -> Float[torch.Tensor, "batch pos d_model"]:
        """``stop_at_layer=n_layers``: the final norm and unembedding never run."""
        return model(tokens, stop_at_layer=n_layers(model), **kwargs)

    def run_with_states(
        self,
        model: Model,
        tokens: Int[torch.Tensor, "batch pos"],
        names: Collection[str],
        stop_at_layer: int | None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``run_with_cache`` with a names filter, stopping before the unembedding."""
        wanted = set(names)
        stop = n_layers(model) if stop_at_layer is None else stop_at_layer
        hooked: Any = model
        out, cache = hooked.run_with_cache(
            tokens, names_filter=lambda n: n in wanted, stop_at_layer=stop, **kwargs
        )
        return out, {n: cache[n] for n in wanted if n in cache.cache_dict}

    def run_blocks_from(
        self,
        model: Model,
        resid: Float[torch.Tensor, "batch pos d_model"],
        layer: int,
        prefix: FrozenPrefix | None,
        attention_mask: Int[torch.Tensor, "batch all_pos"] | None,
    ) -> Float[torch.Tensor, "batch pos d_model"]:
        """``start_at_layer``, continuing the prefix's key-value cache if given."""
        return model(
            resid,
            start_at_layer=layer,
            stop_at_layer=n_layers(model),
            **_cache_kwargs(prefix, attention_mask),
        )

    def decode_residual(
        self, model: Model, resid: Float[torch.Tensor, "... d_model"]
    ) -> Float[torch.Tensor, "... d_vocab"]:
        """Final norm (if any), ``W_U``, ``b_U`` and the logit soft-cap (if any)."""
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

    def start_decoding(self, model: Model, batch: int) -> object:
        """An empty TransformerLens key-value cache."""
        return _new_cache(model, batch)

    def decode_step(
        self, model: Model, cache: object, tokens: Int[torch.Tensor, "batch new"]
    ) -> tuple[Float[torch.Tensor, "batch d_vocab"], object]:
        """Run every block on the new tokens; decode the last position only."""
        resid = model(
            tokens,
            past_kv_cache=cache,
            attention_mask=torch.ones_like(tokens),
            stop_at_layer=n_layers(model),
        )
        return self.decode_residual(model, resid[:, -1, :]), cache

    def run_prefix(
        self,
        model: Model,
        tokens: Int[torch.Tensor, "batch pos"],
        attention_mask: Int[torch.Tensor, "batch pos"],
    ) -> FrozenPrefix:
        """Fill a TransformerLens key-value cache, then freeze it."""
        cache = _new_cache(model, tokens.shape[0])
        with torch.no_grad():
            model(tokens, past_kv_cache=cache, attention_mask=attention_mask, return_type=None)
        cache.freeze()
        return FrozenPrefix(cache, int(tokens.shape[0]), int(tokens.shape[1]))

    def run_with_keys_values(
        self,
        model: Model,
        tokens: Int[torch.Tensor, "batch pos"],
        names: Collection[str],
        **kwargs: Any,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], KeyValueRecord]:
        """Run every block into a fresh key-value cache and keep its entries."""
        cache = _new_cache(model, tokens.shape[0])
        out, states = self.run_with_states(model, tokens, names, None, past_kv_cache=cache,
                                           **kwargs)
        record = KeyValueRecord(
            keys=tuple(entry.past_keys for entry in cache.entries),
            values=tuple(entry.past_values for entry in cache.entries),
        )
        return out, states, record

    def prefix_from_keys_values(
        self, model: Model, record: KeyValueRecord, width: int, rows: slice | torch.Tensor
    ) -> FrozenPrefix:
        """Frozen cache entries built from slices of the recorded keys and values."""
        from transformer_lens import TransformerLensKeyValueCache
        from transformer_lens.cache.key_value_cache_entry import (
            TransformerLensKeyValueCacheEntry,
        )

        entries = [
            TransformerLensKeyValueCacheEntry(k[rows, :width], v[rows, :width], frozen=True)
            for k, v in zip(record.keys, record.values, strict=True)
        ]
        n_rows = entries[0].past_keys.shape[0]
        mask = torch.ones(n_rows, width, dtype=torch.int, device=record.keys[0].device)
        cache = TransformerLensKeyValueCache(entries, mask, frozen=True)
        return FrozenPrefix(cache, int(n_rows), width)
