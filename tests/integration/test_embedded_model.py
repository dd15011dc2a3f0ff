"""Integration tests on the embedded google/gemma-3-270m (real weights, offline)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import rome_lens
from rome_lens._typing import Model as HookedTransformer
from rome_lens.models import access
from rome_lens.models.loading import embedded_gguf_path
from rome_lens.predict import top_tokens

pytestmark = pytest.mark.integration


def top1(model: HookedTransformer, prompt: str) -> str:
    return top_tokens(model, prompt, 1)[0][0]


def test_logits_match_transformers(gemma: HookedTransformer) -> None:
    from transformers import AutoModelForCausalLM

    path = embedded_gguf_path()
    hf = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )
    hf.eval()
    tokens = gemma.to_tokens("The Eiffel Tower is located in the city of")
    with torch.no_grad():
        ours = gemma(tokens)
        theirs = hf(tokens).logits
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() < 1e-3
    assert ours[0, -1].argmax() == theirs[0, -1].argmax()


def test_cached_model_is_identical(gemma: HookedTransformer) -> None:
    again = rome_lens.load_model()
    assert access.parameters_checksum(again) == access.parameters_checksum(gemma)


def test_unedited_knows_the_facts(gemma: HookedTransformer) -> None:
    assert top1(gemma, "The Eiffel Tower is located in the city of") == " Paris"
    assert top1(gemma, "The Colosseum is located in the city of") == " Rome"
    assert top1(gemma, "Steve Jobs was the founder of") == " Apple"


@pytest.mark.parametrize("precision", ["float32", "default"])
def test_eiffel_tower_to_rome(
    gemma: HookedTransformer, eiffel_edit: rome_lens.RomeEdit, precision: str
) -> None:
    """The float32 edit and the default one (bfloat16 value loop where the CPU has it)."""
    checksum = access.parameters_checksum(gemma)
    neighbours = {
        p: top1(gemma, p)
        for p in ("The Colosseum is located in the city of", "Steve Jobs was the founder of")
    }
    edit = eiffel_edit if precision == "float32" else rome_lens.compute_rome(
        gemma, rome_lens.EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome")
    )
    assert access.parameters_checksum(gemma) == checksum  # computing does not edit
    assert edit.hparams["z_precision"] == (
        "float32" if precision == "float32" else rome_lens.default_hparams(gemma).z_precision
    )
    assert edit.layer == rome_lens.default_hparams(gemma).layer
    with edit.applied(gemma):
        assert top1(gemma, "The Eiffel Tower is located in the city of") == " Rome"
        assert top1(gemma, "The Eiffel Tower can be found in the city of") == " Rome"
        for prompt, answer in neighbours.items():
            assert top1(gemma, prompt) == answer, prompt
    assert access.parameters_checksum(gemma) == checksum


def test_edit_is_rank_one_and_maps_key_to_value(
    gemma: HookedTransformer, eiffel_edit: rome_lens.RomeEdit
) -> None:
    layer = eiffel_edit.layer
    original = access.mlp_out_weight(gemma, layer).detach().clone()
    with eiffel_edit.applied(gemma):
        diff = access.mlp_out_weight(gemma, layer).detach() - original
        s = torch.linalg.svdvals(diff)
        assert s[1] / s[0] < 1e-4
        mapped = access.mlp_value(gemma, layer, eiffel_edit.k_star)
        assert torch.allclose(mapped, eiffel_edit.v_star, atol=1e-3 * eiffel_edit.v_star.norm())
    assert torch.equal(access.mlp_out_weight(gemma, layer).detach(), original)


def test_save_load_apply(
    gemma: HookedTransformer, eiffel_edit: rome_lens.RomeEdit, tmp_path: Path
) -> None:
    path = eiffel_edit.save(tmp_path / "eiffel")
    loaded = rome_lens.load_edit(path, model=gemma)
    assert loaded.id == eiffel_edit.id
    with loaded.applied(gemma):
        assert top1(gemma, "The Eiffel Tower is located in the city of") == " Rome"


def test_second_edit_reuses_the_base_model_statistics(
    gemma: HookedTransformer, eiffel_edit: rome_lens.Edit, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a ROME edit applied, a second edit samples no corpus and recomputes no statistics."""
    import rome_lens.statistics.contexts as contexts
    import rome_lens.statistics.corpus as corpus
    import rome_lens.statistics.moments as moments

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("base-model statistics recomputed under an applied edit")

    monkeypatch.setattr(corpus, "_sample_corpus", forbidden)
    monkeypatch.setattr(moments, "_accumulate", forbidden)
    monkeypatch.setattr(contexts, "_sample_templates", forbidden)
    request = rome_lens.EditRequest("{} was the founder of", "Steve Jobs", "Microsoft", "Apple")
    with eiffel_edit.applied(gemma):
        second = rome_lens.compute_edit(gemma, request)
        assert second.parents == (eiffel_edit.id,)
        assert second.base_fingerprint == eiffel_edit.base_fingerprint
        with second.applied(gemma):
            assert top1(gemma, "Steve Jobs was the founder of") == " Microsoft"
            assert top1(gemma, "The Eiffel Tower is located in the city of") == " Rome"
