"""Batch editing: MEMIT at batch sizes 1, 10, 100, 1000 vs ROME applied one by one.

Facts: the first N records of counterfact-train.json that the unedited model knows (p(true) >
p(new) on the edit prompt), one per subject. For each MEMIT batch size b, facts are edited b at a
time from the unedited model (sizes below ``--small`` run ``--small // b`` disjoint batches so
small sizes are not judged on one batch), and every edited fact is scored with the batch
applied: ES, PS, NS, S and fluency (GE of seeded generations, first ``--generation-records``
facts of each batch). ROME is the baseline: the first ``--rome-n`` facts edited one after
another (each edit computed with the earlier ones applied), all scored at the end, and its
median seconds per edit is the "one ROME edit" time that MEMIT's seconds per fact are compared
with, in the same run.

Targets z are cached per base model, request and hyperparameters (``cache_targets``), so batch
sizes share them; their optimisation time is recorded with them, so a resumed run still reports
the full cost. Rows go to ``<out>.jsonl`` as they are done (resumable); ``--max-minutes`` stops
cleanly between units of work. Run alone (2 cores).

Usage:
    python benchmarks/batch_editing.py --n 1000 --sizes 1 10 100 1000 --rome-n 100 \\
        [--set mom2_update_weight=15000 --set 'layers=[1,2,3,4]'] [--max-minutes 170]
"""

from __future__ import annotations

import argparse
import statistics
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

OUT = Path("benchmarks/results/batch_editing")
PAPER = {  # REFERENCE.md §6, CounterFact 10,000 edits at once on GPT-J
    "MEMIT (GPT-J, 10k)": {"S": 85.8, "ES": 98.9, "PS": 88.6, "NS": 73.7, "NS_unedited": 83.5},
    "ROME one by one (GPT-J, 10k)": {"S": 50.3},
}


def batches_of(facts: list[Any], size: int, small: int) -> list[list[Any]]:
    """Disjoint batches of ``size`` facts: ``small // size`` of them for small sizes, else one."""
    count = max(1, small // size) if size < small else 1
    return [facts[i * size : (i + 1) * size] for i in range(count)
            if len(facts[i * size : (i + 1) * size]) == size]


def warm_targets(model: Any, facts: list[Any], hp: Any, budget: Budget, step: int = 100) -> bool:
    """Optimise (and cache) the targets of ``facts`` ``step`` at a time, within the budget.

    A large batch is one ``compute_edit`` call; warming its targets first lets ``--max-minutes``
    stop between chunks. Returns whether every target is cached.
    """
    from rome_lens.methods.targets import optimise_targets, request_chunks

    for first in range(0, len(facts), step):
        if budget.spent():
            return False
        chunks = request_chunks(model, [r.request for r in facts[first : first + step]], hp)
        optimise_targets(model, chunks, hp, hp.layers[-1], cache=True, progress=True)
    return True


def run_memit(model: Any, args: argparse.Namespace, facts: list[Any], rows: list[dict],
              budget: Budget, hp: Any) -> None:
    """One row per (size, batch): edit from the unedited model, score, revert."""
    done = {(r["size"], r["batch"]) for r in rows if r["method"] == "memit"}
    for size in args.sizes:
        for j, batch in enumerate(batches_of(facts, size, args.small)):
            if (size, j) in done:
                continue
            if budget.spent() or not warm_targets(model, batch, hp, budget):
                return
            t0 = time.perf_counter()
            edit = rome_lens.compute_edit(model, [r.request for r in batch], method="memit",
                                          hparams=hp, cache_targets=True)
            wall = time.perf_counter() - t0
            cost = edit.info["target_seconds"] + edit.info["timings"]["spread_s"]
            with edit.applied(model):
                scores = score_all(model, batch, args.generation_records)
            row = {"method": "memit", "size": size, "batch": j,
                   "case_ids": [r.case_id for r in batch],
                   "seconds_per_fact": cost / size, "wall_s": wall, "scores": scores,
                   "cached_targets": edit.info["cached_targets"],
                   "fit_errors": edit.info["fit_errors"], "peak_gib": peak_memory_gib()}
            append_row(args.out.with_suffix(".jsonl"), row)
            rows.append(row)


def run_rome(model: Any, args: argparse.Namespace, facts: list[Any], rows: list[dict],
             budget: Budget) -> None:
    """ROME one by one on the first ``--rome-n`` facts (edit files kept to resume), then score."""
    folder = args.out.parent / "cache" / f"{args.out.name}-rome"
    folder.mkdir(parents=True, exist_ok=True)
    timed = [r for r in rows if r["method"] == "rome-edit"]
    for row in timed:  # replay the edits of an interrupted run, in order
        rome_lens.load_edit(folder / row["file"], model=model).apply(model)
    for i in range(len(timed), min(args.rome_n, len(facts))):
        if budget.spent():
            break
        t0 = time.perf_counter()
        edit = rome_lens.compute_edit(model, facts[i].request, method="rome")
        seconds = time.perf_counter() - t0
        edit.apply(model)
        name = f"{i:05d}-{edit.id}.safetensors"
        edit.save(folder / name)
        row = {"method": "rome-edit", "index": i, "file": name, "seconds": seconds}
        append_row(args.out.with_suffix(".jsonl"), row)
        rows.append(row)
    n = len([r for r in rows if r["method"] == "rome-edit"])
    if n == min(args.rome_n, len(facts)) and not any(r["method"] == "rome" for r in rows):
        scores = score_all(model, facts[:n], args.generation_records)
        row = {"method": "rome", "size": n, "batch": 0, "scores": scores,
               "peak_gib": peak_memory_gib()}
        append_row(args.out.with_suffix(".jsonl"), row)
        rows.append(row)
    rome_lens.edits.revert_all(model)


def run_unedited(model: Any, args: argparse.Namespace, facts: list[Any], rows: list[dict]) -> None:
    """Score the unedited model on the facts no earlier run scored."""
    seen = {x["case_id"] for r in rows if r["method"] == "none" for x in r["scores"]}
    missing = [f for f in facts if f.case_id not in seen]
    if missing:
        row = {"method": "none", "scores": score_all(model, missing, args.generation_records)}
        append_row(args.out.with_suffix(".jsonl"), row)
        rows.append(row)


def report(args: argparse.Namespace, rows: list[dict], hp: Any, n_facts: int) -> dict:
    """Summaries per method and size, the speed ratio, memory, provenance."""
    out: dict[str, Any] = {"benchmark": "batch_editing", "model": rome_lens.DEFAULT_MODEL,
                           "facts": n_facts, "hparams": hp.to_dict(), "paper": PAPER}
    table: dict[str, Any] = {}
    unedited: dict[int, dict] = {}
    for r in rows:
        if r["method"] == "none":
            unedited |= {x["case_id"]: x for x in r["scores"]}
    if unedited:
        table["unedited"] = summary(unedited.values())
    for size in args.sizes:
        sized = [r for r in rows if r["method"] == "memit" and r["size"] == size]
        if sized:
            s = summary([x for r in sized for x in r["scores"]])
            same = [unedited[x["case_id"]] for r in sized for x in r["scores"]
                    if x["case_id"] in unedited]
            if same:  # the unedited model on the same facts
                s["NS_unedited"], s["GE_unedited"] = summary(same)["NS"], summary(same)["GE"]
            s["seconds_per_fact"] = statistics.fmean(r["seconds_per_fact"] for r in sized)
            s["batches"] = len(sized)
            table[f"memit-{size}"] = s
    rome_rows = [r for r in rows if r["method"] == "rome"]
    rome_times = [r["seconds"] for r in rows if r["method"] == "rome-edit"]
    if rome_rows:
        table[f"rome-sequential-{rome_rows[0]['size']}"] = summary(rome_rows[0]["scores"])
    if rome_times:
        out["rome_median_seconds_per_edit"] = statistics.median(rome_times)
        for key, s in table.items():
            if key.startswith("memit-"):
                s["seconds_ratio_to_rome"] = s["seconds_per_fact"] / statistics.median(rome_times)
    out["table"] = table
    out["peak_memory_gib"] = max([r.get("peak_gib", 0.0) for r in rows] + [peak_memory_gib()])
    out["provenance"] = provenance(seed=0)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 10, 100, 1000])
    parser.add_argument("--small", type=int, default=30)
    parser.add_argument("--rome-n", type=int, default=100)
    parser.add_argument("--generation-records", type=int, default=10)
    parser.add_argument("--set", dest="settings", action="append", default=[])
    parser.add_argument("--data", type=Path, default=TRAIN)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--max-minutes", type=float, default=None)
    parser.add_argument("--skip", nargs="*", default=[], choices=["memit", "rome", "none"])
    args = parser.parse_args()
    budget = Budget(args.max_minutes)
    model = load_model()
    hp = hparams_from(rome_lens.MemitHyperParams, model, args.settings)
    facts = known_facts(model, args.n, args.data, args.out.with_suffix(".facts.json"))
    rows = read_rows(args.out.with_suffix(".jsonl"))
    if "none" not in args.skip:
        run_unedited(model, args, facts, rows)
    if "memit" not in args.skip:
        run_memit(model, args, facts, rows, budget, hp)
    if "rome" not in args.skip:
        run_rome(model, args, facts, rows, budget)
    result = report(args, rows, hp, len(facts))
    args.out.with_suffix(".json").write_text(__import__("json").dumps(result, indent=1))
    for key, s in result["table"].items():
        print(f"{key:24s} ES {s['ES']:5.1f} PS {s['PS']:5.1f} NS {s['NS']:5.1f} S {s['S']:5.1f} "
              f"GE {s['GE']:6.1f} s/fact {s.get('seconds_per_fact', float('nan')):6.2f}")
    if budget.spent():
        print("stopped by --max-minutes; run the same command again to continue")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
