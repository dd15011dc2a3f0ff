"""Sequential editing: AlphaEdit's protocol (batches applied one after another) on this model.

Facts: the first N known records of counterfact-train.json, one per subject (the same selection
as batch_editing.py). For ``memit`` and ``alphaedit``: ``--edits`` facts in batches of
``--batch``, each batch computed on the model with every earlier batch applied
(:class:`rome_lens.EditSequence`); for ``rome``: one fact at a time for the first
``--rome-edits``. After every batch (ROME: every ``--rome-every`` edits): ES, PS, NS over
EVERY fact edited so far, fluency (GE of seeded generations on the first
``--generation-records`` facts) and the health monitor's record of the batch (update norm
relative to the weight, weight growth, generation entropy, held-out perplexity, flags).

Resumable: each method's sequence is saved after every batch (``cache/<out>-<method>/``) and
replayed on restart; rows go to ``<out>.jsonl``. ``--max-minutes`` stops between batches.
Curves of every metric against the number of edits: ``<out>.png``. Run alone (2 cores).

Usage:
    python benchmarks/sequential_editing.py --methods alphaedit memit rome --edits 1000 \\
        --batch 100 --rome-edits 200 [--max-minutes 170]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from _many import (  # noqa: E402
    TRAIN,
    Budget,
    append_row,
    hparams_from,
    known_facts,
    load_model,
    peak_memory_gib,
    read_rows,
    score_all,
    summary,
)
from _provenance import provenance  # noqa: E402

import rome_lens  # noqa: E402

OUT = Path("benchmarks/results/sequential_editing")
FACTS = Path("benchmarks/results/batch_editing.facts.json")
PAPER = {  # REFERENCE.md §6: 2,000 sequential CounterFact edits in batches of 100, GPT2-XL
    "AlphaEdit (GPT2-XL)": {"efficacy": 99.50, "generalisation": 93.95, "specificity": 66.39,
                            "fluency": 597.9},
    "MEMIT (GPT2-XL)": {"efficacy": 94.70, "generalisation": 85.82, "specificity": 60.50,
                        "fluency": 477.3},
}


def _options(model: Any, method: str, settings: list[str]) -> dict[str, Any]:
    if method == "rome":
        return {}
    cls = rome_lens.AlphaEditHyperParams if method == "alphaedit" else rome_lens.MemitHyperParams
    return {"hparams": hparams_from(cls, model, settings), "cache_targets": True,
            "progress": False}


def _sequence(model: Any, method: str, folder: Path, options: dict[str, Any]) -> Any:
    """The method's sequence: replayed from ``folder`` if an earlier run saved one."""
    if (folder / "sequence.json").exists():
        return rome_lens.EditSequence.load(folder, model, monitor=True, **options)
    return rome_lens.EditSequence(model, method, monitor=True, **options)


def run_method(model: Any, method: str, args: argparse.Namespace, facts: list[Any],
               rows: list[dict], budget: Budget) -> None:
    """Grow the method's sequence batch by batch, scoring after each; revert at the end."""
    folder = args.out.parent / "cache" / f"{args.out.name}-{method}"
    total = args.rome_edits if method == "rome" else args.edits
    step = 1 if method == "rome" else args.batch
    every = args.rome_every if method == "rome" else 1
    seq = _sequence(model, method, folder, _options(model, method, args.settings))
    try:
        while len(seq.requests) < min(total, len(facts)) and not budget.spent():
            first = len(seq.requests)
            batch = facts[first : first + step]
            t0 = time.perf_counter()
            seq.add([r.request for r in batch])
            seconds = time.perf_counter() - t0
            seq.save(folder, overwrite=True)
            n = len(seq.requests)
            row: dict[str, Any] = {"method": method, "edits": n, "seconds": seconds,
                                   "health": seq.health[-1].to_dict(),
                                   "peak_gib": peak_memory_gib()}
            if (n // step) % every == 0 or n >= total:
                row["scores"] = score_all(model, facts[:n], args.generation_records)
            append_row(args.out.with_suffix(".jsonl"), row)
            rows.append(row)
    finally:
        seq.revert()


def curves(rows: list[dict], unedited: dict[str, float]) -> dict[str, list[dict]]:
    """Per method: the summary after each scored batch."""
    out: dict[str, list[dict]] = {}
    for r in rows:
        if r["method"] in ("rome", "memit", "alphaedit") and "scores" in r:
            s = summary(r["scores"])
            s |= {"edits": r["edits"], "flagged": bool(r["health"].get("reasons"))}
            out.setdefault(r["method"], []).append(s)
    for points in out.values():
        points.sort(key=lambda p: p["edits"])
    out["unedited"] = [unedited]
    return out


def plot(data: dict[str, list[dict]], path: Path) -> None:
    """ES / PS / NS / GE against the number of edits, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for ax, key in zip(axes, ("ES", "PS", "NS", "GE"), strict=True):
        for method, points in data.items():
            if method == "unedited":
                ax.axhline(points[0][key], color="grey", ls="--", label="unedited")
                continue
            ax.plot([p["edits"] for p in points], [p[key] for p in points], marker="o",
                    label=method)
        ax.set_title(key)
        ax.set_xlabel("facts edited")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", nargs="+", default=["alphaedit", "memit", "rome"],
                        choices=["alphaedit", "memit", "rome"])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--edits", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--rome-edits", type=int, default=200)
    parser.add_argument("--rome-every", type=int, default=20)
    parser.add_argument("--generation-records", type=int, default=10)
    parser.add_argument("--set", dest="settings", action="append", default=[])
    parser.add_argument("--data", type=Path, default=TRAIN)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--max-minutes", type=float, default=None)
    args = parser.parse_args()
    budget = Budget(args.max_minutes)
    model = load_model()
    facts = known_facts(model, max(args.n, args.edits), args.data, FACTS)
    rows = read_rows(args.out.with_suffix(".jsonl"))
    done = [r for r in rows if r["method"] == "none"]
    if not done:
        done = [{"method": "none", "scores": score_all(model, facts[: args.edits],
                                                       args.generation_records)}]
        append_row(args.out.with_suffix(".jsonl"), done[0])
    for method in args.methods:
        if not budget.spent():
            run_method(model, method, args, facts, rows, budget)
    data = curves(rows, summary(done[0]["scores"]))
    result = {"benchmark": "sequential_editing", "model": rome_lens.DEFAULT_MODEL,
              "batch": args.batch, "curves": data, "paper": PAPER,
              "peak_memory_gib": max([r.get("peak_gib", 0.0) for r in rows] + [0.0]),
              "provenance": provenance(seed=0)}
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    plot(data, args.out.with_suffix(".png"))
    for method, points in data.items():
        last = points[-1]
        print(f"{method:10s} edits {last.get('edits', 0):5d} ES {last['ES']:5.1f} "
              f"PS {last['PS']:5.1f} NS {last['NS']:5.1f} GE {last['GE']:6.1f}")
    if budget.spent():
        print("stopped by --max-minutes; run the same command again to continue")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
