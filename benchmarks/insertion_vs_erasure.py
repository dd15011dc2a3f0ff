"""Insertion vs. erasure: does the original fact survive ROME edits with different objectives?

For each CounterFact dev record the model knows (p(true) > p(new) on the prompt, and the true
object in the top 10 of the output), three edits are computed at the default layer, one per
objective: ``insertion`` (error injection, ROME's default), ``erasure`` (Fact Erasure) and
``max_entropy`` (Patil et al.'s defence). Each is probed with :func:`rome_lens.probe_edit`
(edit prompt, the record's first paraphrase when it contains the subject, one context variant;
logit and tuned lens). The JSON reports per objective: verdict counts, Head Projection and
Probability Delta AttackSuccess@B, and the fraction of facts whose original object is still in
the top k at the last token at some layer >= L, next to Patil et al.'s published figures
(REFERENCE.md §4). Per-(record, objective) results go to a JSONL file, so the run resumes.

The Eiffel Tower -> Rome edit is probed first (plots and full reports for each objective).

Usage:
    python benchmarks/insertion_vs_erasure.py [--n 50] [--objectives insertion erasure ...]
        [--out benchmarks/results/insertion_vs_erasure.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).parent))
from _provenance import provenance  # noqa: E402

import rome_lens  # noqa: E402
from rome_lens import EditRequest  # noqa: E402
from rome_lens import evaluation as ev  # noqa: E402
from rome_lens.audit import probe_edit, tuned_lens  # noqa: E402
from rome_lens.predict import next_token_logprobs  # noqa: E402
from rome_lens.requests import target_tokens  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "counterfact-dev.json"
OBJECTIVES = ("insertion", "erasure", "max_entropy")
BUDGETS = (1, 5, 10, 20)
PATIL_2023 = {
    "source": "Patil, Hase, Bansal 2023 (REFERENCE.md §4)",
    "rome_deletion_gptj_attack_success_at_20": 0.38,
    "head_projection_counterfact_rome": {"no_defence": 0.222, "max_entropy": 0.017},
}
EIFFEL = EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome", "Paris")
EIFFEL_PARAPHRASES = ["The Eiffel Tower, a famous landmark, is in the city of"]
EIFFEL_CONSISTENCY = [
    ("The Eiffel Tower is located in the country of", "France", "Italy"),
    ("To see the Eiffel Tower, you have to travel to the city of", "Paris", "Rome"),
    ("The Louvre is located in the city of", "Paris", "Rome"),
]


def probe_one(model: Any, request: EditRequest, objective: str, lens: Any,
              paraphrases: list[str], consistency: list[tuple[str, str, str]] | None = None,
              baseline: Any = None) -> tuple[Any, dict[str, Any]]:
    t0 = time.perf_counter()
    edit = rome_lens.compute_rome(model, request, objective=objective)  # type: ignore[arg-type]
    t_edit = time.perf_counter() - t0
    t0 = time.perf_counter()
    report = probe_edit(model, edit, paraphrases=paraphrases, n_contexts=1, lens=lens,
                        consistency=consistency or (), baseline=baseline)
    t_probe = time.perf_counter() - t0
    row = report.summary() | {"objective": objective, "edit_s": t_edit, "probe_s": t_probe,
                              "edit_layer": edit.layer, "losses": edit.info["losses"][::5]}
    return report, row


def aggregate(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for objective in OBJECTIVES:
        rs = [r for r in rows if r["objective"] == objective]
        if not rs:
            continue
        n = len(rs)
        verdicts = {v: sum(r["verdict"] == v for r in rs) for v in ("INSERTION", "PARTIAL",
                                                                      "ERASURE")}
        attacks = {a: {str(b): sum(r["attacks"][a][str(b)] for r in rs) / n for b in BUDGETS}
                   for a in ("head_projection", "probability_delta")}
        top_k_last = {str(k): sum(0 < r["old_best_rank_post_last_token"] <= k for r in rs) / n
                      for k in (1, 5, 10, 20)}
        out[objective] = {
            "n": n,
            "verdicts": verdicts,
            "attack_success": attacks,
            "old_top_k_at_last_token_some_layer_ge_L": top_k_last,
            "new_wins_at_output": sum(r["output"]["post_new"] > r["output"]["post_old"]
                                      for r in rs) / n,
            "mean_p_old_output_pre": sum(r["output"]["pre_old"] for r in rs) / n,
            "mean_p_old_output_post": sum(r["output"]["post_old"] for r in rs) / n,
            "median_edit_s": sorted(r["edit_s"] for r in rs)[n // 2],
            "median_probe_s": sorted(r["probe_s"] for r in rs)[n // 2],
        }
    return out


def plot(agg: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    objectives = list(agg)
    colors = {"INSERTION": "tab:red", "PARTIAL": "tab:orange", "ERASURE": "tab:green"}
    bottom = [0.0] * len(objectives)
    for verdict, color in colors.items():
        vals = [agg[o]["verdicts"][verdict] / agg[o]["n"] for o in objectives]
        axes[0].bar(objectives, vals, bottom=bottom, color=color, label=verdict)
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    axes[0].set_ylabel("fraction of facts")
    axes[0].set_title("verdicts", fontsize=10)
    axes[0].legend(fontsize=8)
    for o in objectives:
        for attack, ls in (("head_projection", "-"), ("probability_delta", "--")):
            axes[1].plot(BUDGETS, [agg[o]["attack_success"][attack][str(b)] for b in BUDGETS],
                         ls=ls, marker="o", label=f"{o}: {attack.replace('_', ' ')}")
    axes[1].axhline(PATIL_2023["rome_deletion_gptj_attack_success_at_20"], color="k", lw=0.6,
                    ls=":", label="Patil et al.: 38% @20 (GPT-J)")
    axes[1].set_xlabel("budget B")
    axes[1].set_ylabel("AttackSuccess@B")
    axes[1].set_title("white-box extraction of the original object", fontsize=10)
    axes[1].legend(fontsize=6)
    n = max(agg[o]["n"] for o in objectives)
    fig.suptitle(f"insertion vs erasure on {rome_lens.DEFAULT_MODEL} ({n} facts)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=50)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--objectives", nargs="+", default=list(OBJECTIVES))
    parser.add_argument("--skip-eiffel", action="store_true")
    parser.add_argument("--aggregate-only", action="store_true",
                        help="only summarise the JSONL's rows (every objective) into the JSON")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="start no new fact after this many minutes; rerun to resume")
    parser.add_argument("--out", type=Path,
                        default=Path("benchmarks/results/insertion_vs_erasure.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    model = rome_lens.load_model()
    t0 = time.perf_counter()
    lens = tuned_lens(model)
    lens_s = time.perf_counter() - t0

    eiffel: dict[str, Any] = {}
    if args.skip_eiffel and args.out.exists():  # keep the Eiffel section of an earlier run
        eiffel = json.loads(args.out.read_text()).get("eiffel", {})
    if not args.skip_eiffel:
        base = None
        for objective in args.objectives:
            report, row = probe_one(model, EIFFEL, objective, lens, EIFFEL_PARAPHRASES,
                                    EIFFEL_CONSISTENCY, baseline=base)
            base = base or report
            report.plot(str(args.out.with_name(f"{args.out.stem}_eiffel_{objective}.png")))
            report.to_dataframe().to_csv(
                args.out.with_name(f"{args.out.stem}_eiffel_{objective}.csv"), index=False)
            eiffel[objective] = row | {"consistency": report.consistency,
                                       "prompts": report.prompts}
            print(json.dumps({objective: {k: row[k] for k in
                                          ("verdict", "old_best_rank_post",
                                           "old_best_rank_post_last_token", "output",
                                           "attacks")}}), flush=True)

    jsonl = args.out.with_suffix(".jsonl")
    done: dict[str, dict[str, Any]] = {}
    if jsonl.exists():
        for line in jsonl.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                done[f"{row['case_id']}|{row['objective']}"] = row
    records = []
    candidates = ([] if args.aggregate_only or args.n <= 0
                  else ev.known_records(model, ev.load_counterfact(args.data), 4 * args.n))
    for rec in candidates:
        logp = next_token_logprobs(model, rec.request.text)
        true_first = int(target_tokens(model, rec.target_true)[0])
        if int((logp > logp[true_first]).sum()) < 10:  # true object in the output's top 10
            records.append(rec)
        if len(records) >= args.n:
            break
    started = time.perf_counter()
    with jsonl.open("a") as sink:
        for rec in tqdm(records, desc="facts"):
            budget = args.max_minutes
            if budget is not None and time.perf_counter() - started > 60 * budget:
                logging.warning("time budget of %.0f min reached; rerun to resume", budget)
                break
            paraphrases = [p for p in rec.paraphrase_prompts[:1] if rec.request.subject in p]
            base = None  # the first probe's pre-edit and control cells serve the other objectives
            for objective in args.objectives:
                key = f"{rec.case_id}|{objective}"
                if key in done:
                    continue
                try:
                    report, row = probe_one(model, rec.request, objective, lens, paraphrases,
                                            baseline=base)
                    base = base or report
                except rome_lens.RomeLensError as exc:
                    row = {"objective": objective, "skipped": str(exc)}
                row["case_id"] = rec.case_id
                done[key] = row
                sink.write(json.dumps(row) + "\n")
                sink.flush()
    if args.aggregate_only:  # every row of the JSONL, all objectives
        rows = [r for r in done.values() if "skipped" not in r]
        n_facts = len({r["case_id"] for r in rows})
    else:
        keys = {f"{r.case_id}|{o}" for r in records for o in args.objectives}
        rows = [r for k, r in done.items() if k in keys and "skipped" not in r]
        n_facts = len(records)
    agg = aggregate(rows)
    if agg:
        plot(agg, args.out.with_name(args.out.stem + ".png"))
    result = {
        "benchmark": "insertion_vs_erasure",
        "model": rome_lens.DEFAULT_MODEL,
        "n_facts": n_facts,
        "tuned_lens": {"load_or_train_s": lens_s, "info": lens.info},
        "eiffel": eiffel,
        "by_objective": agg,
        "published": PATIL_2023,
        "provenance": provenance(seed=0),
    }
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(agg, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
