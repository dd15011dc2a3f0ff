"""Edit speed: seconds per ROME edit, its split, the one-time statistics cost, peak memory.

Runs the optimised value loop (``loop="prefix_cache"``: the tokens before the subject are cached
in a frozen key-value cache, the residual entering the edit layer is computed once, and logits
are decoded only at the loss positions) and the naive loop (full forward passes with
full-vocabulary logits at every position, as the reference implementation does) on the same facts
in the same process, and reports the ratio. Peak RSS is read after the optimised phase (before
the naive one, whose full-vocabulary logits need more memory) and at the end.

Usage:
    python benchmarks/edit_speed.py [--n 10] [--layer L] [--out benchmarks/results/edit_speed.json]
        [--stats-timing]    # also time building the key statistics from scratch (minutes)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _provenance import provenance  # noqa: E402

import rome_lens  # noqa: E402
from rome_lens.evaluation import load_counterfact  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "counterfact-dev.json"


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=10, help="facts (>= 10 for the median)")
    parser.add_argument("--layer", type=int, default=None)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/edit_speed.json"))
    parser.add_argument("--stats-timing", action="store_true",
                        help="time the one-time statistics (corpus sampling + C) in a fresh cache")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    t0 = time.perf_counter()
    model = rome_lens.load_model()
    load_s = time.perf_counter() - t0
    hp = rome_lens.default_hparams(model)
    layer = args.layer if args.layer is not None else hp.layer
    records = load_counterfact(args.data)[: args.n]

    stats_timing: dict[str, float] = {}
    if args.stats_timing:
        with tempfile.TemporaryDirectory() as fresh:
            old = os.environ.get("ROME_LENS_CACHE")
            os.environ["ROME_LENS_CACHE"] = fresh
            t0 = time.perf_counter()
            rome_lens.second_moment(model, layer, hparams=hp)
            stats_timing["fresh_statistics_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            rome_lens.second_moment(model, layer, hparams=hp)
            stats_timing["cached_statistics_s"] = time.perf_counter() - t0
            if old is None:
                del os.environ["ROME_LENS_CACHE"]
            else:
                os.environ["ROME_LENS_CACHE"] = old
    stats = rome_lens.second_moment(model, layer, hparams=hp)  # warm the cache: not per edit
    rome_lens.compute_rome(model, records[0].request, layer=layer, stats=stats)  # warm-up

    loops = {"fast": "prefix_cache", "naive": "naive"}
    rows = []
    for mode in ("fast", "naive"):
        for rec in records:
            t0 = time.perf_counter()
            edit = rome_lens.compute_rome(
                model, rec.request, layer=layer, stats=stats, loop=loops[mode]
            )
            total = time.perf_counter() - t0
            rows.append({
                "case_id": rec.case_id, "mode": mode, "seconds": total,
                **edit.info["timings"], "steps": len(edit.info["losses"]),
                "final_loss": edit.info["losses"][-1], "delta": edit.right.tolist(),
            })
            print(f"{mode:5s} case {rec.case_id}: {total:.2f}s", flush=True)
        if mode == "fast":
            peak_fast = peak_rss_gib()

    def median(mode: str, key: str) -> float:
        return statistics.median(r[key] for r in rows if r["mode"] == mode)

    per_fact_ratio = []
    max_delta_diff = 0.0
    for rec in records:
        f = next(r for r in rows if r["mode"] == "fast" and r["case_id"] == rec.case_id)
        n = next(r for r in rows if r["mode"] == "naive" and r["case_id"] == rec.case_id)
        per_fact_ratio.append(n["seconds"] / f["seconds"])
        diff = torch.tensor(f["delta"]) - torch.tensor(n["delta"])
        max_delta_diff = max(max_delta_diff, float(diff.norm() / torch.tensor(n["delta"]).norm()))
    for r in rows:
        r.pop("delta")
    result = {
        "benchmark": "edit_speed",
        "model": rome_lens.DEFAULT_MODEL,
        "layer": layer,
        "n_facts": len(records),
        "loops": loops,
        "model_load_s": load_s,
        "median_seconds_per_edit": {"fast": median("fast", "seconds"),
                                    "naive": median("naive", "seconds")},
        "median_split_fast": {k: median("fast", k) for k in
                              ("keys_s", "stats_s", "value_s", "update_s")},
        "median_split_naive": {k: median("naive", k) for k in
                               ("keys_s", "stats_s", "value_s", "update_s")},
        "speedup_naive_over_fast": median("naive", "seconds") / median("fast", "seconds"),
        "speedup_value_loop": median("naive", "value_s") / median("fast", "value_s"),
        "per_fact_speedup_median": statistics.median(per_fact_ratio),
        "max_relative_delta_difference_fast_vs_naive": max_delta_diff,
        "statistics": stats_timing,
        "peak_rss_gib_fast_phase": peak_fast,
        "peak_rss_gib_total": peak_rss_gib(),
        "rows": rows,
        "provenance": provenance(seed=hp.seed),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    summary = {k: v for k, v in result.items() if k not in ("rows", "provenance")}
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
