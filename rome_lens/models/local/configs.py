"""``HookedTransformerConfig`` fields derived from a transformers config, per family.

TransformerLens 3.9 knows the configuration of the checkpoints it has names for; a local
checkpoint of another size (a small Llama, a fine-tuned Qwen) has none. Everything a
HookedTransformer needs is in the checkpoint's own configuration, so these functions read it
from there: sizes, norms, activation, rotary base and scaling, attention windows and soft caps.
Anything the HookedTransformer cannot reproduce exactly (e.g. a rotary scaling other than
Llama 3's) is refused rather than approximated.

Every function returns plain JSON values, so the fields can be cached next to the weights.
"""

from __future__ import annotations

import math
from typing import Any

from rome_lens.errors import UnsupportedModelError

# TransformerLens allocates [n_ctx, n_ctx] masks and [n_ctx, d_head] rotary tables per layer; a
# 128k-token context would need gigabytes. Its own configs cap Gemma 3 the same way.
MAX_CONTEXT = 8192


def _context(length: int) -> int:
    return min(int(length), MAX_CONTEXT)


def _rope_parameters(config: Any, layer_type: str | None = None) -> dict[str, Any]:
    """Rotary settings of a config (or of one layer type's, for Gemma 3).

    transformers 5 keeps them in ``rope_parameters``; 4.x in ``rope_theta`` and ``rope_scaling``.
    """
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and layer_type is not None and layer_type in params:
        params = params[layer_type]
    if not isinstance(params, dict):
        params = dict(getattr(config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    return params


def _rope_type(params: dict[str, Any]) -> str:
    return str(params.get("rope_type") or params.get("type") or "default")


def _plain_rope(config: Any, layer_type: str | None = None) -> float:
    """The rotary base, refusing any rotary scaling."""
    params = _rope_parameters(config, layer_type)
    if _rope_type(params) != "default":
        raise UnsupportedModelError(
            f"rotary scaling {_rope_type(params)!r} ({config.model_type}) is not supported "
            "for a derived HookedTransformer config; load it with api='bridge'"
        )
    return float(params.get("rope_theta", 10000.0))


def _rotary_gated(config: Any) -> dict[str, Any]:
    """Fields shared by the RMS-norm, gated-MLP, rotary families (Llama, Gemma, Qwen)."""
    heads = int(config.num_attention_heads)
    d_head = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    return {
        "d_model": int(config.hidden_size),
        "d_head": d_head,
        "n_heads": heads,
        "n_key_value_heads": int(getattr(config, "num_key_value_heads", None) or heads),
        "d_mlp": int(config.intermediate_size),
        "n_layers": int(config.num_hidden_layers),
        "n_ctx": _context(config.max_position_embeddings),
        "eps": float(config.rms_norm_eps),
        "d_vocab": int(config.vocab_size),
        "normalization_type": "RMS",
        "positional_embedding_type": "rotary",
        "rotary_dim": d_head,
        "rotary_adjacent_pairs": False,
        "final_rms": True,
        "gated_mlp": True,
    }


def llama(config: Any) -> dict[str, Any]:
    """Llama 1/2/3 (Llama 3's rotary scaling included)."""
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise UnsupportedModelError("a Llama with attention or MLP biases is not supported")
    fields = _rotary_gated(config)
    fields["act_fn"] = str(config.hidden_act)
    params = _rope_parameters(config)
    fields["rotary_base"] = float(params.get("rope_theta", 10000.0))
    if _rope_type(params) == "llama3":
        fields.update(
            use_NTK_by_parts_rope=True,
            NTK_original_ctx_len=int(params["original_max_position_embeddings"]),
            NTK_by_parts_low_freq_factor=float(params.get("low_freq_factor", 1.0)),
            NTK_by_parts_high_freq_factor=float(params.get("high_freq_factor", 4.0)),
            NTK_by_parts_factor=float(params.get("factor", 1.0)),
        )
    else:
        _plain_rope(config)
    if fields["n_key_value_heads"] == fields["n_heads"]:
        fields["n_key_value_heads"] = None  # plain attention: TransformerLens's Llama layout
    return fields


def qwen2(config: Any) -> dict[str, Any]:
    """Qwen 2 / 2.5 (query, key and value biases; no sliding window)."""
    if getattr(config, "use_sliding_window", False):
        raise UnsupportedModelError("a Qwen 2 with sliding-window attention is not supported")
    fields = _rotary_gated(config)
    fields.update(
        act_fn=str(config.hidden_act),
        rotary_base=_plain_rope(config),
        default_prepend_bos=False,
    )
    return fields


def _attention_types(config: Any) -> list[str]:
    return ["local" if t == "sliding_attention" else "global" for t in config.layer_types]


def gemma2(config: Any) -> dict[str, Any]:
    """Gemma 2: norms before and after each sublayer, soft caps, alternating local attention."""
    fields = _rotary_gated(config)
    fields.update(
        act_fn=str(config.hidden_activation),
        rotary_base=_plain_rope(config),
        use_attn_scale=True,
        attn_scale=math.sqrt(float(config.query_pre_attn_scalar)),
        use_local_attn=True,
        window_size=int(config.sliding_window),
        attn_types=_attention_types(config),
        use_normalization_before_and_after=True,
    )
    if getattr(config, "attn_logit_softcapping", None):
        fields["attn_scores_soft_cap"] = float(config.attn_logit_softcapping)
    if getattr(config, "final_logit_softcapping", None):
        fields["output_logits_soft_cap"] = float(config.final_logit_softcapping)
    return fields


def gemma3(config: Any) -> dict[str, Any]:
    """Gemma 3 text models: Gemma 2's layout with query/key norms and two rotary bases."""
    fields = gemma2(config)
    fields.update(
        use_qk_norm=True,
        rotary_base=_plain_rope(config, "full_attention"),
        rotary_base_local=_plain_rope(config, "sliding_attention"),
    )
    return fields


def gpt2(config: Any) -> dict[str, Any]:
    """GPT-2: LayerNorm, learned positions, a GELU MLP with biases."""
    return {
        "d_model": int(config.n_embd),
        "d_head": int(config.n_embd) // int(config.n_head),
        "n_heads": int(config.n_head),
        "d_mlp": int(config.n_inner or 4 * config.n_embd),
        "n_layers": int(config.n_layer),
        "n_ctx": _context(config.n_positions),
        "eps": float(config.layer_norm_epsilon),
        "d_vocab": int(config.vocab_size),
        "act_fn": str(config.activation_function),
        "use_attn_scale": bool(getattr(config, "scale_attn_weights", True)),
        "scale_attn_by_inverse_layer_idx": bool(config.scale_attn_by_inverse_layer_idx),
        "normalization_type": "LN",
    }
