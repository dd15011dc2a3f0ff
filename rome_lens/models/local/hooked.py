"""A HookedTransformer for a checkpoint TransformerLens has no name for.

The config comes from the checkpoint's own configuration (:mod:`.configs`); the weights go
through TransformerLens's converter for the family, without weight processing, exactly as
``HookedTransformer.from_pretrained_no_processing`` does for the checkpoints it knows, so the
logits match the transformers model's.
"""

from __future__ import annotations

from typing import Any

import torch

from rome_lens._typing import Model
from rome_lens.models.local.families import Family


def derived_config(family: Family, hf_config: Any, name: str) -> dict[str, Any]:
    """``HookedTransformerConfig`` fields of a transformers config (JSON values only).

    Args:
        family: the checkpoint's family.
        hf_config: its transformers config.
        name: the model's name, for ``cfg.model_name``.
    """
    fields = family.derive(hf_config)
    fields.setdefault("default_prepend_bos", True)
    fields.update(model_name=name, original_architecture=family.tl_architecture)
    return fields


def empty_model(
    fields: dict[str, Any], tokenizer: Any, device: str | torch.device, dtype: torch.dtype
) -> Model:
    """A HookedTransformer of these config fields, its weights not initialised."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig.from_dict(
        {**fields, "init_weights": False, "device": str(device), "dtype": dtype}
    )
    return HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)  # type: ignore[return-value]


def convert(
    hf_model: Any, tokenizer: Any, family: Family, name: str
) -> tuple[Model, dict[str, Any]]:
    """A float32 CPU HookedTransformer with the weights of a transformers model.

    Args:
        hf_model: the transformers model (float32).
        tokenizer: its tokenizer.
        family: its family.
        name: the model's name.

    Returns:
        The model (eval mode) and its config fields (to rebuild it from cached weights).
    """
    from transformer_lens.pretrained import weight_conversions

    fields = derived_config(family, hf_model.config, name)
    model: Any = empty_model(fields, tokenizer, "cpu", torch.float32)
    with torch.no_grad():
        state = getattr(weight_conversions, family.converter)(hf_model, model.cfg)
    model.load_and_process_state_dict(
        state, fold_ln=False, center_writing_weights=False, center_unembed=False,
        fold_value_biases=False, refactor_factored_attn_matrices=False,
    )
    model.eval()
    return model, fields
