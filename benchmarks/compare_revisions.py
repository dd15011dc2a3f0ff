"""Old commit against new, side by side in one run: ROME edit speed and CounterFact scores.

A redesign must keep behaviour. This script checks an older revision out beside the working
tree (``git worktree``), starts one worker process per revision (each loads the model once),
and sends them the same CounterFact records in turn (old first on even records, new first on odd
ones, so drift in machine load hits both alike). Only one worker computes at a time.

Per record and revision: seconds per ROME edit at the default layer (key statistics passed in,
as ``edit_speed.py`` does), ES / PS / NS of the edited model, and the edit's factors (to compare
the numbers). The new revision also times edits computed while another edit is applied (the
default statistics path: nothing may be recomputed) against first edits on a warm cache.
Rows are appended to a JSONL file as they come (resumable); the summary goes to ``--out``.

Usage:
    python benchmarks/compare_revisions.py --old 2b40c43 [--n 50] [--speed-n 10]
        [--second-n 5] [--out benchmarks/results/redesign_old_vs_new.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).parent))
from _provenance import provenance  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "counterfact-dev.json"
WORKER = Path(__file__).parent / "_revision_worker.py"


class Revision:
    """One worker process running the rome_lens of ``tree``."""

    def __init__(self, name: str, tree: Path) -> None:
        self.name, self.tree = name, tree
        env = {"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
        import os

        env = {**os.environ, **env}
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKER)], cwd=tree, env=env, text=True,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        )

    def call(self, op: str, **kwargs: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"op": op, **kwargs}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.name} died")
        return json.loads(line)

    def close(self) -> None:
        try:
            self.call("quit")
        except (RuntimeError, BrokenPipeError):
            pass
        self.proc.wait(timeout=60)


def checkout(rev: str) -> Path:
    sha = subprocess.run(["git", "rev-parse", "--short", rev], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout.strip()
    tree = Path(f"/tmp/rome_lens_rev_{sha}")
    if not tree.exists():
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), sha], cwd=ROOT,
                       check=True, capture_output=True)
    return tree


def load_rows(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def summarize(rows: list[dict[str, Any]], ids: list[int], speed_n: int) -> dict[str, Any]:
    from rome_lens import evaluation as ev

    out: dict[str, Any] = {}
    for name in ("old", "new"):
        mine = {r["case_id"]: r for r in rows if r["revision"] == name and r["kind"] == "edit"}
        done = [mine[i] for i in ids if i in mine]
        scores = [ev.RecordScores(**r["scores"]) for r in done]
        summary = ev.summarize(scores) if scores else {}
        out[name] = {
            "n_records": len(done),
            "median_s_per_edit_first_speed_n": statistics.median(
                r["seconds"] for r in done[:speed_n]) if done else None,
            "median_s_per_edit_all": statistics.median(r["seconds"] for r in done)
            if done else None,
            "summary": summary,
        }
    edits = [r for r in rows if r["kind"] == "edit"]
    both = [i for i in ids if any(r["case_id"] == i and r["revision"] == "old" for r in edits)
            and any(r["case_id"] == i and r["revision"] == "new" for r in edits)]
    out["same_digest"] = sum(_row(rows, "old", i)["digest"] == _row(rows, "new", i)["digest"]
                             for i in both)
    out["max_relative_right_difference"] = max(
        (float((torch.tensor(_row(rows, "old", i)["right"]) - torch.tensor(
            _row(rows, "new", i)["right"])).norm() / torch.tensor(
            _row(rows, "old", i)["right"]).norm()) for i in both), default=None)
    out["records_compared"] = len(both)
    out["records_with_different_scores"] = _differences(rows, both)
    return out


def _row(rows: list[dict[str, Any]], revision: str, case_id: int) -> dict[str, Any]:
    return next(r for r in rows if r["revision"] == revision and r["case_id"] == case_id
                and r["kind"] == "edit")


def _per_record(score: Any) -> dict[str, float]:
    """A record's ES (0/1), PS and NS (fractions of its prompts)."""
    def mean(values: list[bool]) -> float:
        return sum(values) / len(values) if values else float("nan")

    return {"ES": mean(score.efficacy), "PS": mean(score.paraphrase),
            "NS": mean(score.neighborhood)}


def _differences(rows: list[dict[str, Any]], ids: list[int]) -> dict[str, int]:
    """Records whose ES / PS / NS differ between the revisions."""
    from rome_lens import evaluation as ev

    out = {"ES": 0, "PS": 0, "NS": 0}
    for i in ids:
        old = _per_record(ev.RecordScores(**_row(rows, "old", i)["scores"]))
        new = _per_record(ev.RecordScores(**_row(rows, "new", i)["scores"]))
        for key in out:
            out[key] += old[key] != new[key]
    return out


def main() -> int:  # noqa: C901
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--old", required=True, help="git revision of the baseline")
    parser.add_argument("--n", type=int, default=50, help="known CounterFact records")
    parser.add_argument("--speed-n", type=int, default=10, help="records of the speed median")
    parser.add_argument("--second-n", type=int, default=5,
                        help="edits timed with another edit applied (new revision)")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--out", type=Path,
                        default=Path("benchmarks/results/redesign_old_vs_new.json"))
    parser.add_argument("--max-minutes", type=float, default=None)
    args = parser.parse_args()
    start = time.monotonic()
    jsonl = args.out.with_suffix(".jsonl")
    rows = load_rows(jsonl)
    revisions = {"old": Revision("old", checkout(args.old)), "new": Revision("new", ROOT)}
    try:
        for rev in revisions.values():
            rev.call("init", data=str(args.data), n_known=args.n)
        ids = revisions["new"].call("known")["case_ids"]
        with jsonl.open("a") as sink:
            for k, case_id in enumerate(tqdm(ids, desc="records")):
                order = ("old", "new") if k % 2 == 0 else ("new", "old")
                for name in order:
                    if any(r["case_id"] == case_id and r["revision"] == name
                           and r["kind"] == "edit" for r in rows):
                        continue
                    row = {"revision": name, "kind": "edit",
                           **revisions[name].call("edit", case_id=case_id,
                                                  keep=k < args.second_n + 1)}
                    rows.append(row)
                    sink.write(json.dumps(row) + "\n")
                    sink.flush()
                if args.max_minutes and time.monotonic() - start > 60 * args.max_minutes:
                    print("time budget reached; rerun to resume", flush=True)
                    break
            second = [r for r in rows if r["kind"] == "second"]
            for k in range(1, min(args.second_n + 1, len(ids))):
                if any(r["case_id"] == ids[k] for r in second):
                    continue
                new = revisions["new"]
                if ids[k - 1] not in new.call("kept")["case_ids"]:
                    new.call("edit", case_id=ids[k - 1], keep=True)
                first = new.call("first_edit_default_stats", case_id=ids[k])
                again = new.call("second_edit", applied_case=ids[k - 1], case_id=ids[k])
                row = {"revision": "new", "kind": "second", "case_id": ids[k],
                       "first_s": first["seconds"], "with_edit_applied_s": again["seconds"],
                       "stats_s": again["timings"]["stats_s"],
                       "first_stats_s": first["timings"]["stats_s"]}
                second.append(row)
                sink.write(json.dumps(row) + "\n")
                sink.flush()
        result = {
            "benchmark": "compare_revisions",
            "old_revision": args.old,
            "records": summarize(rows, ids, args.speed_n),
            "second_edit": {
                "rows": second,
                "median_first_s": statistics.median(r["first_s"] for r in second)
                if second else None,
                "median_with_edit_applied_s": statistics.median(
                    r["with_edit_applied_s"] for r in second) if second else None,
            },
            "workers": {name: rev.call("rss") for name, rev in revisions.items()},
            "provenance": provenance(seed=0),
        }
    finally:
        for rev in revisions.values():
            rev.close()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "provenance"}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
