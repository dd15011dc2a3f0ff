"""CounterFact evaluation: ES / PS / NS / S of ROME edits (one at a time, reverted in between).

Takes the first N records that the unedited model gets right (mean-token p(true) > p(new) on the
edit prompt), edits each with ROME at the given layer, scores it, reverts, and writes a table in
the paper's format with 95% bootstrap confidence intervals. Per-record results are appended to a
JSONL file as they come, so an interrupted run resumes where it stopped.

Usage:
    python benchmarks/counterfact.py --n 100 [--layer L] [--data PATH]
        [--out benchmarks/results/counterfact.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import random
import statistics
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).parent))
from _provenance import provenance  # noqa: E402

import rome_lens  # noqa: E402
from rome_lens import evaluation as ev  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "counterfact-dev.json"
PAPER_GPT2_XL = {
    "unedited": {"S": 30.5, "ES": 22.2, "PS": 24.7, "NS": 78.1},
    "ROME": {"S": 89.2, "ES": 100.0, "PS": 96.4, "NS": 75.4},
}


def bootstrap_ci(
    scores: list[ev.RecordScores], key: str, n_boot: int = 1000, seed: int = 0
) -> tuple[float, float]:
    rng = random.Random(seed)
    values = []
    for _ in range(n_boot):
        sample = [scores[rng.randrange(len(scores))] for _ in scores]
        values.append(ev.summarize(sample)[key])
    values.sort()
    return values[int(0.025 * n_boot)], values[int(0.975 * n_boot) - 1]


def table(scores: list[ev.RecordScores]) -> dict[str, object]:
    summary = ev.summarize(scores)
    ci = {k: bootstrap_ci(scores, k) for k in ("ES", "PS", "NS", "S")}
    return {"summary": summary, "ci95": ci}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--layer", type=int, default=None)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/counterfact.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    model = rome_lens.load_model()
    layer = args.layer if args.layer is not None else rome_lens.default_hparams(model).layer
    records = ev.load_counterfact(args.data)
    known = ev.known_records(model, records, args.n)
    partial = args.out.with_suffix(f".L{layer}.jsonl")
    done: dict[int, dict] = {}
    if partial.exists():
        for line in partial.read_text().splitlines():
            row = json.loads(line)
            done[row["case_id"]] = row
    partial.parent.mkdir(parents=True, exist_ok=True)
    with partial.open("a") as sink:
        for rec in tqdm(known, desc=f"CounterFact L{layer}"):
            if rec.case_id in done:
                continue
            before = ev.score_record(model, rec)
            t0 = time.perf_counter()
            edit = rome_lens.compute_rome(model, rec.request, layer=layer)
            seconds = time.perf_counter() - t0
            with edit.applied(model):
                after = ev.score_record(model, rec)
            after.seconds = seconds
            row = {"case_id": rec.case_id, "before": dataclasses.asdict(before),
                   "after": dataclasses.asdict(after)}
            sink.write(json.dumps(row) + "\n")
            sink.flush()
            done[rec.case_id] = row
    rows = [done[r.case_id] for r in known]
    before_scores = [ev.RecordScores(**r["before"]) for r in rows]
    after_scores = [ev.RecordScores(**r["after"]) for r in rows]
    result = {
        "benchmark": "counterfact",
        "model": rome_lens.DEFAULT_MODEL,
        "layer": layer,
        "n_records": len(rows),
        "selection": f"first {args.n} records of {args.data.name} with p(true) > p(new) unedited",
        "unedited": table(before_scores),
        "ROME": table(after_scores),
        "paper_gpt2_xl": PAPER_GPT2_XL,
        "median_seconds_per_edit": statistics.median(s.seconds for s in after_scores),
        "provenance": provenance(seed=0),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    for name in ("unedited", "ROME"):
        s = result[name]["summary"]
        print(f"{name:9s} S {s['S']:5.1f}  ES {s['ES']:5.1f}  PS {s['PS']:5.1f}  NS {s['NS']:5.1f}"
              f"  EM {s['EM']:5.1f}  PM {s['PM']:5.1f}  NM {s['NM']:5.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
