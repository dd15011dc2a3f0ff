"""Forward-pass speed: rome_lens's loaded model against transformers on the same weights.

Four forwards of the embedded gemma-3-270m on the same prompt, side by side in one process,
interleaved round by round (a busy machine slows all of them alike):

- ``tl_original``: the HookedTransformer with TransformerLens 3.9's own forwards
  (``load_model(fast_forward=False)``), which copy weights at every call;
- ``fast_mlp_only``: the same with only the MLPs copy-free (what ``load_model()`` gave before
  :func:`~rome_lens.models.speed.install_fast_forward`);
- ``rome_lens``: the same model as ``load_model()`` returns it (copy-free forwards,
  :mod:`rome_lens.models.speed`);
- ``transformers``: ``AutoModelForCausalLM`` from the cached Hugging Face folder of the same
  GGUF (:func:`rome_lens.models.loading.embedded_hf_folder`).

All compute full-vocabulary logits at every position. The JSON holds each forward's
median and the ratios, the largest logit differences between them, and provenance.
``--edits N`` also times ``compute_edit`` (ROME) on the first N CounterFact records with each
HookedTransformer variant, alternating (same statistics, warmed up), and compares the deltas.

Usage:
    python benchmarks/forward_speed.py [--tokens 15] [--repeats 15] [--threads T]
        [--edits 3] [--out benchmarks/results/forward_speed.json]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _provenance import provenance  # noqa: E402

import rome_lens  # noqa: E402
from rome_lens.evaluation import load_counterfact  # noqa: E402
from rome_lens.models.loading import embedded_hf_folder  # noqa: E402
from rome_lens.models.speed import install_fast_forward, install_fast_mlp  # noqa: E402

logger = logging.getLogger("forward_speed")
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "counterfact-dev.json"
PROMPT = (
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France, "
    "named after the engineer Gustave Eiffel"
)


def timed(fn: Any) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=15, help="prompt length, BOS included")
    parser.add_argument("--repeats", type=int, default=15, help="timed rounds (median)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--edits", type=int, default=0, help="also time N ROME edits per variant")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/forward_speed.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    old = rome_lens.load_model(fast_forward=False)
    mlp_only = copy.deepcopy(old)
    install_fast_mlp(mlp_only)
    new = copy.deepcopy(old)
    installed = install_fast_forward(new)
    variants = {"tl_original": old, "fast_mlp_only": mlp_only, "rome_lens": new}
    tokens = old.to_tokens(PROMPT)[:, : args.tokens]
    if tokens.shape[1] != args.tokens:
        raise SystemExit(f"the prompt has only {tokens.shape[1]} tokens; --tokens is too large")
    seconds, logits, attn_implementation = time_forwards(variants, tokens, args.repeats)
    ms = {name: 1000 * statistics.median(v) for name, v in seconds.items()}
    result: dict[str, Any] = {
        "benchmark": "forward_speed",
        "model": rome_lens.DEFAULT_MODEL,
        "n_tokens": int(tokens.shape[1]),
        "repeats": args.repeats,
        "installed": dataclasses.asdict(installed),
        "hf_attn_implementation": attn_implementation,
        "median_forward_ms": ms,
        "min_forward_ms": {name: 1000 * min(v) for name, v in seconds.items()},
        "ratio_tl_original_over_rome_lens": ms["tl_original"] / ms["rome_lens"],
        "ratio_fast_mlp_only_over_rome_lens": ms["fast_mlp_only"] / ms["rome_lens"],
        "ratio_rome_lens_over_transformers": ms["rome_lens"] / ms["transformers"],
        "ratio_tl_original_over_transformers": ms["tl_original"] / ms["transformers"],
        "max_relative_logit_difference": {
            "rome_lens_vs_tl_original": relative_difference(logits["rome_lens"],
                                                            logits["tl_original"]),
            "rome_lens_vs_transformers": relative_difference(logits["rome_lens"],
                                                             logits["transformers"]),
            "tl_original_vs_transformers": relative_difference(logits["tl_original"],
                                                               logits["transformers"]),
        },
        "seconds": seconds,
    }
    if args.edits:
        result["edits"] = time_edits(variants, args.data, args.edits)
    result["provenance"] = provenance()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    summary = {k: v for k, v in result.items() if k not in ("seconds", "provenance")}
    if "edits" in summary:
        summary["edits"] = {k: v for k, v in summary["edits"].items() if k != "rows"}
    logger.info("%s", json.dumps(summary, indent=1))
    return 0


def time_forwards(
    variants: dict[str, Any], tokens: torch.Tensor, repeats: int
) -> tuple[dict[str, list[float]], dict[str, torch.Tensor], str | None]:
    """Seconds of each forward per round (interleaved), their logits, HF's attention kernel."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(embedded_hf_folder()), dtype=torch.float32)
    hf.eval()
    forwards = {name: (lambda m=model: m(tokens)) for name, model in variants.items()}
    forwards["transformers"] = lambda: hf(input_ids=tokens).logits
    seconds: dict[str, list[float]] = {name: [] for name in forwards}
    with torch.no_grad():
        logits = {name: fn() for name, fn in forwards.items()}  # warm-up, and the values
        for round_ in range(repeats):
            for name, fn in forwards.items():
                seconds[name].append(timed(fn)[0])
            logger.info("round %d (ms): %s", round_,
                        {k: round(1000 * v[-1]) for k, v in seconds.items()})
    return seconds, logits, getattr(hf.config, "_attn_implementation", None)


def time_edits(models: dict[str, Any], data: Path, n: int) -> dict[str, Any]:
    """ROME edits of the first ``n`` records with each model variant, alternating."""
    records = load_counterfact(data)[:n]
    first = next(iter(models.values()))
    hp = rome_lens.default_hparams(first)
    stats = rome_lens.second_moment(first, hp.layer, hparams=hp)
    for model in models.values():  # warm-up (contexts, caches)
        rome_lens.compute_edit(model, records[0].request, stats=stats)
    rows = []
    for rec in records:
        edits = {}
        for name, model in models.items():
            s, edits[name] = timed(
                lambda m=model, r=rec.request: rome_lens.compute_edit(m, r, stats=stats)
            )
            rows.append({"case_id": rec.case_id, "forward": name, "seconds": s})
            logger.info("edit %s %s: %.2f s", rec.case_id, name, s)
        reference = edits["tl_original"].sites[0].right
        for row in rows[-len(models):]:
            row["max_relative_delta_difference_vs_tl_original"] = relative_difference(
                edits[row["forward"]].sites[0].right, reference)
    med = {name: statistics.median(r["seconds"] for r in rows if r["forward"] == name)
           for name in models}
    return {
        "n": len(records),
        "median_seconds": med,
        "ratio_over_rome_lens": {name: med[name] / med["rome_lens"] for name in models},
        "rows": rows,
    }


if __name__ == "__main__":
    raise SystemExit(main())
