"""Model adapters: the right adapter per model API, and the facade computes what it did before.

``rome_lens.models.access`` delegates to one adapter per model API
(``rome_lens.models.adapters``). These tests pin the choice of adapter for each kind of tiny
model, check facade results against direct model calls (the computations the facade made
before the adapters existed) and the model's own logits, and check that no module outside
``rome_lens/models/`` branches on the model API.
"""

from __future__ import annotations

import gc
import re
import weakref
from pathlib import Path

import pytest
import torch
from tiny import HAS_HOOKED, tiny_model

import rome_lens
from rome_lens._typing import Model as HookedTransformer
from rome_lens.models import access
from rome_lens.models.adapters import (
    ADAPTERS,
    BridgeAdapter,
    HookedAdapter,
    ModelAdapter,
    adapter_for,
)

PROMPT = "The big cat sat on the mat"

# The facade's public names: other modules and the tests call these, so none may go.
FACADE = {
    "is_bridge", "api_name", "weight_space", "n_layers", "check_layer", "key_hook_name",
    "resid_pre_hook_name", "resid_post_hook_name", "mlp_out_hook_name", "attn_out_hook_name",
    "embedding_matrix", "mlp_out_parameter", "mlp_out_weight", "read_mlp_out", "write_mlp_out",
    "mlp_out_weight_name", "layer_of_weight_name", "mlp_out_bias", "mlp_value",
    "raw_mlp_output_hook", "to_tokens", "check_fits", "residual_before", "FrozenPrefix",
    "supports_frozen_prefix", "run_prefix", "final_residual", "run_with_states",
    "run_blocks_from", "decode_residual", "IncrementalDecoder", "weights_fingerprint",
    "parameters_checksum", "model_label", "EMBED_HOOK", "run_with_keys_values",
    "frozen_prefix_from", "KeyValueRecord",
}


def _kind(request: pytest.FixtureRequest) -> str:
    return str(request.node.callspec.params["model"])


def test_adapter_per_model_kind(model: HookedTransformer, request: pytest.FixtureRequest) -> None:
    adapter = adapter_for(model)
    assert isinstance(adapter, ModelAdapter)
    if _kind(request) == "bridge":
        assert isinstance(adapter, BridgeAdapter)
        assert access.api_name(model) == "bridge" and access.is_bridge(model)
        assert access.weight_space(model) == "bridge-raw"
        assert not access.supports_frozen_prefix(model)
    else:
        assert isinstance(adapter, HookedAdapter)
        assert access.api_name(model) == "hooked" and not access.is_bridge(model)
        assert access.weight_space(model) == "hooked"
        assert access.supports_frozen_prefix(model)
    assert adapter_for(model) is adapter  # chosen once per model
    assert adapter in ADAPTERS and vars(adapter) == {}  # stateless: holds no model


def test_adapter_cache_does_not_keep_models_alive() -> None:
    model = tiny_model("bridge", n_layers=1)
    adapter_for(model)
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None


def test_facade_keeps_every_public_name() -> None:
    assert FACADE <= set(access.__all__)
    assert all(hasattr(access, name) for name in access.__all__)


def test_read_write_round_trip(model: HookedTransformer) -> None:
    before = access.parameters_checksum(model)
    w = access.read_mlp_out(model, 1).clone()
    assert w.shape == (model.cfg.d_mlp, model.cfg.d_model)
    name, param, transposed = access.mlp_out_parameter(model, 1)
    assert param.shape == (w.T.shape if transposed else w.shape)
    access.write_mlp_out(model, 1, w + 1.0)
    assert torch.equal(access.read_mlp_out(model, 1), w + 1.0)
    assert dict(model.named_parameters())[name] is param
    access.write_mlp_out(model, 1, w)
    assert access.parameters_checksum(model) == before
    keys = torch.randn(2, model.cfg.d_mlp)
    bias = access.mlp_out_bias(model, 1)
    expected = keys @ w + bias if bias is not None else keys @ w
    assert torch.equal(access.mlp_value(model, 1, keys), expected)


def test_decode_residual_matches_the_models_logits(model: HookedTransformer) -> None:
    tokens = model.to_tokens(PROMPT)
    with torch.no_grad():
        logits = model(tokens)
        final = access.final_residual(model, tokens)
        torch.testing.assert_close(access.decode_residual(model, final), logits)
        torch.testing.assert_close(access.decode_residual(model, final[0]), logits[0])
        step = access.IncrementalDecoder(model, 1)
        torch.testing.assert_close(step(tokens), logits[:, -1])


def test_hooked_facade_is_the_direct_model_call(
    model: HookedTransformer, request: pytest.FixtureRequest
) -> None:
    """On a HookedTransformer the facade makes the same calls as before: bit-identical."""
    if _kind(request) == "bridge":
        pytest.skip("HookedTransformer calls")
    tokens = model.to_tokens(PROMPT)
    n = model.cfg.n_layers
    with torch.no_grad():
        assert torch.equal(access.final_residual(model, tokens), model(tokens, stop_at_layer=n))
        resid = access.residual_before(model, tokens, 1)
        assert torch.equal(resid, model(tokens, stop_at_layer=1))
        assert torch.equal(
            access.run_blocks_from(model, resid, 1),
            model(resid, start_at_layer=1, stop_at_layer=n),
        )
        name = access.key_hook_name(0)
        out, states = access.run_with_states(model, tokens, [name])
        _, cache = model.run_with_cache(tokens, names_filter=name)
        assert torch.equal(states[name], cache[name])
        assert torch.equal(out, model(tokens, stop_at_layer=n))


def test_run_blocks_from_equals_a_full_forward(model: HookedTransformer) -> None:
    tokens = model.to_tokens(PROMPT)
    with torch.no_grad():
        full = access.final_residual(model, tokens)
        for layer in range(model.cfg.n_layers):
            resid = access.residual_before(model, tokens, layer)
            torch.testing.assert_close(access.run_blocks_from(model, resid, layer), full)


def test_frozen_prefix_equals_a_full_forward(model: HookedTransformer) -> None:
    tokens = model.to_tokens(PROMPT)
    k = 5
    head, tail = tokens[:, :k], tokens[:, k:]
    if not access.supports_frozen_prefix(model):
        with pytest.raises(TypeError, match="no TransformerLens key-value cache"):
            access.run_prefix(model, head, torch.ones_like(head))
        with pytest.raises(TypeError, match="no TransformerLens key-value cache"):
            access.run_with_keys_values(model, tokens, [])
        return
    with torch.no_grad():
        full = access.final_residual(model, tokens)
        prefix = access.run_prefix(model, head, torch.ones_like(head))
        assert repr(prefix) == f"FrozenPrefix(rows=1, positions={k})"
        resid = access.residual_before(
            model, tail, 1, prefix=prefix, attention_mask=torch.ones_like(tail)
        )
        out = access.run_blocks_from(
            model, resid, 1, prefix=prefix, attention_mask=torch.ones_like(tokens)
        )
    torch.testing.assert_close(out, full[:, k:])


def test_recorded_keys_values_continue_any_rows(model: HookedTransformer) -> None:
    if not access.supports_frozen_prefix(model):
        pytest.skip("no key-value cache on this model API")
    tokens = torch.cat([model.to_tokens(PROMPT), model.to_tokens("A red dog ran to the sea!!")])
    k, layer = 4, 2
    name = access.resid_pre_hook_name(layer)
    with torch.no_grad():
        full, states, record = access.run_with_keys_values(model, tokens, [name])
        assert torch.equal(full, access.final_residual(model, tokens))
        assert len(record.keys) == model.cfg.n_layers and record.n_rows == 2
        assert repr(record) == f"KeyValueRecord(layers={model.cfg.n_layers}, rows=2, " \
            f"positions={tokens.shape[1]})"
        rows = torch.tensor([1, 0, 1])  # any rows, repeats allowed
        prefix = access.frozen_prefix_from(model, record, k, rows)
        assert (prefix.n_rows, prefix.width) == (3, k)
        out = access.run_blocks_from(
            model, states[name][rows, k:], layer, prefix=prefix,
            attention_mask=torch.ones(3, tokens.shape[1], dtype=torch.int),
        )
    torch.testing.assert_close(out, full[rows, k:])


def test_bridge_refuses_prefixes(model: HookedTransformer, request: pytest.FixtureRequest) -> None:
    if _kind(request) != "bridge":
        pytest.skip("bridge only")
    if not HAS_HOOKED:
        pytest.skip("no HookedTransformer to make a prefix with")
    hooked = tiny_model("gemma")
    tokens = model.to_tokens(PROMPT)
    prefix = access.run_prefix(hooked, tokens[:, :3], torch.ones_like(tokens[:, :3]))
    with pytest.raises(TypeError, match="TransformerBridge has no TransformerLens key-value"):
        access.residual_before(model, tokens, 1, prefix=prefix)
    with pytest.raises(TypeError, match="TransformerBridge has no TransformerLens key-value"):
        access.run_blocks_from(model, torch.zeros(1, 3, model.cfg.d_model), 1, prefix=prefix)


_EXCLUDED = ("models",)
# code that tests or builds a model API (docstrings may name the APIs)
_API_NAMES = re.compile(r"is_bridge\(|TransformerLensKeyValueCache|"
                        r"import .*(?:TransformerBridge|HookedTransformer)|"
                        r"isinstance\([^)]*(?:TransformerBridge|HookedTransformer)")


def test_only_rome_lens_models_knows_the_model_api() -> None:
    package = Path(rome_lens.__file__).parent
    offenders = []
    for path in sorted(package.rglob("*.py")):
        relative = path.relative_to(package)
        if relative.parts[0] in _EXCLUDED:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            names = set(_API_NAMES.findall(line))
            if relative.as_posix() == "_typing.py":  # the type checker's name for a model
                names = {n for n in names if "import" not in n}
            if names:
                offenders.append(f"{relative}:{number}: {sorted(names)}")
    assert not offenders, "outside rome_lens/models/:\n" + "\n".join(offenders)
