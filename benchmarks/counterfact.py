"""CounterFact evaluation: ES / PS / NS / S of ROME edits (one at a time, reverted in between).

Takes the first N records that the unedited model gets right (mean-token p(true) > p(new) on the
edit prompt), edits each with ROME at the given layer, scores it, reverts, and writes a table in
the paper's format with 95% bootstrap confidence intervals. Per-record results are appended to a
JSONL file as they come, so an interrupted run resumes where it stopped.

Methods: ``none`` (unedited), ``rome``, ``ft-l`` (fine-tuning of the same W_out with an
L-infinity bound); ``--generation`` adds fluency (n-gram entropy GE of seeded generations) for
the first ``--generation-records`` records. Rows go to ``<out>.L<layer>.<method>.jsonl``; rows of
the session-1 layout (``<out>.L<layer>.jsonl``, before/after per line) are reused.

``--workers N`` spreads the records over N Ray actors (``rome_lens.parallel.map_records``: each
loads the model once, records sharded by index, rows appended in record order as they arrive:
the same JSONL as ``--workers 1``, which runs in this process without Ray; bit for bit when the
torch threads per process are equal, e.g. ``--workers 1 --threads 1`` vs ``--workers 2`` on
two cores).
``--ray-address`` runs them on a Ray cluster. ``--model tiny`` runs a tiny random model with
small ROME settings (a smoke test of this script, seconds).

Usage:
    python benchmarks/counterfact.py --n 200 [--method none rome ft-l] [--layer L]
        [--generation] [--data PATH] [--json benchmarks/results/counterfact.json]
        [--workers N] [--ray-address ADDR] [--model embedded|tiny|NAME]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from _many import add_worker_args, load_named, tiny_settings  # noqa: E402
from _provenance import provenance  # noqa: E402

import rome_lens  # noqa: E402
from rome_lens import evaluation as ev  # noqa: E402
from rome_lens.baselines import compute_ft_l  # noqa: E402
from rome_lens.parallel import WorkerPool  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "counterfact-dev.json"
PAPER_GPT2_XL = {
    "unedited": {"S": 30.5, "ES": 22.2, "PS": 24.7, "NS": 78.1, "GE": 626.6},
    "ROME": {"S": 89.2, "ES": 100.0, "PS": 96.4, "NS": 75.4, "GE": 621.9},
    "FT-L": {"S": 66.9, "PS": 48.7},
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


METHODS = {"none": "unedited", "rome": "ROME", "ft-l": "FT-L"}


def load(name: str) -> Any:
    """The model: ``embedded`` (default), ``tiny``, or a name for load_model (each worker too)."""
    return load_named(name, "counterfact")[0]


def fits(model: Any, rec: ev.CounterFactRecord, margin: int = 16) -> bool:
    """Whether every scored prompt with its longer target (and ROME's context prefixes) fits
    the context window (the tiny model's is 128 characters)."""
    target = max(rec.target_new, rec.target_true, key=len)
    prompts = [rec.request.text, *rec.paraphrase_prompts, *rec.neighborhood_prompts]
    longest = max(len(model.to_tokens(p + " " + target, truncate=False)[0]) for p in prompts)
    return longest + margin <= model.cfg.n_ctx


def run_method(
    model, rec: ev.CounterFactRecord, method: str, layer: int, generate: bool, gen_tokens: int,
    tiny: bool = False,
) -> dict:
    """Score one record under one method (edit, score, revert)."""
    t0 = time.perf_counter()
    if method == "none":
        scores = ev.score_record(model, rec, generate, gen_tokens=gen_tokens)
        scores.seconds = 0.0
        return dataclasses.asdict(scores)
    if method == "rome" and tiny:
        hp = rome_lens.RomeHyperParams(layer=layer, **tiny_settings(False))
        edit = rome_lens.compute_rome(model, rec.request, hparams=hp)
    elif method == "rome":
        edit = rome_lens.compute_rome(model, rec.request, layer=layer)
    else:
        edit = compute_ft_l(model, rec.request, layer=layer)
    seconds = time.perf_counter() - t0
    with edit.applied(model):
        scores = ev.score_record(model, rec, generate, gen_tokens=gen_tokens)
    scores.seconds = seconds
    return dataclasses.asdict(scores)


def run_job(model, job: tuple[ev.CounterFactRecord, bool], **options: Any) -> dict:
    """:func:`run_method` of one (record, generate) job: the per-record function of the sweep."""
    rec, generate = job
    return run_method(model, rec, generate=generate, **options)


def append_row(sink, jobs: list[tuple[ev.CounterFactRecord, bool]], done: dict[int, dict],
               i: int, row: dict) -> None:
    """Append the row of job ``i`` to the JSONL (flushed: a killed run resumes after it)."""
    sink.write(json.dumps(row) + "\n")
    sink.flush()
    done[jobs[i][0].case_id] = row


def load_rows(path: Path, legacy: Path | None, method: str) -> dict[int, dict]:
    """Rows already computed; the session-1 layout (before/after per line) is read too."""
    done: dict[int, dict] = {}
    if legacy is not None and legacy.exists() and method in ("none", "rome"):
        for line in legacy.read_text().splitlines():
            row = json.loads(line)
            done[row["case_id"]] = row["before" if method == "none" else "after"]
    if path.exists():
        for line in path.read_text().splitlines():
            row = json.loads(line)
            done[row["case_id"]] = row
    return done


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--layer", type=int, default=None)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--method", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--generation", action="store_true",
                        help="also generate (2 prompts x --gen-tokens) for fluency GE")
    parser.add_argument("--generation-records", type=int, default=50,
                        help="with --generation: generate for the first N records only "
                             "(-1: all); generation costs ~10 s per record and method on CPU")
    parser.add_argument("--gen-tokens", type=int, default=50)
    parser.add_argument("--out", "--json", type=Path,
                        default=Path("benchmarks/results/counterfact.json"))
    parser.add_argument("--model", default="embedded",
                        help="'embedded' (gemma-3-270m), 'tiny' (smoke test), or a load_model name")
    add_worker_args(parser)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    model, label = load_named(args.model, "counterfact")
    tiny = args.model == "tiny"
    layer = args.layer if args.layer is not None else rome_lens.default_hparams(model).layer
    records = ev.load_counterfact(args.data)
    if tiny:
        records = [r for r in records if fits(model, r)]
    known = ev.known_records(model, records, args.n)
    if args.workers > 1 or args.ray_address is not None:
        model = None  # the workers load their own; do not hold a third copy here
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tables: dict[str, object] = {}
    medians: dict[str, float] = {}
    wall: dict[str, float] = {}
    n_gen = 0
    if args.generation:
        n_gen = len(known) if args.generation_records < 0 else args.generation_records
    with WorkerPool(functools.partial(load, args.model), workers=args.workers,
                    address=args.ray_address, model=model, threads=args.threads) as pool:
        for method in args.method:
            path = args.out.with_suffix(f".L{layer}.{method}.jsonl")
            legacy = args.out.with_suffix(f".L{layer}.jsonl")
            done = load_rows(path, legacy, method)
            jobs = []
            for i, rec in enumerate(known):
                generate = i < n_gen
                row = done.get(rec.case_id)
                if row is None or (generate and row.get("fluency") is None):
                    jobs.append((rec, generate))
            t0 = time.perf_counter()
            with path.open("a") as sink:
                keep = functools.partial(append_row, sink, jobs, done)
                fn = functools.partial(run_job, method=method, layer=layer,
                                       gen_tokens=args.gen_tokens, tiny=tiny)
                pool.map(fn, jobs, on_result=keep, desc=f"{METHODS[method]} L{layer}")
            wall[METHODS[method]] = time.perf_counter() - t0
            scores = [ev.RecordScores(**done[r.case_id]) for r in known]
            tables[METHODS[method]] = table(scores)
            if method != "none":
                # Timings of this code only: session-1 rows were timed with an older, slower loop.
                fresh = [row["seconds"] for row in load_rows(path, None, method).values()]
                medians[METHODS[method]] = statistics.median(fresh or [s.seconds for s in scores])
    result = {
        "benchmark": "counterfact",
        "model": label,
        "layer": layer,
        "n_records": len(known),
        "selection": f"first {args.n} records of {args.data.name} with p(true) > p(new) unedited",
        "generation": {"enabled": args.generation, "records": n_gen,
                       "tokens": args.gen_tokens, "sampling": "top-k 5, seeded",
                       "prompts": "edit prompt + first paraphrase (flat layout has none)"},
        **tables,
        "paper_gpt2_xl": PAPER_GPT2_XL,
        "median_seconds_per_edit": medians,
        "workers": args.workers,
        "threads": args.threads,
        "wall_seconds": wall,
        "provenance": provenance(seed=0),
    }
    args.out.write_text(json.dumps(result, indent=1))
    print(f"{'method':9s} {'S':>5s} {'ES':>5s} {'PS':>5s} {'NS':>5s} {'GE':>6s} {'s/edit':>6s}")
    for name, tab in tables.items():
        s = tab["summary"]  # type: ignore[index]
        print(f"{name:9s} {s['S']:5.1f} {s['ES']:5.1f} {s['PS']:5.1f} {s['NS']:5.1f} "
              f"{s['GE']:6.1f} {medians.get(name, 0.0):6.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
