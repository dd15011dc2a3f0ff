"""Copy-free forwards for HookedTransformer (a CPU speed-up, numerically equivalent).

TransformerLens 3.9 re-lays out weight matrices at every call to match Hugging Face's memory
layout, i.e. copies weights on every forward:

- ``Unembed.forward`` runs ``F.linear(x, W_U.T.contiguous(), b_U)``: with gemma-3-270m's
  262,144-token vocabulary that is a 640 MB copy per forward, more than half of a 15-token
  forward on CPU (the matrix product itself takes a third as long);
- ``GatedMLP.forward`` calls ``W.T.contiguous()`` on its three weight matrices;
- attention projects with ``einops.rearrange(W_Q, "h m d -> (h d) m")`` (a copy whenever there
  is more than one head) and ``rearrange(W_O, "h d m -> m (h d)").contiguous()``.

With few tokens (sampling, generation, ROME's value loop) these copies cost more than the
matrix products. :func:`install_fast_forward` replaces the ``forward`` of those modules, on one
model instance, by the same computation written against the weights as they are stored
(``x @ W``, a batched product over heads). Every hook point fires in the same order with the
same values up to float32 rounding (relative differences ~1e-7); activations keep their shapes
and layouts. It also stores ``W_U`` once in Hugging Face's memory order (each token's vector
contiguous; same values, shape and Parameter), which the vocabulary-sized product reads ~1.5x
faster; the parameter is then a non-contiguous view, so ``safetensors`` needs
``.contiguous()`` to save it (``torch.save`` and ``load_state_dict`` work as before).

Modules whose configuration uses a TransformerLens feature the fast forwards do not cover
(4-bit weights, per-head inputs, ALiBi, attention sinks, ...) keep TransformerLens's own
forward, and models without HookedTransformer components (a TransformerBridge, TransformerLens
4.x) are left alone.

Example:
    >>> from rome_lens.models.speed import install_fast_forward
    >>> installed = install_fast_forward(model)
    >>> installed  # doctest: +SKIP
    FastForward(mlp=18, attention=18, unembed=1)
    >>> install_fast_forward(model) == installed  # idempotent
    True

    (``load_model`` installs them; the counts above are gemma-3-270m's, a bridge gives zeros.)
"""

from __future__ import annotations

import dataclasses
import types
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import nn

_MARK = "_rome_lens_fast_forward"
# Architectures whose attention normalises Q/K across heads before the head split (a branch of
# TransformerLens's forward the fast attention does not reproduce).
_OLMO = ("OlmoeForCausalLM", "Olmo2ForCausalLM", "Olmo3ForCausalLM")


@dataclasses.dataclass(frozen=True)
class FastForward:
    """How many modules of a model run a copy-free forward.

    Attributes:
        mlp: gated MLPs.
        attention: attention blocks (plain or grouped-query).
        unembed: unembedding modules (0 or 1).
    """

    mlp: int = 0
    attention: int = 0
    unembed: int = 0

    @property
    def total(self) -> int:
        """All modules with a copy-free forward."""
        return self.mlp + self.attention + self.unembed


def install_fast_forward(model: nn.Module) -> FastForward:
    """Give the MLPs, attention blocks and unembedding of ``model`` copy-free forwards.

    Idempotent, and safe on any module: only TransformerLens 3.9 ``GatedMLP``, ``Attention``,
    ``GroupedQueryAttention`` and ``Unembed`` modules whose configuration the fast forwards
    cover are changed (see the module docstring); everything else keeps its forward.

    Args:
        model: a ``HookedTransformer`` (other modules are ignored).

    Returns:
        How many modules of each kind now use a copy-free forward.
    """
    try:
        from transformer_lens.components import (
            Attention,
            GroupedQueryAttention,
            Unembed,
        )
        from transformer_lens.components.mlps.gated_mlp import GatedMLP
    except ImportError:  # TransformerLens 4.x: no HookedTransformer components
        return FastForward()
    counts = {"mlp": 0, "attention": 0, "unembed": 0}
    module: Any
    for module in model.modules():
        kind = type(module)
        if kind is GatedMLP and not module.cfg.is_layer_norm_activation():
            counts["mlp"] += _install(module, _fast_gated_forward)
        elif kind in (Attention, GroupedQueryAttention) and _attention_is_covered(module):
            counts["attention"] += _install(module, _fast_attention_forward)
        elif kind is Unembed:
            _store_unembedding_by_token(module)
            counts["unembed"] += _install(module, _fast_unembed_forward)
    return FastForward(**counts)


def install_fast_mlp(model: nn.Module) -> int:
    """Give every TransformerLens ``GatedMLP`` of ``model`` a copy-free forward (idempotent).

    The MLP part of :func:`install_fast_forward`, kept for callers that want only that.

    Args:
        model: a ``HookedTransformer`` (other modules are ignored).

    Returns:
        How many MLP modules now use the copy-free forward.
    """
    try:
        from transformer_lens.components.mlps.gated_mlp import GatedMLP
    except ImportError:  # TransformerLens 4.x: no HookedTransformer components
        return 0
    return sum(
        _install(module, _fast_gated_forward)
        for module in model.modules()
        if type(module) is GatedMLP and not module.cfg.is_layer_norm_activation()
    )


def _install(module: nn.Module, forward: Any) -> int:
    """Bind ``forward`` as ``module``'s forward once; 1 (the module counts as installed)."""
    if getattr(module, _MARK, None) is not forward:
        module.forward = types.MethodType(forward, module)  # type: ignore[method-assign]
        setattr(module, _MARK, forward)
    return 1


def _store_unembedding_by_token(unembed: Any) -> None:
    """Store ``W_U`` [d_model, d_vocab] with each token's vector contiguous (once).

    The values, shape and Parameter object stay the same; only the memory order changes, to
    Hugging Face's ``lm_head`` layout ([d_vocab, d_model] row-major, seen transposed). A
    matrix product of a few rows by the unembedding is memory-bound, and BLAS reads it ~1.5x
    faster in this order (gemma-3-270m, one thread: 170 ms instead of 265 ms for 15 tokens);
    ``x @ W_U`` anywhere (rome_lens's own logits) gains too.
    """
    weight = unembed.W_U
    if weight.dim() != 2 or weight.stride() == (1, weight.shape[0]):
        return
    with torch.no_grad():
        weight.data = weight.detach().T.contiguous().T


def _attention_is_covered(module: Any) -> bool:
    """Whether the fast attention forward computes exactly what ``module.forward`` does."""
    cfg = module.cfg
    return bool(
        not cfg.load_in_4bit
        and not cfg.use_attn_result
        and not cfg.use_split_qkv_input
        and not cfg.use_attn_in
        and not cfg.ungroup_grouped_query_attention
        and cfg.original_architecture not in _OLMO
        and getattr(cfg, "clip_qkv", None) is None
        and cfg.positional_embedding_type in ("standard", "rotary", "shortformer")
        and not getattr(cfg, "use_logn_attn", False)
        and not getattr(cfg, "use_attention_sinks", False)
    )


def _fast_gated_forward(
    self: Any, x: Float[torch.Tensor, "batch pos d_model"]
) -> Float[torch.Tensor, "batch pos d_model"]:
    if self.W_gate.device != x.device:
        x = x.to(self.W_gate.device)
    pre_act = self.hook_pre(x @ self.W_gate)
    pre_linear = self.hook_pre_linear(x @ self.W_in)
    post_act = self.hook_post(self.act_fn(pre_act) * pre_linear + self.b_in)
    return post_act @ self.W_out + self.b_out


def _fast_unembed_forward(
    self: Any, residual: Float[torch.Tensor, "batch pos d_model"]
) -> Float[torch.Tensor, "batch pos d_vocab_out"]:
    residual = self.hook_in(residual)
    # F.linear multiplies by weight.T: the view W_U.T reaches the matrix product as stored
    # (a contiguous [d_vocab, d_model] after _store_unembedding_by_token), instead of
    # TransformerLens's W_U.T.contiguous(), a 640 MB copy per call on gemma-3-270m.
    return self.hook_out(F.linear(residual, self.W_U.T, self.b_U))


def _project_heads(
    x: Float[torch.Tensor, "batch pos d_model"],
    w: Float[torch.Tensor, "head d_model d_head"],
    b: Float[torch.Tensor, "head d_head"],
) -> Float[torch.Tensor, "batch pos head d_head"]:
    """``x @ w[h] + b[h]`` for every head, with the weight as stored (no re-layout copy)."""
    if x.device != w.device:
        x = x.to(w.device)
    batch, pos, d_model = x.shape
    heads, _, d_head = w.shape
    rows = x.reshape(1, batch * pos, d_model).expand(heads, -1, -1)
    out = torch.baddbmm(b[:, None, :], rows, w)  # [head, batch * pos, d_head]
    # The same contiguous [batch, pos, head, d_head] layout as TransformerLens's projection,
    # for hooks that reshape their activation (an activation copy, not a weight copy).
    return out.view(heads, batch, pos, d_head).permute(1, 2, 0, 3).contiguous()


def _fast_attention_forward(
    self: Any,
    query_input: Float[torch.Tensor, "batch pos d_model"],
    key_input: Float[torch.Tensor, "batch kv_pos d_model"],
    value_input: Float[torch.Tensor, "batch kv_pos d_model"],
    past_kv_cache_entry: Any | None = None,
    additive_attention_mask: Float[torch.Tensor, "batch 1 1 kv_pos"] | None = None,
    attention_mask: Int[torch.Tensor, "batch offset_pos"] | None = None,
    position_bias: Float[torch.Tensor, "1 head pos kv_pos"] | None = None,
) -> Float[torch.Tensor, "batch pos d_model"]:
    # TransformerLens 3.9's AbstractAttention.forward for the configurations that
    # _attention_is_covered admits, with copy-free projections; the helpers it calls (rotary,
    # scores, causal mask, z) are TransformerLens's own. position_bias only matters for
    # relative positional bias, which is not covered. The configuration can change after
    # installing (HookedTransformer.set_use_attn_result and the like): then TransformerLens's
    # forward runs.
    if not _attention_is_covered(self):  # e.g. set_use_attn_result(True) after installing
        return type(self).forward(  # type: ignore[no-any-return]
            self, query_input, key_input, value_input, past_kv_cache_entry,
            additive_attention_mask, attention_mask, position_bias,
        )
    grouped = hasattr(self, "_W_K")  # GroupedQueryAttention: K and V have fewer heads
    w_k, b_k = (self._W_K, self._b_K) if grouped else (self.W_K, self.b_K)
    w_v, b_v = (self._W_V, self._b_V) if grouped else (self.W_V, self.b_V)
    q = self.hook_q(_project_heads(query_input, self.W_Q, self.b_Q))
    k = self.hook_k(_project_heads(key_input, w_k, b_k))
    v = self.hook_v(_project_heads(value_input, w_v, b_v))
    if self.cfg.use_qk_norm:
        q = self._apply_qk_norm(q, self.q_norm)
        k = self._apply_qk_norm(k, self.k_norm)

    if past_kv_cache_entry is not None:
        offset = past_kv_cache_entry.past_keys.size(1)
        k, v = past_kv_cache_entry.append(k, v)
    else:
        offset = 0
    if self.cfg.positional_embedding_type == "rotary":
        q = self.hook_rot_q(self.apply_rotary(q, offset, attention_mask))
        k = self.hook_rot_k(self.apply_rotary(k, 0, attention_mask))  # keys are cached rotated

    attn_scores = self.calculate_attention_scores(q, k)
    if (getattr(self, "_attention_dir_override", None) or self.cfg.attention_dir) == "causal":
        attn_scores = self.apply_causal_mask(attn_scores, offset, attention_mask)
    if additive_attention_mask is not None:
        attn_scores += additive_attention_mask
    attn_scores = self.hook_attn_scores(attn_scores)
    pattern = F.softmax(attn_scores, dim=-1)
    pattern = torch.where(torch.isnan(pattern), torch.zeros_like(pattern), pattern)
    pattern = self.hook_pattern(pattern)
    pattern = pattern.to(device=v.device, dtype=v.dtype)
    z = self.calculate_z_scores(v, pattern)  # [batch, pos, head, d_head]; fires hook_z

    heads, d_head, d_model = self.W_O.shape
    # W_O is stored [head, d_head, d_model]: flattening the first two axes is a view, and
    # F.linear of its transpose view multiplies by it without the re-layout copy.
    w_o = self.W_O.reshape(heads * d_head, d_model)
    b_o = self.b_O
    if w_o.device != z.device:
        w_o, b_o = w_o.to(z.device), b_o.to(z.device)
    if z.dtype != w_o.dtype:
        z = z.to(w_o.dtype)
    z = z.reshape(z.shape[0], z.shape[1], heads * d_head)
    return F.linear(z, w_o.T, b_o)
