"""Edit speed: seconds per ROME edit in three value loops side by side, and what they score.

Three loops on the same facts in one process, alternating per fact (a busy machine slows all
alike):

* ``new``: what ``compute_rome`` does by default: the prefix-cache loop (tokens before the
  subject in a frozen key-value cache, the residual entering the edit layer computed once,
  logits only at the loss positions) with the precision :func:`rome_lens.default_hparams`
  picks (bfloat16 autocast where the CPU has AVX-512 BF16);
* ``previous``: the same loop in float32 (the default before bfloat16);
* ``naive``: full forward passes with full-vocabulary logits at every position, float32 (as
  the reference implementation), on the first ``--naive-n`` facts (it is ~8x slower).

Facts are the first ``--n`` CounterFact records the unedited model knows; ``--quality-n N``
also computes ``new`` and ``previous`` edits for the first N such records and scores each
(ES / PS / NS), since bfloat16 changes the numbers (not the algorithm). The JSON also holds
the largest relative difference of the value vectors between loops, a forward pass of the
loaded model against transformers on the same weights (benchmarks/forward_speed.py's
timing), the one-time statistics cost (``--stats-timing``), peak memory and provenance.

Usage:
    python benchmarks/edit_speed.py [--n 10] [--naive-n 10] [--quality-n 50] [--layer L]
        [--out benchmarks/results/edit_speed.json] [--stats-timing]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _provenance import provenance  # noqa: E402
from forward_speed import PROMPT, time_forwards  # noqa: E402

import rome_lens  # noqa: E402
from rome_lens import evaluation as ev  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "counterfact-dev.json"
EASYEDIT_MEDIAN_S = 75.4  # EasyEdit's ROME, same machine, 10 held-out cases (issue #18)
MODES = ("new", "previous", "naive")


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def mode_settings(model: Any, mode: str) -> tuple[str, rome_lens.RomeHyperParams]:
    """The value loop and hyperparameters of one mode."""
    hp = rome_lens.default_hparams(model)
    if mode == "new":
        return "prefix_cache", hp
    exact = dataclasses.replace(hp, z_precision="float32")
    return ("prefix_cache" if mode == "previous" else "naive"), exact


def run_one(model: Any, rec: ev.CounterFactRecord, mode: str, stats: torch.Tensor,
            layer: int, score: bool) -> dict[str, Any]:
    """Time one edit (and score it with ``score``); the model is left unedited."""
    loop, hp = mode_settings(model, mode)
    t0 = time.perf_counter()
    edit = rome_lens.compute_rome(model, rec.request, layer=layer, hparams=hp, stats=stats,
                                  loop=loop)
    row: dict[str, Any] = {
        "case_id": rec.case_id, "mode": mode, "seconds": time.perf_counter() - t0,
        **edit.info["timings"], "steps": len(edit.info["losses"]),
        "final_loss": edit.info["losses"][-1], "z_precision": hp.z_precision,
        "value": edit.right.tolist(),
    }
    if score:
        with edit.applied(model):
            scores = ev.score_record(model, rec)
        row["scores"] = dataclasses.asdict(scores)
    print(f"{mode:8s} case {rec.case_id}: {row['seconds']:.2f}s", flush=True)
    return row


def statistics_timing(model: Any, layer: int, hp: rome_lens.RomeHyperParams) -> dict[str, float]:
    """Building the key statistics from scratch in a fresh cache, then from the cache."""
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as fresh:
        old = os.environ.get("ROME_LENS_CACHE")
        os.environ["ROME_LENS_CACHE"] = fresh
        for key in ("fresh_statistics_s", "cached_statistics_s"):
            t0 = time.perf_counter()
            rome_lens.second_moment(model, layer, hparams=hp)
            out[key] = time.perf_counter() - t0
        if old is None:
            del os.environ["ROME_LENS_CACHE"]
        else:
            os.environ["ROME_LENS_CACHE"] = old
    return out


def relative(a: list[float], b: list[float]) -> float:
    ta, tb = torch.tensor(a), torch.tensor(b)
    return float((ta - tb).norm() / tb.norm())


def compare(rows: list[dict[str, Any]], first: str, second: str) -> float:
    """Largest relative difference of the edits' vectors between two modes, over shared facts."""
    by = {(r["mode"], r["case_id"]): r["value"] for r in rows}
    cases = [c for m, c in by if m == first and (second, c) in by]
    return max((relative(by[(first, c)], by[(second, c)]) for c in cases), default=float("nan"))


def summarize(rows: list[dict[str, Any]], timed: set[int]) -> dict[str, Any]:
    def med(mode: str, key: str) -> float:
        vals = [r[key] for r in rows if r["mode"] == mode and r["case_id"] in timed]
        return statistics.median(vals) if vals else float("nan")

    medians = {m: med(m, "seconds") for m in MODES}
    quality = {}
    for mode in ("new", "previous"):
        scored = [ev.RecordScores(**r["scores"]) for r in rows
                  if r["mode"] == mode and "scores" in r]
        if scored:
            quality[mode] = ev.summarize(scored)
    return {
        "median_seconds_per_edit": medians,
        "median_split": {m: {k: med(m, k) for k in ("keys_s", "stats_s", "value_s", "update_s")}
                         for m in MODES},
        "speedup_previous_over_new": medians["previous"] / medians["new"],
        "speedup_naive_over_new": medians["naive"] / medians["new"],
        "speedup_naive_over_previous": medians["naive"] / medians["previous"],
        "easyedit_median_s": EASYEDIT_MEDIAN_S,
        "speedup_easyedit_over_new": EASYEDIT_MEDIAN_S / medians["new"],
        "max_relative_value_difference": {
            "previous_vs_naive": compare(rows, "previous", "naive"),
            "new_vs_previous": compare(rows, "new", "previous"),
        },
        "quality": quality,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=10, help="timed facts (>= 10 for the median)")
    parser.add_argument("--naive-n", type=int, default=None, help="facts for the naive loop")
    parser.add_argument("--quality-n", type=int, default=0,
                        help="facts edited and scored with the new and previous loops")
    parser.add_argument("--layer", type=int, default=None)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/edit_speed.json"))
    parser.add_argument("--stats-timing", action="store_true",
                        help="time the one-time statistics (corpus + C) in a fresh cache")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    t0 = time.perf_counter()
    model = rome_lens.load_model()
    load_s = time.perf_counter() - t0
    hp = rome_lens.default_hparams(model)
    layer = args.layer if args.layer is not None else hp.layer
    naive_n = args.n if args.naive_n is None else args.naive_n
    records = ev.known_records(model, ev.load_counterfact(args.data), max(args.n,
                                                                        args.quality_n))
    stats_timing = statistics_timing(model, layer, hp) if args.stats_timing else {}
    stats = rome_lens.second_moment(model, layer, hparams=hp)  # warm the cache: not per edit
    rome_lens.compute_rome(model, records[0].request, layer=layer, stats=stats)  # warm-up
    tokens = model.to_tokens(PROMPT)[:, :15]
    seconds, _, attn = time_forwards({"rome_lens": model}, tokens, 15)
    forward_ms = {k: 1000 * statistics.median(v) for k, v in seconds.items()}

    rows = []  # timed facts, then the naive loop, then the facts that are only scored
    for i, rec in enumerate(records[: args.n]):
        for mode in ("new", "previous"):
            rows.append(run_one(model, rec, mode, stats, layer, args.quality_n > i))
    peak_fast = peak_rss_gib()
    for rec in records[:naive_n]:
        rows.append(run_one(model, rec, "naive", stats, layer, False))
    for rec in records[args.n : args.quality_n]:
        for mode in ("new", "previous"):
            rows.append(run_one(model, rec, mode, stats, layer, True))
    timed = {rec.case_id for rec in records[: args.n]}
    summary_figures = summarize(rows, timed)
    for r in rows:
        r.pop("value")
    result = {
        "benchmark": "edit_speed",
        "model": rome_lens.DEFAULT_MODEL,
        "layer": layer,
        "n_timed": args.n, "n_naive": naive_n, "n_quality": args.quality_n,
        "selection": f"first records of {args.data.name} the unedited model knows",
        "modes": {m: {"loop": loop, "z_precision": mode_hp.z_precision}
                  for m in MODES for loop, mode_hp in [mode_settings(model, m)]},
        "model_load_s": load_s,
        **summary_figures,
        "forward_15_tokens_ms": forward_ms,
        "forward_ratio_rome_lens_over_transformers": forward_ms["rome_lens"]
        / forward_ms["transformers"],
        "hf_attn_implementation": attn,
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
