"""The model families a local checkpoint may belong to, as one table.

Each :class:`Family` names how the family is spelled in a Hugging Face ``config.json``
(``model_type``), in a GGUF file (``general.architecture``), in TransformerLens
(``original_architecture`` and its weight converter), and how to derive a
``HookedTransformerConfig`` from the transformers config (:mod:`.configs`). Supporting a new
family means one new row here and one derivation function there.

Example:
    >>> from rome_lens.models.local.families import family_of
    >>> family_of(model_type="qwen2").name
    'Qwen 2 / 2.5'
    >>> family_of(gguf_architecture="gemma3").tl_architecture
    'Gemma3ForCausalLM'
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rome_lens.errors import UnsupportedModelError
from rome_lens.models.local import configs


@dataclass(frozen=True)
class Family:
    """One supported model family.

    Attributes:
        name: the family's name, for messages.
        model_types: ``model_type`` values of its Hugging Face configs.
        gguf_architectures: ``general.architecture`` values of its GGUF files.
        tl_architecture: TransformerLens's ``original_architecture`` for it.
        converter: name of its function in ``transformer_lens.pretrained.weight_conversions``.
        derive: transformers config -> ``HookedTransformerConfig`` fields.
    """

    name: str
    model_types: tuple[str, ...]
    gguf_architectures: tuple[str, ...]
    tl_architecture: str
    converter: str
    derive: Callable[[Any], dict[str, Any]]


FAMILIES: tuple[Family, ...] = (
    Family("Llama", ("llama",), ("llama",), "LlamaForCausalLM", "convert_llama_weights",
           configs.llama),
    Family("Gemma 2", ("gemma2",), ("gemma2",), "Gemma2ForCausalLM", "convert_gemma_weights",
           configs.gemma2),
    Family("Gemma 3 (text)", ("gemma3_text",), ("gemma3",), "Gemma3ForCausalLM",
           "convert_gemma_weights", configs.gemma3),
    Family("Qwen 2 / 2.5", ("qwen2",), ("qwen2",), "Qwen2ForCausalLM", "convert_qwen2_weights",
           configs.qwen2),
    Family("GPT-2", ("gpt2",), ("gpt2",), "GPT2LMHeadModel", "convert_gpt2_weights",
           configs.gpt2),
)


def supported_text() -> str:
    """The supported families and their spellings, for error messages."""
    return "; ".join(
        f"{f.name} (model_type {'/'.join(f.model_types)}, GGUF {'/'.join(f.gguf_architectures)})"
        for f in FAMILIES
    )


def family_of(*, model_type: str | None = None, gguf_architecture: str | None = None) -> Family:
    """The family with this Hugging Face ``model_type`` or GGUF ``general.architecture``.

    Args:
        model_type: ``model_type`` of a ``config.json``.
        gguf_architecture: ``general.architecture`` of a GGUF file.

    Returns:
        The matching family.

    Raises:
        UnsupportedModelError: no supported family matches (the message lists them).
    """
    for family in FAMILIES:
        if model_type in family.model_types or gguf_architecture in family.gguf_architectures:
            return family
    what = (
        f"model_type {model_type!r}" if model_type is not None
        else f"GGUF architecture {gguf_architecture!r}"
    )
    raise UnsupportedModelError(
        f"rome_lens cannot load a model of {what}; supported families: {supported_text()}"
    )
