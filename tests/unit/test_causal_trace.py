"""Causal tracing on tiny random models: batched == reference, and the trace's invariants."""

from __future__ import annotations

import pytest
import torch

import rome_lens
from rome_lens._typing import Model as HookedTransformer
from rome_lens.models import access
from rome_lens.tracing import causal_trace, embedding_std, restored_probability

PROMPT = "The big cat sat on the mat"
SUBJECT = "big cat"


def test_batched_equals_reference(model: HookedTransformer) -> None:
    kw = dict(samples=3, window=2, seed=1)
    fast = causal_trace(model, PROMPT, SUBJECT, **kw)
    slow = causal_trace(model, PROMPT, SUBJECT, method="reference", **kw)
    assert fast.p_corrupted == pytest.approx(slow.p_corrupted, abs=1e-6)
    for kind in ("resid", "mlp", "attn"):
        assert fast.scores[kind].shape == (model.cfg.n_layers, len(fast.tokens))
        assert (fast.scores[kind] - slow.scores[kind]).abs().max() < 1e-5


def test_last_layer_last_token_restores_clean(model: HookedTransformer) -> None:
    trace = causal_trace(model, PROMPT, SUBJECT, kinds=("resid",), samples=4)
    assert trace.p_clean != pytest.approx(trace.p_corrupted, abs=1e-4)
    assert float(trace.scores["resid"][-1, -1]) == pytest.approx(trace.p_clean, abs=1e-5)


def test_restoring_non_subject_input_changes_nothing(model: HookedTransformer) -> None:
    p_clean, p_corrupt, p_restored = restored_probability(
        model, PROMPT, SUBJECT, [("blocks.0.hook_resid_pre", 1)], samples=4
    )
    assert p_restored == pytest.approx(p_corrupt, abs=1e-6)
    # while restoring the subject's inputs undoes the corruption completely
    tokens, (start, end) = rome_lens.subject_token_span(model, PROMPT, SUBJECT)
    restore = [("blocks.0.hook_resid_pre", pos) for pos in range(start, end)]
    _, _, p_all = restored_probability(model, PROMPT, SUBJECT, restore, samples=4)
    assert p_all == pytest.approx(p_clean, abs=1e-5)


def test_noise_touches_only_subject_positions(model: HookedTransformer) -> None:
    seen: list[torch.Tensor] = []

    def record(act: torch.Tensor, hook: object) -> None:
        seen.append(act.detach().clone())

    # The clean run has batch 1; the corrupted run has a batch of `samples`.
    with model.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", record)]):
        trace = causal_trace(model, PROMPT, SUBJECT, kinds=(), samples=3, noise=1.0)
    clean = seen[0][0]
    corrupted = next(a for a in seen if a.shape[0] == 3)
    start, end = trace.subject_span
    diff = (corrupted - clean).abs().amax(-1)  # [samples, pos]
    assert (diff[:, start:end] > 0.1).all()
    mask = torch.ones(diff.shape[1], dtype=torch.bool)
    mask[start:end] = False
    assert (diff[:, mask] == 0).all()


def test_default_noise_is_three_embedding_stds(model: HookedTransformer) -> None:
    trace = causal_trace(model, PROMPT, SUBJECT, kinds=(), samples=2)
    emb = access.embedding_matrix(model)
    assert trace.noise_std == pytest.approx(3 * float(emb.std()), rel=1e-3)
    assert embedding_std(model) == pytest.approx(float(emb.std()), rel=1e-3)


def test_embedding_matrix_rows_are_what_hook_embed_emits(model: HookedTransformer) -> None:
    """On a Gemma bridge hook_embed fires after the sqrt(d_model) scale; the matrix includes it."""
    tokens = model.to_tokens(PROMPT)
    _, states = access.run_with_states(model, tokens, [access.EMBED_HOOK])
    torch.testing.assert_close(states[access.EMBED_HOOK][0],
                               access.embedding_matrix(model)[tokens[0]].detach())


def test_result_value(model: HookedTransformer, tmp_path) -> None:
    trace = causal_trace(model, PROMPT, SUBJECT, samples=2, window=2)
    ie = trace.indirect_effect("mlp")
    assert torch.allclose(ie, trace.scores["mlp"] - trace.p_corrupted)
    assert 0 <= trace.best_layer("mlp") < model.cfg.n_layers
    df = trace.to_dataframe()
    assert len(df) == 3 * model.cfg.n_layers * len(trace.tokens)
    n_subject = trace.subject_span[1] - trace.subject_span[0]
    assert n_subject == len(SUBJECT)  # character-level tokenizer
    assert df["is_subject"].sum() == 3 * model.cfg.n_layers * n_subject
    fig = trace.plot(str(tmp_path / "trace.png"))
    assert (tmp_path / "trace.png").stat().st_size > 1000
    assert len(fig.axes) == 6  # three heatmaps + three colorbars


def test_bad_inputs(model: HookedTransformer) -> None:
    with pytest.raises(rome_lens.SubjectNotFoundError):
        causal_trace(model, PROMPT, "dog")
    with pytest.raises(rome_lens.InvalidRequestError):
        causal_trace(model, PROMPT, SUBJECT, kinds=("mlp", "bogus"))
    with pytest.raises(rome_lens.InvalidRequestError):
        causal_trace(model, PROMPT, SUBJECT, samples=0)


def test_activation_patch_batched_equals_reference(model: HookedTransformer) -> None:
    from rome_lens.tracing import activation_patch

    clean, corrupt = "The big cat sat", "The red dog sat"
    fast = activation_patch(model, clean, corrupt, window=2)
    slow = activation_patch(model, clean, corrupt, window=2, method="reference")
    assert fast.subject_span == (5, 12)  # "big cat" vs "red dog" after BOS + "The "
    for kind in ("resid", "mlp", "attn"):
        assert (fast.scores[kind] - slow.scores[kind]).abs().max() < 1e-5
    # patching the whole last-layer residual at the last token recovers the clean run
    assert float(fast.scores["resid"][-1, -1]) == pytest.approx(fast.p_clean, abs=1e-5)
    # patching a position where the prompts agree, at layer 0's output, changes nothing
    assert float(fast.scores["resid"][0, 1]) == pytest.approx(fast.p_corrupted, abs=1e-6)


def test_activation_patch_needs_equal_lengths(model: HookedTransformer) -> None:
    from rome_lens.tracing import activation_patch

    with pytest.raises(rome_lens.InvalidRequestError, match="same number of tokens"):
        activation_patch(model, "The big cat sat", "The dog sat")


def test_result_repr_is_short_and_has_no_tensors(model: HookedTransformer) -> None:
    trace = causal_trace(model, PROMPT, SUBJECT, kinds=("resid", "mlp"), samples=2, window=2)
    text = repr(trace)
    assert text.startswith("CausalTraceResult(")
    for part in (repr(PROMPT), repr(SUBJECT), repr(trace.answer), f"{trace.p_clean:.4g}",
                 f"{trace.p_corrupted:.4g}", "('resid', 'mlp')",
                 f"{model.cfg.n_layers} layers x {len(trace.tokens)} tokens", "'batched'"
                 if access.supports_frozen_prefix(model) else "'reference'"):
        assert part in text
    assert "tensor" not in text and len(text) < 400
    assert "corrupt_prompt" not in text


def test_patch_repr_names_the_corrupt_prompt(model: HookedTransformer) -> None:
    from rome_lens.tracing import activation_patch

    res = activation_patch(model, "The big cat sat", "The red dog sat", kinds=("resid",))
    assert "corrupt_prompt='The red dog sat'" in repr(res) and "tensor" not in repr(res)
