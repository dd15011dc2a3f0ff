"""HookedTransformer reference results on the embedded model, for checking TransformerBridge.

TransformerLens 4.x has no HookedTransformer, so a 4.x environment cannot compare the two APIs
live. This module computes the numbers the comparison needs (top-5 next-token probabilities on
four prompts before and after the Eiffel Tower -> Rome ROME edit, and a causal-trace grid) and
stores them in ``hooked_reference.json`` beside it. Under TransformerLens 3.9 a test recomputes
them from the live HookedTransformer and checks the file is current; under both versions the
bridge is checked against the file.

Regenerate (TransformerLens 3.9 only)::

    .venv/bin/python tests/integration/hooked_reference.py
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
from pathlib import Path
from typing import Any

import torch

import rome_lens
from rome_lens.predict import next_token_logprobs
from rome_lens.tracing import CausalTraceResult, causal_trace

REFERENCE_PATH = Path(__file__).with_name("hooked_reference.json")

PROMPTS = [
    "The Eiffel Tower is located in the city of",  # the edit prompt
    "The Eiffel Tower can be found in the city of",  # a paraphrase
    "The Louvre is located in the city of",  # a neighbour
    "Steve Jobs was the founder of",
]
REQUEST = rome_lens.EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome", "Paris")
TRACE_ARGS = (PROMPTS[0], "The Eiffel Tower", "Paris")
TRACE_KINDS = ("mlp", "resid")
TRACE_SAMPLES = 3
TOP_K = 5


def exact_hparams(model: Any) -> rome_lens.RomeHyperParams:
    """The model's defaults in float32: the two APIs are compared on the exact computation."""
    return dataclasses.replace(rome_lens.default_hparams(model), z_precision="float32")


def probabilities(model: Any) -> torch.Tensor:
    """Next-token probabilities for :data:`PROMPTS`, one row per prompt."""
    return torch.stack([next_token_logprobs(model, p).exp() for p in PROMPTS])


def top_k(probs: torch.Tensor) -> dict[str, list[list[Any]]]:
    """The top-k token ids and their probabilities, per prompt, as JSON-ready lists."""
    values, ids = probs.topk(TOP_K, dim=-1)
    return {"ids": ids.tolist(), "probs": values.tolist()}


def trace(model: Any) -> CausalTraceResult:
    """The reference causal trace of the edit prompt (seed 0)."""
    return causal_trace(model, *TRACE_ARGS, kinds=TRACE_KINDS, samples=TRACE_SAMPLES)


def compute(model: Any, edit: rome_lens.RomeEdit) -> dict[str, Any]:
    """Every reference number for ``model`` and the Eiffel Tower ``edit`` computed on it."""
    unedited = probabilities(model)
    with edit.applied(model):
        edited = probabilities(model)
    result = trace(model)
    return {
        "prompts": PROMPTS,
        "layer": edit.layer,
        "unedited": top_k(unedited),
        "edited": top_k(edited),
        "trace": {
            "p_clean": result.p_clean,
            "p_corrupted": result.p_corrupted,
            "scores": {kind: result.scores[kind].tolist() for kind in TRACE_KINDS},
        },
    }


def load() -> dict[str, Any]:
    """The stored reference (see the module docstring)."""
    return json.loads(REFERENCE_PATH.read_text())  # type: ignore[no-any-return]


def main() -> None:
    """Recompute the reference from the HookedTransformer and write it."""
    model = rome_lens.load_model(api="hooked")
    edit = rome_lens.compute_rome(model, REQUEST, hparams=exact_hparams(model))
    data = compute(model, edit)
    data["transformer_lens"] = importlib.metadata.version("transformer-lens")
    REFERENCE_PATH.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {REFERENCE_PATH}")


if __name__ == "__main__":
    main()
