"""Causal tracing benchmark: batched vs reference speed, and the dataset-level summary.

1. Speed: on the first ``--speed-facts`` known facts, the batched trace and the reference loop
   (one full forward pass per cell) run back to back in the same process with the same noise;
   the JSON reports both times, the ratio and the largest score difference.
2. Summary: ``trace_dataset`` over the first ``--n`` facts of known_1000.json that the model
   predicts, averaged by token class and layer, next to the paper's GPT-2 XL numbers
   (REFERENCE.md §2). Per-fact results go to a JSONL file, so the run resumes.

Usage:
    python benchmarks/causal_trace.py [--n 100] [--speed-facts 3] [--samples 10]
        [--out benchmarks/results/causal_trace.json]
Writes the JSON, ``*_summary.png`` and ``*_eiffel.png`` beside it.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _provenance import provenance  # noqa: E402

import rome_lens  # noqa: E402
from rome_lens.tracing import causal_trace, load_known_facts, trace_dataset  # noqa: E402
from rome_lens.tracing.dataset import model_knows  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "known_1000.json"
PAPER_GPT2_XL = {
    "p_clean": 0.270,
    "p_corrupted": 0.0847,
    "total_effect": 0.186,
    "resid_peak_last_subject": {"layer": 15, "aie": 0.087},
    "mlp_peak_last_subject": {"layer": 17, "aie": 0.066},
    "attn_at_last_subject": 0.016,
    "n_layers": 48,
}


def _count_rows(path: Path) -> int:
    """Traced (not skipped) facts already in a JSONL file."""
    if not path.exists():
        return 0
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return sum("skipped" not in row for row in rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=100, help="known facts to summarise")
    parser.add_argument("--speed-facts", type=int, default=3)
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/causal_trace.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    args.out.parent.mkdir(parents=True, exist_ok=True)

    model = rome_lens.load_model()
    eiffel = causal_trace(model, "The Eiffel Tower is located in the city of",
                          "The Eiffel Tower", samples=args.samples)
    eiffel.plot(str(args.out.with_name(args.out.stem + "_eiffel.png")))

    facts = load_known_facts(args.data)
    known = []
    for fact in facts:
        if model_knows(model, fact):
            known.append(fact)
        if len(known) >= args.n:
            break

    speed = []
    for fact in known[: args.speed_facts]:
        t0 = time.perf_counter()
        fast = causal_trace(model, fact.prompt, fact.subject, fact.answer, samples=args.samples)
        t_fast = time.perf_counter() - t0
        t0 = time.perf_counter()
        ref = causal_trace(model, fact.prompt, fact.subject, fact.answer, samples=args.samples,
                           method="reference")
        t_ref = time.perf_counter() - t0
        diff = max(float((fast.scores[k] - ref.scores[k]).abs().max()) for k in fast.scores)
        speed.append({"known_id": fact.known_id, "n_tokens": len(fast.tokens),
                      "batched_s": t_fast, "reference_s": t_ref, "speedup": t_ref / t_fast,
                      "max_abs_diff": diff})
        print(f"speed fact {fact.known_id}: batched {t_fast:.1f}s, reference {t_ref:.1f}s, "
              f"diff {diff:.2e}", flush=True)

    jsonl = args.out.with_suffix(".jsonl")
    n_before = _count_rows(jsonl)
    t0 = time.perf_counter()
    summary = trace_dataset(model, known, out=jsonl, samples=args.samples)
    elapsed = time.perf_counter() - t0
    n_new = _count_rows(jsonl) - n_before  # facts traced by this run (the rest were resumed)
    summary.plot(str(args.out.with_name(args.out.stem + "_summary.png")))
    peaks = {k: dict(zip(("layer", "aie"), summary.peak(k), strict=True))
             for k in summary.effects}
    result = {
        "benchmark": "causal_trace",
        "model": rome_lens.DEFAULT_MODEL,
        "n_layers": model.cfg.n_layers,
        "samples": args.samples,
        "eiffel": {"p_clean": eiffel.p_clean, "p_corrupted": eiffel.p_corrupted,
                   "best_layer": {k: eiffel.best_layer(k) for k in eiffel.scores},
                   "indirect_effect": {k: eiffel.indirect_effect(k).tolist()
                                       for k in eiffel.scores},
                   "tokens": eiffel.tokens},
        "speed": speed,
        "speedup_median": sorted(s["speedup"] for s in speed)[len(speed) // 2] if speed else None,
        "summary": {
            "n_facts": summary.n_facts,
            "p_clean": summary.p_clean,
            "p_corrupted": summary.p_corrupted,
            "total_effect": summary.total_effect,
            "peaks_last_subject_token": peaks,
            "aie": {k: {c: v.tolist() for c, v in classes.items()}
                    for k, classes in summary.effects.items()},
        },
        "facts_traced_this_run": n_new,
        "facts_per_minute": 60.0 * n_new / elapsed if n_new > 0 else None,
        "facts_per_minute_speed_facts": (60.0 * len(speed) / sum(s["batched_s"] for s in speed)
                                         if speed else None),
        "paper_gpt2_xl": PAPER_GPT2_XL,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "provenance": provenance(seed=0),
    }
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items()
                      if k in ("speed", "speedup_median", "facts_per_minute",
                               "facts_per_minute_speed_facts", "peak_rss_gib")},
                     indent=1))
    print(json.dumps(result["summary"]["peaks_last_subject_token"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
