"""MEMIT seconds per fact against one ROME edit, side by side in ONE run, nothing cached.

batch_editing.py reports MEMIT's cost from cached targets, whose seconds were measured when
they were first optimised (possibly in another session, on a busier machine). This script
measures both methods from scratch in one process, alternating, so the ratio holds on a noisy
machine: ROME edits (each from the unedited model) before and after one MEMIT batch of
``--batch`` facts with ``cache_targets=False``. MEMIT's targets are optimised ``z_batch`` at a
time, so their cost per fact does not depend on the batch size; the spread's does and is
reported separately (batch_editing.py gives it at 1,000 facts). Run alone (2 cores).

Usage:
    python benchmarks/memit_speed.py --batch 64 --rome 6
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _many import TRAIN, hparams_from, known_facts, load_model, peak_memory_gib  # noqa: E402
from _provenance import provenance  # noqa: E402

import rome_lens  # noqa: E402

OUT = Path("benchmarks/results/memit_speed.json")
FACTS = Path("benchmarks/results/batch_editing.facts.json")


def time_rome(model: object, facts: list, first: int, count: int) -> list[float]:
    """Seconds of ``count`` ROME edits, each computed on the unedited model."""
    seconds = []
    for rec in facts[first : first + count]:
        t0 = time.perf_counter()
        rome_lens.compute_edit(model, rec.request, method="rome")
        seconds.append(time.perf_counter() - t0)
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rome", type=int, default=6, help="ROME edits (half before MEMIT)")
    parser.add_argument("--set", dest="settings", action="append", default=[])
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    model = load_model()
    hp = hparams_from(rome_lens.MemitHyperParams, model, args.settings)
    facts = known_facts(model, args.batch + args.rome, TRAIN, FACTS)
    half = args.rome // 2
    rome_s = time_rome(model, facts, 0, half)
    batch = [r.request for r in facts[: args.batch]]
    t0 = time.perf_counter()
    edit = rome_lens.compute_edit(model, batch, method="memit", hparams=hp, cache_targets=False,
                                  progress=True)
    memit_wall = time.perf_counter() - t0
    rome_s += time_rome(model, facts, half, args.rome - half)
    rome_median = statistics.median(rome_s)
    per_fact = memit_wall / args.batch
    result = {
        "benchmark": "memit_speed", "model": rome_lens.DEFAULT_MODEL, "hparams": hp.to_dict(),
        "rome_seconds": rome_s, "rome_median_seconds": rome_median,
        "memit_batch": args.batch, "memit_wall_seconds": memit_wall,
        "memit_seconds_per_fact": per_fact,
        "memit_target_seconds_per_fact": edit.info["target_seconds"] / args.batch,
        "memit_spread_seconds_per_fact": edit.info["timings"]["spread_s"] / args.batch,
        "ratio_to_one_rome_edit": per_fact / rome_median,
        "peak_memory_gib": peak_memory_gib(), "provenance": provenance(seed=0),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"ROME median {rome_median:.1f} s/edit; MEMIT {per_fact:.2f} s/fact "
          f"(targets {result['memit_target_seconds_per_fact']:.2f}, spread "
          f"{result['memit_spread_seconds_per_fact']:.2f}); ratio {per_fact / rome_median:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
