"""Scoring speed: seconds to score CounterFact records one pair at a time vs in padded batches.

Three ways to score the same records on the unedited model, in one process:

* ``per_pair``: one :func:`rome_lens.predict.target_logprob` forward pass per (prompt, target),
  as ``score_record`` did before batching (~26 passes per record);
* ``per_record``: :func:`rome_lens.evaluation.score_record` (one padded batch per record);
* ``batched``: :func:`rome_lens.evaluation.score_records` over all records.

It checks that all three give the same booleans and reports the largest magnitude difference.

Usage:
    python benchmarks/scoring_speed.py [--n 50] [--batch-size 64]
        [--data ../shared/data/counterfact-train.json] [--out benchmarks/results/scoring_speed.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _provenance import provenance  # noqa: E402

import rome_lens  # noqa: E402
from rome_lens import evaluation as ev  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "counterfact-train.json"
logger = logging.getLogger("scoring_speed")


def score_per_pair(model, rec: ev.CounterFactRecord) -> ev.RecordScores:
    """The unbatched definition: one forward pass per (prompt, target)."""
    new, true = rec.target_new, rec.target_true
    es = [ev.prefers_new(model, rec.request.text, new, true)]
    ps = [ev.prefers_new(model, p, new, true) for p in rec.paraphrase_prompts]
    ns = [ev.prefers_new(model, p, new, true) for p in rec.neighborhood_prompts]
    return ev.RecordScores(
        case_id=rec.case_id, efficacy=[a for a, _ in es], paraphrase=[a for a, _ in ps],
        neighborhood=[not a for a, _ in ns], efficacy_magnitude=[m for _, m in es],
        paraphrase_magnitude=[m for _, m in ps], neighborhood_magnitude=[-m for _, m in ns],
    )


def compare(a: list[ev.RecordScores], b: list[ev.RecordScores]) -> tuple[bool, float]:
    """(same booleans everywhere, largest absolute magnitude difference)."""
    same, worst = True, 0.0
    for x, y in zip(a, b, strict=True):
        same &= (x.efficacy, x.paraphrase, x.neighborhood) == (
            y.efficacy, y.paraphrase, y.neighborhood)
        for name in ("efficacy_magnitude", "paraphrase_magnitude", "neighborhood_magnitude"):
            for u, v in zip(getattr(x, name), getattr(y, name), strict=True):
                worst = max(worst, abs(u - v))
    return same, worst


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/scoring_speed.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)

    model = rome_lens.load_model()
    records = ev.load_counterfact(args.data)[: args.n]
    ev.score_records(model, records[:2], progress=False)  # warm-up
    seconds, results = {}, {}
    runs = {
        "per_pair": lambda: [score_per_pair(model, r) for r in records],
        "per_record": lambda: [ev.score_record(model, r) for r in records],
        "batched": lambda: ev.score_records(model, records, batch_size=args.batch_size,
                                            progress=False),
    }
    for name, run in runs.items():
        t0 = time.perf_counter()
        results[name] = run()
        seconds[name] = time.perf_counter() - t0
        logger.info("%s: %.1f s", name, seconds[name])
    checks = {name: compare(results[name], results["per_pair"]) for name in runs}
    report = {
        "n_records": len(records),
        "n_pairs": sum(2 * (1 + len(r.paraphrase_prompts) + len(r.neighborhood_prompts))
                       for r in records),
        "batch_size": args.batch_size,
        "seconds": seconds,
        "speedup_vs_per_pair": {k: seconds["per_pair"] / v for k, v in seconds.items()},
        "same_booleans_as_per_pair": {k: c[0] for k, c in checks.items()},
        "max_abs_magnitude_diff": {k: c[1] for k, c in checks.items()},
        "summary": ev.summarize(results["batched"]),
        "provenance": provenance(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    logger.info("%s", json.dumps({k: report[k] for k in list(report)[:7]}, indent=2))
    return 0 if all(c[0] for c in checks.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
