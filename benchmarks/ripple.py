"""Ripple effects: does an edit's consequence follow, and does the probe's verdict predict it?

Issue #16 items 3 and 4. For CounterFact edits the unedited model knows, RippleEdits' criteria
(:mod:`rome_lens.evaluation.ripple`: Compositionality I, subject aliasing, relation
specificity, preservation, forgetfulness) are scored after each method's edit; and for every
probed edit the probe's verdict (:func:`rome_lens.audit.probe_edit`: INSERTION, the original
object still decodable downstream, vs ERASURE / PARTIAL) and the original object's best rank
downstream are joined with the edit's compositional success.

Steps:

1. **Facts** (``--data``, CounterFact layout; default counterfact-dev then -train, which are
   also the pool the cases are built from): in file order, records whose relation has second
   hops (:data:`~rome_lens.evaluation.relations.SECOND_HOPS`), one per subject, that the
   unedited model knows (p(true) > p(new) on the prompt), scanned 64 at a time.
2. **Cases**, built ONCE on the unedited model, block by block
   (:func:`~rome_lens.evaluation.build_cases`, answers shared between blocks) and written to
   ``<out>.cases.jsonl`` (+ ``<out>.cases.meta.json``: settings, how far the scan got). The
   edits are the first ``--n`` scanned facts with at least one compositional case
   (``--all-facts``: with or without). A rerun with the same settings reuses the file and
   scans on only if more edits are needed.
3. **Edits**: per fact, per ``--method`` (rome, rome-erasure = ROME with the erasure objective,
   memit, alphaedit, ft-l; MEMIT / AlphaEdit with one request): the edit is computed from the
   unedited model, applied, the fact's cases and its edit-wise success (p(new) > p(true) on
   the edit prompt, MQuAKE's "edit-wise") are scored, optionally ``probe_edit`` runs
   (``--probe``, the default: edit prompt, first paraphrase, one context prefix; the fact's
   pre-edit and control cells are reused between methods), and the edit is reverted. Rows go
   to ``<out>.<method>.jsonl`` as they come; a rerun resumes, rows of other settings are
   ignored, a row without a probe is redone when ``--probe`` asks for one. ``--max-minutes``
   stops between edits.
4. **Report** (``<out>``, printed): accuracy per criterion and method with 95% bootstrap CIs
   beside RippleEdits' and MQuAKE's published numbers (REFERENCE.md §7, much larger models);
   and the science (``"verdict_vs_ripple"``): per method, over probed edits with a
   compositional case, 2x2 tables "INSERTION vs not" x "compositional failure (any of the
   edit's compositional cases fails) vs success" and "original object in the top 10 at some
   layer >= L vs not" x failure, with odds ratios (Haldane correction for zero cells), 95%
   bootstrap CIs and Fisher p (:mod:`rome_lens.evaluation.stats`), the AUC of the original
   object's best rank for failure, each over all probed edits and over edits that succeeded
   edit-wise (PARTIAL means the new object did not win, so "not INSERTION" mixes erasures with
   failed edits: the second subset is the fair test); and ROME vs ROME-erasure (the objective
   as exposure). A plot goes next to the JSON (``<out>.png``).

Cost on the embedded model (gemma-3-270m, 2 CPU cores), read off the code; a forward row is
one short prompt (~10-15 tokens) with the positions of the answer decoded, ~0.05-0.1 s in
batches of 64 (NOTES.md, benchmarks/results/scoring_speed.json):

* Case building, once (resumable by block): 2 rows per scanned record (known check); per
  fact and second hop, the two-hop question over the hop's candidates (160 countries, 295
  cities, 41 languages, 7 continents; one-token candidates of a prompt share one row, so
  ~20-40 rows for countries, ~100 for cities); each distinct object's one-hop question once
  per run (answer cache). ~100 rows per place/company fact, ~300 per country-valued fact
  (P17/P27/P495: three hops). If ~1/3 of scanned facts keep a compositional case, 250 edits
  scan ~750 facts: ~100k rows, ~1.5-3 h. ``--hops P17 P30 P37`` (no capital hop, the
  costliest) roughly halves it.
* Per (fact, method): the edit (ROME and ROME-erasure ~14 s each, MEMIT / AlphaEdit ~8-11 s
  with one request, FT-L ~3 s); scoring 2 rows (edit-wise) + 2 per compositional, aliasing,
  specificity or preservation case + 4 per forgetfulness case, ~15 rows, ~1-2 s; the probe
  (3 prompts, 2 lenses) ~13 s for the first method of a fact and ~4 s for the others (its
  pre-edit and control cells are reused). Per fact, all five methods: ~50 s of edits + ~8 s
  of scoring + ~29 s of probes ~ 90 s; 250 facts ~ 6 h.
* In all ~8-9 h: three or four ``--max-minutes 170`` sessions. Each chosen edit has >= 1
  compositional case (country-valued facts up to 3), so 250 edits give >= 300 cases unless
  the facts are almost all single-hop; the JSON's ``n_compositional_cases`` says (raise
  ``--n`` if it falls short: the scan continues where it stopped).

The real run (>= 200 edits with >= 300 compositional cases; rerun the same command until the
JSON says ``"complete": true``)::

    .venv/bin/python benchmarks/ripple.py --n 250 \\
        --method rome rome-erasure memit alphaedit ft-l --probe --max-minutes 170 \\
        --json benchmarks/results/ripple.json

``--model tiny`` is a smoke test: a tiny model fitted to the planted facts of
``tests/unit/_planted_ripple.py`` (its data file is written to a temporary folder unless
``--data`` is given), small method settings, the logit lens only; seconds per edit.

Usage:
    python benchmarks/ripple.py --n 250 --method rome rome-erasure memit alphaedit ft-l
        [--data PATH ...] [--probe | --no-probe] [--lenses logit tuned] [--layer L]
        [--all-facts] [--max-minutes 170] [--model tiny|embedded|NAME]
        [--json benchmarks/results/ripple.json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).parent))
from _many import Budget, append_row, read_rows  # noqa: E402
from _provenance import provenance  # noqa: E402
from zsre import method_options  # noqa: E402

import rome_lens  # noqa: E402
from rome_lens import evaluation as ev  # noqa: E402
from rome_lens._extras import require  # noqa: E402
from rome_lens.audit import probe_edit, tuned_lens  # noqa: E402
from rome_lens.audit.probe import INSERTION  # noqa: E402
from rome_lens.errors import RomeLensError  # noqa: E402
from rome_lens.evaluation.relations import SECOND_HOPS, hops_from  # noqa: E402
from rome_lens.predict import target_logprobs  # noqa: E402
from rome_lens.requests import target_tokens  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
DATA = [SHARED / "counterfact-dev.json", SHARED / "counterfact-train.json"]
# name -> (label, registered method, extra compute_edit options)
METHODS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "rome": ("ROME", "rome", {}),
    "rome-erasure": ("ROME-erasure", "rome", {"objective": "erasure"}),
    "memit": ("MEMIT", "memit", {}),
    "alphaedit": ("AlphaEdit", "alphaedit", {}),
    "ft-l": ("FT-L", "ft-l", {}),
}
COMPOSITIONAL = "compositionality_i"
BLOCK = 64
TOP_K = 10  # "the original object is decodable": best rank <= 10 (the probe's own top_k)
# REFERENCE.md §7 (much larger models; RippleEdits: average accuracy over its criteria).
RIPPLEEDITS = {
    "source": "Cohen et al. 2024 (TACL), average accuracy, RECENT / RANDOM / POPULAR",
    "GPT-2 XL": {"ROME": [57.5, 45.5, 48.7], "MEMIT": [58.0, 49.1, 49.6]},
    "GPT-J": {"ROME": [57.5, 48.8, 48.4]},
    "logical_generalisation_popular": [5.5, 7.0],
}
MQUAKE = {
    "source": "Zhong et al. 2023 (GPT-J); AlphaEdit paper (GPT2-XL multi-hop)",
    "GPT-J": {"ROME": {"edit_wise": 88.3, "multi_hop": 7.4},
              "MEMIT": {"edit_wise": 96.2, "multi_hop": 7.0}},
    "GPT2-XL": {"AlphaEdit": {"multi_hop": 5.0}, "MEMIT": {"multi_hop": 3.1}},
}
logger = logging.getLogger("benchmarks.ripple")


# ------------------------------------------------------------------------------- model, data


def load(name: str) -> tuple[Any, str, list[Path]]:
    """The model, its label, and its default data files (``tiny``: the planted world)."""
    if name == "embedded":
        return rome_lens.load_model(), rome_lens.DEFAULT_MODEL, DATA
    if name == "tiny":
        sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "unit")]
        from _knowing import knowing_model
        from _planted_ripple import FACTS, RECORDS

        os.environ.setdefault("ROME_LENS_CACHE", tempfile.mkdtemp(prefix="ripple_tiny_cache_"))
        data = Path(tempfile.mkdtemp(prefix="ripple_tiny_")) / "planted_counterfact.json"
        data.write_text(json.dumps(RECORDS))
        return knowing_model(FACTS, steps=300), "tiny gpt2 fitted to _planted_ripple", [data]
    return rome_lens.load_model(name), name, DATA


def load_pool(paths: Sequence[Path]) -> list[ev.CounterFactRecord]:
    """The records of every file, in order (a repeated case id keeps its first record)."""
    records = [rec for path in paths for rec in ev.load_counterfact(path)]
    return list({rec.case_id: rec for rec in reversed(records)}.values())[::-1]


def digest(value: Any) -> str:
    """A short stable hash of a JSON-able value (row configs name the cases they scored)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:12]


# ---------------------------------------------------------------------- facts and cases


class CaseStore:
    """The scanned facts and their cases, on disk (``<out>.cases.jsonl`` + ``.meta.json``)."""

    def __init__(self, out: Path, settings: dict[str, Any]) -> None:
        self.cases_path = out.with_suffix(".cases.jsonl")
        self.meta_path = out.with_suffix(".cases.meta.json")
        self.settings = settings
        self.checked = 0
        self.known: list[int] = []
        self.cases: list[ev.RippleCase] = []
        if self.meta_path.exists() and self.cases_path.exists():
            meta = json.loads(self.meta_path.read_text())
            if meta["settings"] == settings:
                self.checked, self.known = meta["checked"], meta["known"]
                self.cases = ev.read_cases(self.cases_path)
            else:
                logger.warning("%s: other settings, building the cases again", self.meta_path)

    def save(self) -> None:
        """Write the cases and how far the scan got."""
        ev.write_cases(self.cases_path, self.cases)
        self.meta_path.write_text(json.dumps(
            {"settings": self.settings, "checked": self.checked, "known": self.known,
             "n_cases": len(self.cases), "rule": "p(true) > p(new) on the edit prompt; one "
             "fact per subject; cases built on the unedited model"}, indent=1))

    def by_fact(self) -> dict[int, list[ev.RippleCase]]:
        """Cases per scanned known fact (an empty list where none was kept)."""
        out: dict[int, list[ev.RippleCase]] = {cid: [] for cid in self.known}
        for case in self.cases:
            out.setdefault(case.case_id, []).append(case)
        return out

    def edits(self, require_compositional: bool) -> list[int]:
        """Case ids of the usable facts, in scan order."""
        cases = self.by_fact()
        return [cid for cid in self.known if not require_compositional
                or any(c.criterion == COMPOSITIONAL for c in cases[cid])]


def candidates(pool: Sequence[ev.CounterFactRecord], hops_only: bool,
               hops: Sequence[Any]) -> list[ev.CounterFactRecord]:
    """The records a fact may be chosen from, in order (deterministic, so a scan resumes)."""
    data = ev.index_records(pool)
    return [r for r in pool if not hops_only or hops_from(data.relation(r), hops)]


def scan(model: Any, pool: list[ev.CounterFactRecord], store: CaseStore, n: int,
         options: dict[str, Any], budget: Budget) -> None:
    """Scan facts block by block until ``n`` usable edits (or the pool ends), saving as it goes."""
    order = candidates(pool, options["hops_only"], options["hops"])
    by_id = {r.case_id: r for r in pool}
    subjects = {by_id[cid].request.subject for cid in store.known}
    answers: dict[ev.Query, str] = {}
    bar = tqdm(total=n, desc="cases", initial=min(n, len(store.edits(options["require"]))))
    while len(store.edits(options["require"])) < n and store.checked < len(order):
        if budget.spent():
            break
        block = _next_block(order, store, subjects)
        known = _one_per_subject(ev.known_records(model, block, len(block)), subjects)
        store.cases += ev.build_cases(model, known, pool=pool, hops=options["hops"],
                                      strict=options["strict"], answers=answers, progress=False)
        store.known += [r.case_id for r in known]
        store.save()
        bar.update(min(n, len(store.edits(options["require"]))) - bar.n)
    bar.close()


def _next_block(order: list[ev.CounterFactRecord], store: CaseStore,
                subjects: set[str]) -> list[ev.CounterFactRecord]:
    """The next ``BLOCK`` candidates whose subject has no fact yet (advances the scan)."""
    block: list[ev.CounterFactRecord] = []
    while store.checked < len(order) and len(block) < BLOCK:
        rec = order[store.checked]
        store.checked += 1
        if rec.request.subject not in subjects:
            block.append(rec)
    return block


def _one_per_subject(records: list[ev.CounterFactRecord],
                     subjects: set[str]) -> list[ev.CounterFactRecord]:
    kept = []
    for rec in records:
        if rec.request.subject not in subjects:
            subjects.add(rec.request.subject)
            kept.append(rec)
    return kept


# ------------------------------------------------------------------------------ the edits


def object_tokens(model: Any, rec: ev.CounterFactRecord) -> tuple[int, int] | None:
    """The first tokens where the true and new objects differ (what the probe tracks)."""
    old = target_tokens(model, rec.target_true).tolist()
    new = target_tokens(model, rec.target_new).tolist()
    return next(((a, b) for a, b in zip(old, new, strict=False) if a != b), None)


class Prober:
    """probe_edit with the benchmark's settings; a fact's pre-edit cells reused across methods."""

    def __init__(self, model: Any, lenses: Sequence[str]) -> None:
        self.model, self.lenses = model, tuple(lenses)
        self.settings = {"lenses": list(lenses), "paraphrases": 1, "n_contexts": 1,
                         "tracked": "first differing tokens"}
        self._lens: Any = None
        self._baseline: tuple[int, Any] | None = None

    def __call__(self, edit: Any, rec: ev.CounterFactRecord) -> dict[str, Any]:
        tokens = object_tokens(self.model, rec)
        if tokens is None:
            return {"settings": self.settings, "error": "the objects share all their tokens"}
        if "tuned" in self.lenses and self._lens is None:
            self._lens = tuned_lens(self.model)
        baseline = self._baseline[1] if self._baseline and self._baseline[0] == rec.case_id \
            else None
        paraphrases = [p for p in rec.paraphrase_prompts if rec.request.subject in p][:1]
        t0 = time.perf_counter()
        try:
            report = probe_edit(self.model, edit, paraphrases=paraphrases, n_contexts=1,
                                lenses=self.lenses, lens=self._lens, object_tokens=tokens,
                                baseline=baseline)
        except RomeLensError as exc:
            return {"settings": self.settings, "error": str(exc)}
        self._baseline = (rec.case_id, baseline or report)
        return report.summary() | {"settings": self.settings,
                                   "seconds": time.perf_counter() - t0}


def edit_one(model: Any, rec: ev.CounterFactRecord, cases: list[ev.RippleCase], method: str,
             options: dict[str, Any], prober: Prober | None) -> dict[str, Any]:
    """Compute one fact's edit from the unedited model, score it applied, probe, revert."""
    row: dict[str, Any] = {"case_id": rec.case_id, "subject": rec.request.subject}
    t0 = time.perf_counter()
    try:
        edit = rome_lens.compute_edit(model, rec.request, method=METHODS[method][1], **options)
    except RomeLensError as exc:  # recorded, so a rerun does not retry it
        logger.warning("%s failed on record %d: %s", method, rec.case_id, exc)
        return row | {"error": str(exc)}
    row["edit_s"] = time.perf_counter() - t0
    with edit.applied(model):
        lp_new, lp_true = target_logprobs(
            model, [(rec.request.text, rec.target_new), (rec.request.text, rec.target_true)])
        results = ev.score_cases(model, cases, progress=False)
    row["edit_success"] = lp_new > lp_true
    row["cases"] = [{"criterion": r.case.criterion, "correct": r.correct,
                     "expected_logprob": r.expected_logprob,
                     "against_logprob": r.against_logprob} for r in results]
    if prober is not None:
        row["probe"] = prober(edit, rec)
    return row


def needs_work(row: dict[str, Any] | None, prober: Prober | None) -> bool:
    """A fact is (re)done when it has no row, or a probe is asked for and its row has none."""
    if row is None:
        return True
    if "error" in row or prober is None:
        return False
    return row.get("probe", {}).get("settings") != prober.settings


def rows_for(path: Path, config: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """The latest row per fact computed with ``config`` (other settings are ignored)."""
    done, other = {}, 0
    for row in read_rows(path):
        if row.get("config") == config:
            done[row["case_id"]] = row
        else:
            other += 1
    if other:
        logger.warning("%s: ignoring %d rows computed with other settings", path.name, other)
    return done


def run_edits(model: Any, facts: list[ev.CounterFactRecord], cases: dict[int, list[Any]],
              plans: dict[str, tuple[Path, dict[str, Any], dict[str, Any]]],
              prober: Prober | None, budget: Budget) -> dict[str, dict[int, dict[str, Any]]]:
    """Every (fact, method) not done yet, fact by fact; rows appended as they come."""
    done = {m: rows_for(path, config) for m, (path, config, _) in plans.items()}
    todo = [(rec, m) for rec in facts for m in plans
            if needs_work(done[m].get(rec.case_id), prober)]
    for rec, method in tqdm(todo, desc="edits"):
        if budget.spent():
            break
        path, config, options = plans[method]
        row = {"config": config} | edit_one(model, rec, cases[rec.case_id], method, options,
                                            prober)
        append_row(path, row)
        done[method][rec.case_id] = row
    return done


# ------------------------------------------------------------------------------- the report


def accuracy_table(rows: list[dict[str, Any]], cases: dict[int, list[Any]]) -> dict[str, Any]:
    """Per criterion accuracy (95% bootstrap CIs), edit-wise accuracy, timings, verdicts."""
    ok = [r for r in rows if "error" not in r]
    results = [ev.CaseResult(case, s["correct"], s["expected_logprob"], s["against_logprob"])
               for r in ok for case, s in zip(cases[r["case_id"]], r["cases"], strict=True)]
    summary = ev.summarize_ripple(results)
    criteria = {k: _acc(v) for k, v in summary.items()}
    per_criterion = [a.accuracy for k, a in summary.items() if k != "all"]
    edit_wise = [float(r["edit_success"]) for r in ok]
    low, high = ev.bootstrap_ci(edit_wise)
    probes = [r["probe"] for r in ok if "probe" in r]
    return {
        "n_edits": len(ok), "failed": len(rows) - len(ok),
        "edit_wise": {"n": len(ok), "accuracy": _pct(edit_wise), "ci95": [100 * low, 100 * high]},
        "criteria": criteria,
        "mean_over_criteria": sum(per_criterion) / len(per_criterion) if per_criterion else None,
        "seconds_per_edit": _mean([r["edit_s"] for r in ok]),
        "probe_seconds": _mean([p["seconds"] for p in probes if "seconds" in p]),
        "verdicts": dict(Counter(p.get("verdict", "error") for p in probes)),
        "erasure_score": erasure_score(probes),
    }


def erasure_score(probes: list[dict[str, Any]]) -> float | None:
    """Hase et al.'s erasure score, ``max(0, (pre - post) / pre)`` of p(original) on the edit
    prompt, in % (the measure of ROME-erasure, whose edit-wise score says nothing: it does not
    push the new object up)."""
    outs = [p["output"] for p in probes if p.get("output", {}).get("pre_old")]
    scores = [max(0.0, (o["pre_old"] - o["post_old"]) / o["pre_old"]) for o in outs]
    return _pct(scores) if scores else None


def _acc(a: ev.Accuracy) -> dict[str, Any]:
    return {"n": a.n, "accuracy": a.accuracy, "ci95": [a.low, a.high]}


def _pct(values: list[float]) -> float:
    return 100.0 * sum(values) / len(values) if values else math.nan


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def units(rows: list[dict[str, Any]], method: str) -> list[dict[str, Any]]:
    """One unit per probed edit with a compositional case: verdict, rank, ripple outcome."""
    out = []
    for r in rows:
        probe = r.get("probe", {})
        comp = [c["correct"] for c in r.get("cases", ()) if c["criterion"] == COMPOSITIONAL]
        if "error" in r or "verdict" not in probe or not comp:
            continue
        out.append({"method": method, "case_id": r["case_id"], "verdict": probe["verdict"],
                    "old_rank": probe["old_best_rank_post"], "edit_success": r["edit_success"],
                    "failure": not all(comp), "comp_accuracy": sum(comp) / len(comp)})
    return out


def association(group: list[dict[str, Any]], seed: int = 0) -> dict[str, Any]:
    """Verdict and rank vs compositional failure over one group of units."""
    failed = [u for u in group if u["failure"]]
    kept = [u for u in group if not u["failure"]]
    return {
        "n": len(group),
        "verdicts": dict(Counter(u["verdict"] for u in group)),
        "insertion_vs_failure": ev.odds_ratio_test(
            [(u["verdict"] == INSERTION, u["failure"]) for u in group], seed=seed).to_dict(),
        f"old_in_top{TOP_K}_vs_failure": ev.odds_ratio_test(
            [(0 < u["old_rank"] <= TOP_K, u["failure"]) for u in group], seed=seed).to_dict(),
        # P(a failed edit's original object ranks better downstream than a successful one's)
        "old_rank_auc_for_failure": ev.rank_auc([-u["old_rank"] for u in failed],
                                                [-u["old_rank"] for u in kept]),
    }


def science(per_method: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Item 4: the associations per method (all probed / edit-wise successful edits), and
    ROME vs ROME-erasure."""
    out: dict[str, Any] = {
        "unit": "one probed edit with >= 1 compositional case",
        "exposure": "probe verdict INSERTION (or: original object's best rank <= 10 at layers "
                    ">= L, post-edit)",
        "event": "compositional failure: any of the edit's Compositionality I cases fails",
        "correction": "Haldane-Anscombe: +0.5 to every cell of a table with a zero cell",
    }
    for method, group in per_method.items():
        out[METHODS[method][0]] = {
            "all_probed": association(group),
            "edit_wise_successful": association([u for u in group if u["edit_success"]]),
        }
    rome, erasure = per_method.get("rome", []), per_method.get("rome-erasure", [])
    if rome and erasure:
        both = rome + erasure
        out["rome_vs_rome_erasure"] = {
            "objective_vs_failure": ev.odds_ratio_test(
                [(u["method"] == "rome-erasure", u["failure"]) for u in both]).to_dict(),
            "pooled": association(both),
        }
    return out


def plot(per_method: dict[str, list[dict[str, Any]]], path: Path) -> None:
    """Failure rate by verdict per method, and per-edit compositional accuracy vs old rank."""
    matplotlib = require("matplotlib", "the ripple plot")
    matplotlib.use("Agg", force=False)
    plt = require("matplotlib.pyplot", "the ripple plot")
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    names = [m for m in per_method if per_method[m]]
    for i, method in enumerate(names):
        for j, insertion in enumerate((True, False)):
            group = [u for u in per_method[method] if (u["verdict"] == INSERTION) == insertion]
            rate = _pct([float(u["failure"]) for u in group]) if group else 0.0
            left.bar(i + 0.4 * j - 0.2, rate, width=0.38, color=("C3" if insertion else "C0"),
                     label=("INSERTION" if insertion else "other verdict") if i == 0 else None)
            left.text(i + 0.4 * j - 0.2, rate + 1, f"n={len(group)}", ha="center", fontsize=7)
        ranks = [max(u["old_rank"], 1) for u in per_method[method]]
        right.scatter(ranks, [100 * u["comp_accuracy"] for u in per_method[method]],
                      s=12, alpha=0.6, label=METHODS[method][0])
    left.set_xticks(range(len(names)), [METHODS[m][0] for m in names], fontsize=8)
    left.set_ylabel("compositional failure (% of edits)")
    left.set_ylim(0, 110)
    left.legend(fontsize=8)
    right.set_xscale("log")
    right.set_ylim(-5, 105)
    right.axvline(TOP_K + 0.5, color="grey", lw=0.8, ls="--")
    right.set_xlabel("original object's best rank downstream (post-edit, layers >= L)")
    right.set_ylabel("compositional accuracy of the edit (%)")
    right.legend(fontsize=8)
    fig.suptitle("Does the probe's verdict predict ripple failure?", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_report(tables: dict[str, Any], verdict: dict[str, Any]) -> None:
    """The per-criterion table and the verdict-vs-ripple odds ratios."""
    short = ["compositionality_i", "subject_aliasing", "relation_specificity", "preservation",
             "forgetfulness", "all"]
    print(f"{'method':13s} {'edits':>5s} {'edit':>6s} "
          + " ".join(f"{c[:11]:>11s}" for c in short) + f" {'s/edit':>6s} {'erased':>6s}")
    for name, tab in tables.items():
        cells = [tab["criteria"].get(c) for c in short]
        text = " ".join(f"{c['accuracy']:5.1f}(n{c['n']:<4d})" if c else f"{'-':>11s}"
                        for c in cells)
        print(f"{name:13s} {tab['n_edits']:5d} {tab['edit_wise']['accuracy']:6.1f} {text} "
              f"{tab['seconds_per_edit'] or 0:6.1f} {tab.get('erasure_score') or 0:6.1f}")
    print("published: RippleEdits avg (RECENT/RANDOM/POPULAR) GPT-2 XL ROME 57.5/45.5/48.7, "
          "MEMIT 58.0/49.1/49.6; MQuAKE GPT-J edit-wise / multi-hop ROME 88.3/7.4, "
          "MEMIT 96.2/7.0")
    for name, result in verdict.items():
        if isinstance(result, dict) and "all_probed" in result:
            for subset in ("all_probed", "edit_wise_successful"):
                print(f"{name:13s} {subset:21s} {_or_text(result[subset])}")


def _or_text(assoc: dict[str, Any]) -> str:
    res = assoc["insertion_vs_failure"]
    return (f"n={assoc['n']:<4d} INSERTION x failure {res['table']} OR {res['odds_ratio']:.3g} "
            f"[{res['ci'][0]:.3g}, {res['ci'][1]:.3g}] p={res['fisher_p']:.3g}; "
            f"rank AUC {assoc['old_rank_auc_for_failure']:.3g}")


# ------------------------------------------------------------------------------------ main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=250, help="edits (facts)")
    parser.add_argument("--data", type=Path, nargs="+", default=None,
                        help="CounterFact-layout files (default: counterfact-dev and -train)")
    parser.add_argument("--method", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--probe", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--lenses", nargs="+", default=None, choices=["logit", "tuned"],
                        help="probe lenses (default: logit and tuned; tiny: logit)")
    parser.add_argument("--layer", type=int, default=None, help="ROME and FT-L")
    parser.add_argument("--hops", nargs="+", default=None,
                        help="second relations to follow (default: all of SECOND_HOPS)")
    parser.add_argument("--all-facts", action="store_true",
                        help="edit known facts with or without a compositional case")
    parser.add_argument("--strict", action="store_true",
                        help="a compositional case ranks f(o*) against every candidate")
    parser.add_argument("--model", default="embedded",
                        help="'embedded' (gemma-3-270m), 'tiny' (smoke test), or a load_model name")
    parser.add_argument("--max-minutes", type=float, default=None)
    parser.add_argument("--out", "--json", type=Path,
                        default=Path("benchmarks/results/ripple.json"))
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    budget = Budget(args.max_minutes)
    model, label, default_data = load(args.model)
    tiny = args.model == "tiny"
    data = args.data or default_data
    pool = load_pool(data)
    hops = [h for h in SECOND_HOPS if args.hops is None or h.second in args.hops]
    selection = {"hops_only": not args.all_facts, "require": not args.all_facts,
                 "strict": args.strict, "hops": hops}
    store = CaseStore(args.out, {"model": label, "data": [p.name for p in data],
                                 "hops": [f"{h.first}>{h.second}" for h in hops],
                                 "strict": args.strict, "all_facts": args.all_facts})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    scan(model, pool, store, args.n, selection, budget)
    build_s = time.perf_counter() - t0
    cases = store.by_fact()
    by_id = {r.case_id: r for r in pool}
    facts = [by_id[cid] for cid in store.edits(selection["require"])[: args.n]]
    lenses = args.lenses or (["logit"] if tiny else ["logit", "tuned"])
    prober = Prober(model, lenses) if args.probe else None
    plans = _plans(args, model, tiny, label, data, store)
    done = run_edits(model, facts, cases, plans, prober, budget)
    result = _result(args, label, data, store, facts, cases, done, build_s, budget)
    args.out.write_text(json.dumps(result, indent=1))
    print_report(result["methods"], result["verdict_vs_ripple"])
    if budget.spent() or not result["complete"]:
        print("incomplete (budget or pool); run the same command again to continue")
    return 0


def _plans(args: argparse.Namespace, model: Any, tiny: bool, label: str, data: list[Path],
           store: CaseStore) -> dict[str, tuple[Path, dict[str, Any], dict[str, Any]]]:
    """Per method: its rows file, the config that identifies its rows, compute_edit options."""
    plans = {}
    for method in args.method:
        options, settings = method_options(METHODS[method][1], model, args.layer, tiny)
        options |= METHODS[method][2]
        config = {"model": label, "data": [p.name for p in data], "method": method,
                  "cases": digest(store.settings), **settings}
        plans[method] = (args.out.with_suffix(f".{method}.jsonl"), config, options)
    return plans


def _result(args: argparse.Namespace, label: str, data: list[Path], store: CaseStore,
            facts: list[ev.CounterFactRecord], cases: dict[int, list[Any]],
            done: dict[str, dict[int, dict[str, Any]]], build_s: float,
            budget: Budget) -> dict[str, Any]:
    """The JSON report (and the plot beside it)."""
    rows = {m: [done[m][r.case_id] for r in facts if r.case_id in done[m]] for m in done}
    tables = {METHODS[m][0]: accuracy_table(rows[m], cases) for m in done}
    per_method = {m: units(rows[m], m) for m in done}
    if any(per_method.values()):
        plot(per_method, args.out.with_suffix(".png"))
    n_comp = sum(c.criterion == COMPOSITIONAL for r in facts for c in cases[r.case_id])
    complete = len(facts) >= args.n and all(len(rows[m]) == len(facts) for m in done)
    return {
        "benchmark": "ripple", "model": label, "data": [str(p) for p in data],
        "n_edits": len(facts), "n_cases": dict(Counter(
            c.criterion for r in facts for c in cases[r.case_id])),
        "n_compositional_cases": n_comp,
        "selection": ("first facts (file order) with a second-hop relation, one per subject, "
                      "known (p(true) > p(new)) and with >= 1 compositional case"
                      if not args.all_facts else "first known facts, one per subject"),
        "scan": {"checked": store.checked, "known": len(store.known),
                 "cases_file": str(store.cases_path), "build_s_this_run": build_s},
        "protocol": "one edit at a time from the unedited model, scored applied, probed, "
                    "reverted; cases built once on the unedited model",
        "methods": tables, "verdict_vs_ripple": science(per_method),
        "published": {"rippleedits": RIPPLEEDITS, "mquake": MQUAKE},
        "complete": complete and not budget.spent(),
        "provenance": provenance(seed=0),
    }


if __name__ == "__main__":
    raise SystemExit(main())

