"""zsRE evaluation: Reliability / Generalisation / Locality of single edits, per method.

Records (MEND layout, ``--data``): the first N that can be edited (the question contains the
subject and there is a new answer), in file order as EasyEdit evaluates them, or with
``--known`` the first N whose true answer the unedited model prefers (p(true) > p(new) on the
question). Each record is edited alone from the unedited model (``rome_lens.compute_edit`` with
the record's question as the prompt), scored with the edit applied, and reverted:
Reliability (question) and Generalisation (paraphrase) are the teacher-forced argmax accuracy
of the new answer's tokens, Locality the fraction of the unrelated NQ answer's positions whose
argmax is the unedited model's (MEND / EasyEdit), plus CounterFact's pairwise rule p(new) >
p(true) where the record has a true answer. The table (95% bootstrap CIs) sits beside
EasyEdit's published Llama-2-7B numbers (REFERENCE.md §7), a much larger model.

Rows go to ``<out>.<method>.jsonl`` as they are done (the unedited model's to
``<out>.none.jsonl``, the reference of Locality); a rerun resumes, and rows computed with other
settings (model, layer) are ignored. ``--max-minutes`` stops between records. ``--model tiny``
runs a tiny random model with small settings (a smoke test of this script, seconds per method).
``--workers N`` edits the records on N Ray actors (``rome_lens.parallel.WorkerPool``): each loads
the model once, rows are appended in record order, the same rows as ``--workers 1``.

Usage:
    python benchmarks/zsre.py --n 300 --method none rome memit alphaedit ft-l
        [--data PATH] [--layer L] [--known] [--max-minutes 170]
        [--model tiny] [--json benchmarks/results/zsre.json]
        [--workers N] [--ray-address ADDR] [--threads T]
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import random
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from _many import (  # noqa: E402
    Budget,
    add_worker_args,
    append_row,
    load_named,
    read_rows,
    tiny_settings,
)
from _provenance import provenance  # noqa: E402

import rome_lens  # noqa: E402
from rome_lens import evaluation as ev  # noqa: E402
from rome_lens.errors import RomeLensError  # noqa: E402
from rome_lens.parallel import WorkerPool  # noqa: E402
from rome_lens.predict import target_logprobs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "zsre-dev.json"
METHODS = {"none": "unedited", "rome": "ROME", "memit": "MEMIT", "alphaedit": "AlphaEdit",
           "ft-l": "FT-L"}
METRICS = ("Reliability", "Generalisation", "Locality")
# REFERENCE.md §7: EasyEdit's README, zsRE, Llama-2-7B, one edit at a time.
EASYEDIT_LLAMA2_7B = {
    "ROME": {"Reliability": 92.45, "Generalisation": 87.04, "Locality": 99.63,
             "Portability": 57.47},
    "MEMIT": {"Reliability": 92.94, "Generalisation": 85.97, "Locality": 99.49},
}
logger = logging.getLogger("benchmarks.zsre")


def load(name: str) -> tuple[Any, str]:
    """The model and its label: ``embedded`` (default), ``tiny``, or a name for load_model."""
    return load_named(name, "zsre")


def load_model_only(name: str) -> Any:
    """The model alone (what each Ray worker loads)."""
    return load(name)[0]


def method_options(method: str, model: Any, layer: int | None,
                   tiny: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """compute_edit options (the method's defaults, or small settings on the tiny model) and
    the settings that identify its rows."""
    if method in ("memit", "alphaedit"):
        options: dict[str, Any] = {"progress": False}
        if tiny:
            if method == "memit":
                hp = rome_lens.MemitHyperParams(layers=(1, 2), mom2_update_weight=1.0,
                                                **tiny_settings(True))
            else:
                hp = rome_lens.AlphaEditHyperParams(layers=(1, 2), nullspace_threshold=0.05,
                                                    alpha=1e-3, **tiny_settings(True))
            options["hparams"] = hp
        return options, {"layers": "tiny (1, 2)" if tiny else "default", "tiny": tiny}
    layer = layer if layer is not None else rome_lens.default_hparams(model).layer
    settings = {"layer": layer, "tiny": tiny}
    if method == "rome" and tiny:
        return {"hparams": rome_lens.RomeHyperParams(layer=layer, **tiny_settings(False))}, settings
    return {"layer": layer}, settings


def fits(model: Any, rec: ev.ZsreRecord, margin: int = 16) -> bool:
    """Whether every scored row (and ROME's context prefixes) fits the context window."""
    longest = max(len(model.to_tokens(p + " " + a, truncate=False)[0]) for p, a in (
        (rec.question, rec.target_new), (rec.rephrase, rec.target_new),
        (rec.loc, rec.loc_answer), (rec.question, rec.target_true or "x")))
    return longest + margin <= model.cfg.n_ctx


def select(model: Any, records: list[ev.ZsreRecord], n: int, known: bool) -> list[ev.ZsreRecord]:
    """The first ``n`` records, or the first ``n`` the unedited model knows."""
    if not known:
        return records[:n]
    chosen: list[ev.ZsreRecord] = []
    candidates = [r for r in records if r.target_true is not None]
    for start in range(0, len(candidates), 32):
        block = candidates[start : start + 32]
        pairs = [(r.question, t) for r in block for t in (r.target_new, r.target_true)]
        lps = target_logprobs(model, pairs)
        chosen += [r for i, r in enumerate(block) if lps[2 * i + 1] > lps[2 * i]]
        if len(chosen) >= n:
            break
    return chosen[:n]


def rows_for(path: Path, config: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """Rows already computed with the same settings, by record index."""
    done, other = {}, 0
    for row in read_rows(path):
        if row.get("config") == config:
            done[row["index"]] = row
        else:
            other += 1
    if other:
        logger.warning("%s: ignoring %d rows computed with other settings", path.name, other)
    return done


def unedited(model: Any, records: list[ev.ZsreRecord], path: Path,
             config: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """The unedited model's scores of every record (batched; computed once, then read)."""
    done = rows_for(path, config)
    missing = [r for r in records if r.index not in done]
    if missing:
        for scores in ev.score_zsre(model, missing, progress=True):
            row = {"config": config, **asdict(scores)}
            append_row(path, row)
            done[scores.index] = row
    return done


def edit_one(model: Any, job: tuple[ev.ZsreRecord, dict[str, Any]], method: str,
             config: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    """Edit, score and revert one record (the per-record function of the sweep)."""
    rec, reference = job
    row: dict[str, Any] = {"config": config, "index": rec.index}
    t0 = time.perf_counter()
    try:
        edit = rome_lens.compute_edit(model, rec.request, method=method, **options)
    except RomeLensError as exc:  # recorded, so a rerun does not retry it
        logger.warning("%s failed on record %d: %s", method, rec.index, exc)
        row["error"] = str(exc)
        return row
    seconds = time.perf_counter() - t0
    ref = ev.ZsreScores(**_fields(reference))
    with edit.applied(model):
        scores = ev.score_zsre(model, [rec], reference=[ref], progress=False)[0]
    scores.seconds = seconds
    return row | asdict(scores)


def keep_row(path: Path, done: dict[int, dict[str, Any]], i: int, row: dict[str, Any]) -> None:
    """Append a finished row (called in record order)."""
    append_row(path, row)
    done[row["index"]] = row


def run_method(pool: WorkerPool, method: str, records: list[ev.ZsreRecord],
               reference: dict[int, dict[str, Any]], path: Path, config: dict[str, Any],
               options: dict[str, Any], budget: Budget) -> dict[int, dict[str, Any]]:
    """Edit, score and revert each record not done yet (on the pool's workers); rows appended
    in record order as they come."""
    done = rows_for(path, config)
    jobs = [(r, reference[r.index]) for r in records if r.index not in done]
    fn = functools.partial(edit_one, method=method, config=config, options=options)
    pool.map(fn, jobs, on_result=functools.partial(keep_row, path, done),
             desc=METHODS[method], stop=budget.spent)
    return done


def _fields(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k not in ("config", "error")}


def table(rows: list[dict[str, Any]], n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Summary, 95% bootstrap CIs of the three metrics, and the count of failed edits."""
    scores = [ev.ZsreScores(**_fields(r)) for r in rows if "error" not in r]
    out: dict[str, Any] = {"summary": ev.summarize_zsre(scores),
                           "failed": sum("error" in r for r in rows)}
    if scores:
        rng = random.Random(seed)
        boots = [ev.summarize_zsre([scores[rng.randrange(len(scores))] for _ in scores])
                 for _ in range(n_boot)]
        out["ci95"] = {k: _interval([b[k] for b in boots]) for k in METRICS}
    return out


def _interval(values: list[float]) -> tuple[float, float]:
    values = sorted(values)
    return values[int(0.025 * len(values))], values[int(0.975 * len(values)) - 1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--method", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--layer", type=int, default=None, help="ROME and FT-L (default: the "
                        "model's ROME layer); MEMIT and AlphaEdit use their default range")
    parser.add_argument("--known", action="store_true",
                        help="only records whose true answer the unedited model prefers")
    parser.add_argument("--model", default="embedded",
                        help="'embedded' (gemma-3-270m), 'tiny' (smoke test), or a load_model name")
    parser.add_argument("--max-minutes", type=float, default=None)
    parser.add_argument("--out", "--json", type=Path, default=Path("benchmarks/results/zsre.json"))
    add_worker_args(parser)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    budget = Budget(args.max_minutes)

    model, label = load(args.model)
    tiny = args.model == "tiny"
    records = ev.load_zsre(args.data)
    if tiny:  # the tiny model's context is 128 characters
        records = [r for r in records if fits(model, r)]
    records = select(model, records, args.n, args.known)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    base = {"model": label, "data": args.data.name}
    reference = unedited(model, records, args.out.with_suffix(".none.jsonl"), base)
    settings = {m: method_options(m, model, args.layer, tiny) for m in args.method if m != "none"}
    if args.workers > 1 or args.ray_address is not None:
        model = None  # the workers load their own; do not hold a third copy here
    tables: dict[str, Any] = {}
    with WorkerPool(functools.partial(load_model_only, args.model), workers=args.workers,
                    address=args.ray_address, model=model, threads=args.threads) as pool:
        for method in args.method:
            if method == "none":
                rows = reference
            else:
                options, identity = settings[method]
                config = {**base, "method": method, **identity}
                rows = run_method(pool, method, records, reference,
                                  args.out.with_suffix(f".{method}.jsonl"), config, options,
                                  budget)
            tables[METHODS[method]] = table([rows[r.index] for r in records if r.index in rows])
    result = {
        "benchmark": "zsre",
        "model": label,
        "data": str(args.data),
        "n_records": len(records),
        "selection": (f"first {args.n} records of {args.data.name} with p(true) > p(new) "
                      "unedited" if args.known else
                      f"first {args.n} editable records of {args.data.name}, file order"),
        "protocol": "one edit at a time from the unedited model, scored applied, reverted",
        "layer": args.layer,
        **tables,
        "easyedit_llama2_7b": EASYEDIT_LLAMA2_7B,
        "complete": not budget.spent(),
        "provenance": provenance(seed=0),
    }
    args.out.write_text(json.dumps(result, indent=1))
    print(f"{'method':10s} {'n':>4s} {'Rel':>6s} {'Gen':>6s} {'Loc':>6s} {'pair':>6s} "
          f"{'s/edit':>6s}   EasyEdit Llama-2-7B Rel / Gen / Loc")
    for name, tab in tables.items():
        s = tab["summary"]
        paper = EASYEDIT_LLAMA2_7B.get(name)
        beside = " / ".join(f"{paper[k]:.2f}" for k in METRICS) if paper else "-"
        print(f"{name:10s} {int(s['n']):4d} {s['Reliability']:6.1f} {s['Generalisation']:6.1f} "
              f"{s['Locality']:6.1f} {s['pairwise']:6.1f} {s['seconds_per_edit']:6.1f}   {beside}")
    if budget.spent():
        print("stopped by --max-minutes; run the same command again to continue")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
