"""The copy-free forwards give the same values, hooks and gradients as TransformerLens's own."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

import rome_lens
from rome_lens.models import access
from rome_lens.models.speed import FastForward, install_fast_forward, install_fast_mlp
from tests.tiny import HAS_HOOKED, char_tokenizer, tiny_bridge, tiny_model

needs_hooked = pytest.mark.skipif(
    not HAS_HOOKED, reason="TransformerLens 4.x: no HookedTransformer to speed up"
)
TOL = {"rtol": 1e-5, "atol": 1e-5}


def tiny_gemma3(seed: int = 5, n_layers: int = 3) -> Any:
    """A tiny Gemma-3-like HookedTransformer: grouped-query attention (4 query heads, 2 key/value
    heads), QK norm, local/global layers with a short window, and every bias non-zero."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    tok = char_tokenizer()
    cfg = HookedTransformerConfig(
        n_layers=n_layers, d_model=32, d_head=8, n_heads=4, n_key_value_heads=2, d_mlp=64,
        n_ctx=128, d_vocab=len(tok.get_vocab()), seed=seed, default_prepend_bos=True,
        act_fn="gelu_pytorch_tanh", normalization_type="RMS", gated_mlp=True,
        positional_embedding_type="rotary", rotary_dim=8, rotary_base=10000,
        rotary_base_local=100, use_normalization_before_and_after=True, final_rms=True,
        use_qk_norm=True, use_local_attn=True, window_size=4,
        attn_types=(["local", "global"] * n_layers)[:n_layers],
    )
    torch.manual_seed(seed)
    model = HookedTransformer(cfg, tokenizer=tok)
    with torch.no_grad():  # biases and norms away from their init, so they matter here
        for name, param in model.named_parameters():
            if name.split(".")[-1].lstrip("_").startswith("b_") or name.endswith(".w"):
                param.normal_(0.0, 0.3)
    return model.eval()


def _run_all_hooks(model: Any, tokens: torch.Tensor, **kwargs: Any) -> tuple[Any, Any]:
    with torch.no_grad():
        return model.run_with_cache(tokens, **kwargs)


def _assert_same_run(model: Any, reference: Any, tokens: torch.Tensor, **kwargs: Any) -> None:
    logits, cache = _run_all_hooks(model, tokens, **kwargs)
    ref_logits, ref_cache = _run_all_hooks(reference, tokens, **kwargs)
    torch.testing.assert_close(logits, ref_logits, **TOL)
    assert sorted(cache.keys()) == sorted(ref_cache.keys())  # every hook point fired
    for name in ref_cache.keys():
        torch.testing.assert_close(cache[name], ref_cache[name], **TOL, msg=name)
        assert cache[name].is_contiguous() == ref_cache[name].is_contiguous(), name


@needs_hooked
@pytest.mark.parametrize("kind", ["gemma3", "gemma", "gpt2"])
def test_fast_forward_matches_transformerlens_values_and_hooks(kind: str) -> None:
    model = tiny_gemma3() if kind == "gemma3" else tiny_model(kind, seed=3)
    reference = copy.deepcopy(model)
    w_u = model.unembed.W_U
    before = (access.weights_fingerprint(model), access.parameters_checksum(model))
    installed = install_fast_forward(model)
    # W_U is the same Parameter with the same values, stored token by token.
    assert model.unembed.W_U is w_u and w_u.stride() == (1, model.cfg.d_model)
    assert (access.weights_fingerprint(model), access.parameters_checksum(model)) == before
    n_layers = model.cfg.n_layers
    expected_mlp = n_layers if kind != "gpt2" else 0  # GPT-2's MLP is not gated
    assert installed == FastForward(mlp=expected_mlp, attention=n_layers, unembed=1)
    assert install_fast_forward(model) == installed  # idempotent
    forwards = [m.forward for m in model.modules() if "forward" in m.__dict__]
    install_fast_forward(model)
    assert [m.forward for m in model.modules() if "forward" in m.__dict__] == forwards

    single = model.to_tokens("The Eiffel Tower is in Paris")
    _assert_same_run(model, reference, single)
    # Two prompts of different lengths, left-padded: an explicit attention mask reaches the
    # attention (rotary positions and padding masks), and the local window (4) is exceeded.
    batch = model.to_tokens(["The Eiffel Tower is in Paris", "Rome"], padding_side="left")
    _assert_same_run(model, reference, batch, padding_side="left")


@needs_hooked
def test_fast_forward_gradients_match() -> None:
    model = tiny_gemma3(seed=7)
    reference = copy.deepcopy(model)
    install_fast_forward(model)
    tokens = model.to_tokens("Gradients reach every weight")
    model(tokens, return_type="loss").backward()
    reference(tokens, return_type="loss").backward()
    for (name, param), ref in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert (param.grad is None) == (ref.grad is None), name
        if ref.grad is not None:
            torch.testing.assert_close(param.grad, ref.grad, rtol=1e-4, atol=1e-5, msg=name)


@needs_hooked
def test_fast_forward_with_key_value_cache() -> None:
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

    model = tiny_gemma3(seed=11)
    reference = copy.deepcopy(model)
    install_fast_forward(model)
    tokens = model.to_tokens("Keys and values cached: 1, 2, 3, 4, 5")
    outputs = []
    for m in (model, reference):
        cache = TransformerLensKeyValueCache.init_cache(m.cfg, m.cfg.device, 1)
        with torch.no_grad():
            first = m(tokens[:, :-3], past_kv_cache=cache)
            rest = m(tokens[:, -3:], past_kv_cache=cache)
        outputs.append(torch.cat([first, rest], dim=1))
    torch.testing.assert_close(outputs[0], outputs[1], **TOL)


@needs_hooked
def test_rome_edit_is_the_same_with_fast_forward(
    hparams: rome_lens.RomeHyperParams, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ROME_LENS_CACHE", str(tmp_path))
    model = tiny_gemma3(seed=2)
    reference = copy.deepcopy(model)
    install_fast_forward(model)
    request = rome_lens.EditRequest("{} is in the city of", "The big cat", "Rome")
    stats = rome_lens.second_moment(reference, 1, hparams=hparams)
    fast = rome_lens.compute_rome(model, request, hparams=hparams, stats=stats)
    plain = rome_lens.compute_rome(reference, request, hparams=hparams, stats=stats)
    assert fast.info["loop"] == plain.info["loop"] == "prefix_cache"
    torch.testing.assert_close(fast.k_star, plain.k_star, **TOL)
    # The first steps agree to float32 rounding; later ones drift apart on this random model,
    # whose loss barely moves: Adam normalises each gradient component, so rounding-level
    # differences in components near zero become step-sized ones.
    torch.testing.assert_close(
        torch.tensor(fast.info["losses"][:3]), torch.tensor(plain.info["losses"][:3]), rtol=1e-4,
        atol=0.0,
    )


@needs_hooked
def test_uncovered_attention_keeps_transformerlens_forward() -> None:
    model = tiny_model("gpt2")
    model.cfg.use_attn_result = True  # the per-head result path (hook_result) is not covered
    assert install_fast_forward(model) == FastForward(mlp=0, attention=0, unembed=1)
    assert "forward" not in model.blocks[0].attn.__dict__


@needs_hooked
def test_configuration_changed_after_installing_falls_back() -> None:
    model = tiny_gemma3(seed=6)
    reference = copy.deepcopy(model)
    install_fast_forward(model)
    for m in (model, reference):
        m.set_use_attn_result(True)  # hook_result must fire, per head
    _assert_same_run(model, reference, model.to_tokens("Per-head results"))


@needs_hooked
def test_fast_mlp_alone() -> None:
    model = tiny_model("gemma", seed=3)
    assert install_fast_mlp(model) == model.cfg.n_layers
    assert install_fast_mlp(model) == model.cfg.n_layers  # idempotent
    assert "forward" not in model.unembed.__dict__
    assert install_fast_forward(model).mlp == model.cfg.n_layers  # and compatible with it
    assert install_fast_mlp(tiny_model("gpt2")) == 0


def test_bridge_is_left_alone() -> None:
    bridge = tiny_bridge()
    assert install_fast_forward(bridge) == FastForward()
    assert install_fast_mlp(bridge) == 0
    assert all("forward" not in m.__dict__ for m in bridge.modules())


@needs_hooked
def test_state_dict_round_trip_after_fast_forward() -> None:
    model = tiny_gemma3(seed=4)
    install_fast_forward(model)
    other = tiny_gemma3(seed=9)
    install_fast_forward(other)
    other.load_state_dict(model.state_dict())  # copies values into the re-laid-out W_U
    tokens = model.to_tokens("Same weights, same logits")
    with torch.no_grad():
        torch.testing.assert_close(other(tokens), model(tokens), rtol=0.0, atol=0.0)
