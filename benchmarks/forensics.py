"""Edit forensics on CounterFact edits: detect, localise, read and reverse edits (issue #17).

Protocol. Facts: known records of counterfact-train.json (p(true) > p(new) on the edit prompt,
one per subject; the selection is cached beside the rows). A PLAN lists experiments
(``kind``, ``layer``, ``batch``, ``count``); each unit of an experiment is one edited model
state, computed from the unedited model, applied, scanned twice and reverted:

* **blind**: ``scan(model, use_registry=False)``: the MLP output spectra alone;
* **with base**: ``scan(model)``: the edit registry holds the exact unedited weights.

Both get the same candidate subjects and probe prompts. Kinds: ``rome`` (at the default and at
other layers), ``rome-erasure`` (``objective="erasure"``), ``memit`` and ``alphaedit`` (batches of
``batch`` requests, the method's default layers), ``ft-l``, and two NEGATIVE CONTROLS:

* ``none``: the unedited model (one state; "with base" compares it with a snapshot of itself).
  Any blind finding on it is a false positive.
* ``random``: a random rank-``rank`` change (Gaussian factors, seeded) at a random layer whose
  Frobenius norm equals the delta of the j-th ``rome`` edit at the default layer (so controls
  run after those edits). A spectral detector SHOULD flag it: it is an edit of the weights, and
  its detection rate is reported on its own line, never as a false positive. It controls for the
  read-outs: each control borrows the fact of the ROME edit whose norm it copies, and its
  object and subject "recovery" against that fact (which is not in the weights) is the chance
  level of those metrics for a low-rank change of that size (subjects: blind only; its scan with
  base weights names no subject, see :func:`run_scans`). Its reversal shows that the removal
  of a flagged component is exact, independent of any fact.

Candidates. The subjects of the dataset: every unique subject of counterfact-train.json with
``--candidates 0``, else a seeded random sample of ``--candidates`` (default 1000) that always
contains every subject the plan edits (so the candidate list is one list for all units and its
keys are cached once per layer, see ``rome_lens.audit.forensics.decode``). Candidates that a
context template cannot place are dropped (counted in the JSON). Chance top-1 = 1/candidates.

Metrics (per experiment, blind and with base):

* detection: states with at least one finding; exact sites: the finding layers equal the edited
  layers; localisation: detected states whose most confident finding is at an edited layer.
* false positives: flagged layers among the layers the state did not edit (all states; the
  unedited model's are listed apart), and findings on the unedited model.
* object top-1 / top-10 (per fact): the first token of ``target_new`` (decoded, stripped,
  case-folded), or the whole string, among the ``objects`` of the finding that names the fact's
  subject, else of the most confident finding at an edited layer. Erasure edits have no new
  object: the true object among that finding's suppressed tokens is reported instead.
* subject top-1 / top-10 (per fact): the true subject's place in the ranking of any finding at
  an edited layer (``n_subjects`` = max(10, batch) kept); named: the finding's ``subject``.
* reversal (per fact): with the scan's ``reversal`` applied, the unedited top-1 token of the
  edit prompt returns AND the fact's neighbourhood prompts and three unrelated known facts keep
  their unedited top-1 (the scan's Recovery rows); ``effective``: over facts whose top-1 the edit
  changed. No finding means no reversal (a failure).

Calibration (``--calibrate``: the plan reduced to ``none`` and ``rome`` experiments; every run
also reports it): the blind statistic (``ScanReport.layer_scores``) on the unedited model's
layers and on the layers ROME edits left alone (null), and on the edited layer (positive); the
``z_threshold`` at which at most 5% of null LAYERS are flagged and at which at most 5% of
STATES have a flagged unedited layer, with the detection rate of ROME edits at each and at the
library default. Library defaults are not changed here; the numbers go to the JSON.

Rows go to ``<json>.jsonl`` (``--rows``; with ``--calibrate`` the main run's rows, so the two
share edits; one per unit, with every scan's findings, layer scores and recovery
rows, so the tables can be recomputed); a rerun resumes, rows of other settings are ignored;
every computed edit is kept as an edit file in the user cache (``forensics_edits/``), so a
changed scan reruns on the same edits when the rows file is moved away;
``--max-minutes`` stops between units. ``--n K`` runs at most K units per experiment and
``--experiments none rome@L1`` only the named experiments (the facts of each unit and the
candidate list do not move, so their rows are the full run's). ``--model tiny`` is a smoke
test on a tiny random model (seconds).

Cost on the embedded model (gemma-3-270m, 2 CPU cores), estimated from the code (not run yet):
a ROME edit ~12-15 s (125 ROME + erasure edits: ~27 min), FT-L a few seconds (20: ~3 min),
MEMIT/AlphaEdit targets ~4 s per fact (170 facts: ~11 min, cached under targets/) plus the
spread and AlphaEdit's projector (minutes). A scan: 18 SVDs of [2048, 640] (~1-2 s), decoding
through the 262k-token unembedding, and the probes (3 next-token forwards each: ~1-2 s for a
single edit's ~5 probes, ~2-4 min for the 100-fact batch's 203). Candidate keys are the largest
single cost: 1000 candidates x 21 ROME templates = 21k rows of ~16 tokens; at ~11 MFLOP per
token and layer, a pass to layer 17 is ~7e13 FLOP (to the deepest edited layer: less), 20-30 min
at 40-60 GFLOP/s, done ONCE before the first unit (``warm_keys``, cached per base model, layer,
templates and candidate list; ``--candidates 0``, ~10k subjects, would be ~10x). Blind scans
read the same keys unless an edit sits below the flagged layer: MEMIT/AlphaEdit states that the
spectrum flags at layer 3 or 4 recompute theirs (~5-8 min each, at most 26 states). Total:
about 1.5-2 h (worst case ~4 h); run alone; it resumes, so run the same command until it says
nothing is left, then the calibration (reads the same rows, computes nothing new):

    python benchmarks/forensics.py --max-minutes 170 --json benchmarks/results/forensics.json
    python benchmarks/forensics.py --calibrate --json benchmarks/results/forensics-calibration.json

Usage:
    python benchmarks/forensics.py [--plan PLAN.json | --plan '[{"kind": "rome", ...}]']
        [--n K] [--candidates 1000] [--calibrate] [--experiments NAME ...]
        [--z-threshold Z] [--max-minutes M]
        [--model tiny|embedded|NAME] [--json OUT] [--seed 0]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).parent))
from _many import TRAIN, Budget, append_row, known_facts, load_named, read_rows, tiny_settings  # noqa: E402
from _provenance import provenance  # noqa: E402

import rome_lens  # noqa: E402
from rome_lens import evaluation as ev  # noqa: E402
from rome_lens.audit import ScanConfig, ScanReport, scan  # noqa: E402
from rome_lens.audit.forensics.decode import subject_keys_at  # noqa: E402
from rome_lens.edits import Edit, LowRankSite, base_fingerprint, base_weights  # noqa: E402
from rome_lens.errors import RomeLensError  # noqa: E402
from rome_lens.methods import default_memit_hparams  # noqa: E402
from rome_lens.models import access  # noqa: E402
from rome_lens.requests import subject_token_span, target_tokens  # noqa: E402
from rome_lens.statistics import context_templates  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = Path("benchmarks/results/forensics.json")
KINDS = ("none", "rome", "rome-erasure", "memit", "alphaedit", "ft-l", "random")
N_UNRELATED = 3
FP_TARGET = 0.05
# REFERENCE.md §8: Youssef et al. 2025 ("Tracing and Reversing Edits in LLMs"), GPT2-XL, GPT-J,
# Llama3, from the edited weights alone ("up to": their best setting).
YOUSSEF_2025 = {"object_top1": 99.0, "reversal": 94.0,
                "note": "up to; no base weights, no prompts; GPT2-XL / GPT-J / Llama3"}
logger = logging.getLogger("benchmarks.forensics")


# --------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class Unit:
    """One edited model state: an experiment's ``index``-th unit and its facts."""

    kind: str
    layer: int | None
    batch: int
    index: int
    facts: tuple[Any, ...] = field(default=(), compare=False)
    rank: int = 1

    @property
    def name(self) -> str:
        """The experiment's label (``rome@L1``, ``memit x10``, ...)."""
        if self.kind in ("memit", "alphaedit"):
            return f"{self.kind} x{self.batch}"
        if self.kind == "random":
            return f"random rank-{self.rank}"
        return self.kind if self.kind == "none" else f"{self.kind}@L{self.layer}"

    @property
    def key(self) -> str:
        """Identifies the unit's row."""
        return f"{self.name}#{self.index}"


def default_plan(model: Any) -> list[dict[str, Any]]:
    """The default experiments: 315 fact edits in 171 states, plus the two controls."""
    n_layers, default = int(model.cfg.n_layers), rome_default_layer(model)
    others = sorted({min(n_layers - 1, round(n_layers * f)) for f in (1 / 6, 1 / 3, 1 / 2)}
                    - {default})
    return [
        {"kind": "none", "count": 1},
        {"kind": "rome", "layer": default, "count": 60},
        *({"kind": "rome", "layer": layer, "count": 15} for layer in others),
        {"kind": "rome-erasure", "layer": default, "count": 20},
        {"kind": "memit", "batch": 1, "count": 20},
        {"kind": "memit", "batch": 10, "count": 3},
        {"kind": "memit", "batch": 100, "count": 1},
        {"kind": "alphaedit", "batch": 10, "count": 2},
        {"kind": "ft-l", "layer": default, "count": 20},
        {"kind": "random", "rank": 1, "count": 30},
    ]


def rome_default_layer(model: Any) -> int:
    """The model's default ROME layer."""
    layer = rome_lens.default_hparams(model).layer
    assert layer is not None
    return int(layer)


def read_plan(text: str | None, model: Any) -> list[dict[str, Any]]:
    """``--plan``: a JSON list or a file holding one (default: :func:`default_plan`)."""
    if text is None:
        return default_plan(model)
    plan = json.loads(Path(text).read_text() if Path(text).exists() else text)
    for entry in plan:
        if entry.get("kind") not in KINDS or int(entry.get("count", 0)) < 1:
            raise SystemExit(f"bad plan entry {entry}: kind in {KINDS} and count >= 1 needed")
    return list(plan)


def fact_count(plan: list[dict[str, Any]]) -> int:
    """Facts the plan edits (controls edit none)."""
    return sum(int(e["count"]) * int(e.get("batch", 1)) for e in plan
               if e["kind"] not in ("none", "random"))


def expand(plan: list[dict[str, Any]], facts: list[Any], model: Any, cap: int | None,
           seed: int) -> list[Unit]:
    """Every unit of the plan, each with its own facts (a unit's facts do not depend on
    ``cap``); random controls borrow the facts of the default-layer ROME units."""
    units: list[Unit] = []
    offset, default = 0, rome_default_layer(model)
    rome_facts = _rome_default_facts(plan, facts, default)
    for entry in plan:
        kind, count = entry["kind"], int(entry["count"])
        batch = int(entry.get("batch", 1))
        for j in range(min(count, cap) if cap else count):
            if kind == "none":
                units.append(Unit(kind, None, 0, j))
            elif kind == "random":
                layer = random.Random(f"{seed}-random-{j}").randrange(int(model.cfg.n_layers))
                borrowed = rome_facts[j:j + 1]
                units.append(Unit(kind, layer, 1, j, tuple(borrowed), int(entry.get("rank", 1))))
            else:
                chosen = facts[offset + j * batch: offset + (j + 1) * batch]
                if len(chosen) < batch:
                    logger.warning("%s: only %d known facts; units stop", kind, len(chosen))
                    break
                layer = None if kind in ("memit", "alphaedit") else int(entry.get("layer",
                                                                               default))
                units.append(Unit(kind, layer, batch, j, tuple(chosen)))
        if kind not in ("none", "random"):
            offset += count * batch
    return units


def _rome_default_facts(plan: list[dict[str, Any]], facts: list[Any], default: int) -> list[Any]:
    offset = 0
    for entry in plan:
        if entry["kind"] == "rome" and int(entry.get("layer", default)) == default:
            return facts[offset: offset + int(entry["count"])]
        if entry["kind"] not in ("none", "random"):
            offset += int(entry["count"]) * int(entry.get("batch", 1))
    return []


# --------------------------------------------------------------------------- models and edits
def load(name: str) -> tuple[Any, str]:
    """The model and its label: ``embedded`` (default), ``tiny``, or a name for load_model."""
    return load_named(name, "forensics", n_layers=6)


def edit_options(unit: Unit, tiny: bool) -> tuple[str, dict[str, Any]]:
    """``compute_edit``'s method and options for a unit (small settings on the tiny model)."""
    if unit.kind in ("memit", "alphaedit"):
        options: dict[str, Any] = {"progress": False, "cache_targets": True}
        if tiny and unit.kind == "memit":
            options["hparams"] = rome_lens.MemitHyperParams(
                layers=(1, 2), mom2_update_weight=1.0, **tiny_settings(True))
        elif tiny:
            options["hparams"] = rome_lens.AlphaEditHyperParams(
                layers=(1, 2), nullspace_threshold=0.05, alpha=1e-3, **tiny_settings(True))
        return unit.kind, options
    if unit.kind == "ft-l":
        return "ft-l", {"layer": unit.layer}
    options = {"objective": "erasure"} if unit.kind == "rome-erasure" else {}
    if tiny:
        return "rome", options | {"hparams": rome_lens.RomeHyperParams(layer=unit.layer,
                                                                        **tiny_settings(False))}
    return "rome", options | {"layer": unit.layer}


def random_edit(model: Any, unit: Unit, norm: float, seed: int) -> Edit:
    """A seeded random rank-``unit.rank`` change of Frobenius norm ``norm`` at ``unit.layer``."""
    assert unit.layer is not None
    weight = access.read_mlp_out(model, unit.layer)
    gen = torch.Generator().manual_seed(hash_seed(f"{seed}-{unit.key}"))
    left = torch.randn(weight.shape[0], unit.rank, generator=gen)
    right = torch.randn(unit.rank, weight.shape[1], generator=gen)
    left *= norm / float((left @ right).norm())
    return Edit(sites=(LowRankSite(unit.layer, left.to(weight.dtype), right.to(weight.dtype)),),
                requests=(), method="random-control", hparams={"seed": seed, "norm": norm},
                base_fingerprint=base_fingerprint(model))


def hash_seed(text: str) -> int:
    """A stable 31-bit seed from a string (Python's ``hash`` is salted per process)."""
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) & 0x7FFFFFFF


def make_edit(model: Any, unit: Unit, tiny: bool, norms: dict[int, float],
              seed: int) -> Edit | None:
    """The unit's edit (``None`` for the unedited model or a control without its norm yet).

    Computed edits are kept as edit files (:func:`edit_cache_path`), so that a changed scan can
    be rerun on the same edits (move the rows file away and rerun) without computing them again.
    """
    if unit.kind == "none":
        return None
    if unit.kind == "random":
        return random_edit(model, unit, norms[unit.index], seed) if unit.index in norms else None
    path = edit_cache_path(model, unit, tiny)
    if path.exists():
        try:
            return rome_lens.load_edit(path, model)
        except RomeLensError as exc:  # a damaged or foreign file: computed again
            logger.warning("%s: %s; recomputing", path.name, exc)
    method, options = edit_options(unit, tiny)
    requests = [f.request for f in unit.facts]
    edit = rome_lens.compute_edit(model, requests if unit.batch > 1 else requests[0],
                                  method=method, **options)
    path.parent.mkdir(parents=True, exist_ok=True)
    edit.save(path)
    return edit


def edit_cache_path(model: Any, unit: Unit, tiny: bool) -> Path:
    """Where the unit's edit is kept: the user cache, named by model, unit, facts and method."""
    method, options = edit_options(unit, tiny)
    defaults = [repr(rome_lens.default_hparams(model)), repr(default_memit_hparams(model))]
    spec = json.dumps([unit.key, [f.case_id for f in unit.facts], method, repr(options),
                       defaults])
    digest = hashlib.sha256(spec.encode()).hexdigest()[:16]
    name = f"{base_fingerprint(model)}-{digest}.safetensors"
    return rome_lens.cache_dir("forensics_edits") / name


def site_rows(model: Any, edit: Edit) -> list[dict[str, Any]]:
    """Each site's layer, rank and norms (absolute and relative to the base weight)."""
    rows = []
    with base_weights(model):
        for site in edit.sites:
            delta = site.delta().float()
            weight = access.read_mlp_out(model, site.layer).float()
            rank = int(getattr(site, "rank", 0)) or int(torch.linalg.matrix_rank(delta))
            rows.append({"layer": site.layer, "rank": rank, "norm": float(delta.norm()),
                         "relative_norm": float(delta.norm() / weight.norm())})
    return rows


# --------------------------------------------------------------------------- candidates, probes
def candidates(model: Any, data: Path, plan_facts: list[Any], cap: int,
               seed: int) -> tuple[list[str], int]:
    """The candidate subjects (module docstring) and how many were dropped."""
    everyone = sorted({r.request.subject for r in ev.load_counterfact(data)})
    edited = sorted({f.request.subject for f in plan_facts})
    others = sorted(set(everyone) - set(edited))
    if cap:
        others = random.Random(seed).sample(others, max(0, min(len(others), cap - len(edited))))
    templates = context_templates(model, rome_lens.default_hparams(model))
    kept = [s for s in sorted({*edited, *others}) if placeable(model, s, templates)]
    return kept, len(edited) + len(others) - len(kept)


def placeable(model: Any, subject: str, templates: list[str]) -> bool:
    """Whether every template places ``subject``'s tokens (what candidate keys need)."""
    try:
        for template in templates:
            subject_token_span(model, template.replace("{}", subject), subject,
                               char_start=template.index("{}"))
    except RomeLensError:
        return False
    return True


def probes_of(unit: Unit, unrelated: list[Any]) -> list[str]:
    """Edit prompts, neighbourhood prompts, then the unrelated facts' prompts (no repeats)."""
    prompts = [f.request.text for f in unit.facts]
    prompts += [p for f in unit.facts for p in f.neighborhood_prompts]
    prompts += [f.request.text for f in unrelated]
    return list(dict.fromkeys(prompts))


def fact_info(model: Any, fact: Any) -> dict[str, Any]:
    """What the tables need of a fact."""
    first = str(model.tokenizer.decode([int(target_tokens(model, fact.target_new)[0])]))
    return {"case_id": fact.case_id, "subject": fact.request.subject,
            "prompt": fact.request.text, "target_new": fact.target_new,
            "target_true": fact.target_true, "new_token": first,
            "neighbours": list(fact.neighborhood_prompts)}


def warm_keys(model: Any, units: list[Unit], cands: list[str], tiny: bool) -> None:
    """Candidate keys of the base model at every layer the plan edits, in one cached pass."""
    layers = {u.layer for u in units if u.layer is not None and u.kind != "random"}
    if any(u.kind in ("memit", "alphaedit") for u in units):
        layers |= {1, 2} if tiny else set(default_memit_hparams(model).layers)
    if not layers or not cands:
        return
    templates = context_templates(model, rome_lens.default_hparams(model))
    t0 = time.perf_counter()
    subject_keys_at(model, sorted(layers), cands, templates, cache=True)
    logger.warning("candidate keys of %d subjects at layers %s: %.0f s (cached)", len(cands),
                   sorted(layers), time.perf_counter() - t0)


# --------------------------------------------------------------------------- one unit
def scan_row(report: ScanReport, seconds: float) -> dict[str, Any]:
    """A scan as JSON: layer scores, findings (objects, subjects, components), recovery."""
    findings = []
    for f in report.findings:
        findings.append({
            "layer": f.layer, "weight": f.weight, "rank": f.rank, "confidence": f.confidence,
            "score": f.score, "relative_norm": f.relative_norm, "objects": list(f.objects),
            "components": [list(c.objects) for c in f.components],
            "suppressed": [list(c.suppressed) for c in f.components],
            "subject": f.subject, "subjects": [[s, round(v, 4)] for s, v in f.subjects],
            "singular_values": list(f.singular_values[:8]),
        })
    return {"mode": report.mode, "seconds": seconds,
            "layer_scores": [round(float(s), 4) for s in report.layer_scores],
            "findings": findings, "recovery": [vars(r) for r in report.recovery]}


def run_scans(model: Any, unit: Unit, cands: list[str], probes: list[str],
              z_threshold: float | None) -> dict[str, Any]:
    """The blind scan and the scan with base weights of the model as it is now."""
    options: dict[str, Any] = {"n_subjects": max(10, unit.batch), "cache_keys": True}
    if z_threshold is not None:
        options["z_threshold"] = z_threshold
    config = ScanConfig(**options)
    out = {}
    snapshot = ({n: p.detach().clone() for n, p in model.named_parameters()}
                if unit.kind == "none" else None)
    for mode, kwargs in (("blind", {"use_registry": False}), ("base", {"base": snapshot})):
        # a random control sits at any layer: naming subjects there with base weights would cost
        # a pass of every candidate's keys over all context templates per control, and its
        # blind scan already gives the chance level of the subject read-out
        named = None if unit.kind == "random" and mode == "base" else cands
        t0 = time.perf_counter()
        report = scan(model, candidates=named, probes=probes, config=config, **kwargs)
        out[mode] = scan_row(report, time.perf_counter() - t0)
    return out


def run_unit(model: Any, unit: Unit, ctx: dict[str, Any]) -> dict[str, Any] | None:
    """Edit, scan twice, revert; ``None`` when a control's ROME norm is not known yet."""
    row: dict[str, Any] = {"config": ctx["config"], "key": unit.key, "kind": unit.kind,
                           "experiment": unit.name, "layer": unit.layer, "batch": unit.batch,
                           "index": unit.index, "n_layers": int(model.cfg.n_layers),
                           "facts": [fact_info(model, f) for f in unit.facts],
                           "unrelated": [f.request.text for f in ctx["unrelated"]]}
    t0 = time.perf_counter()
    try:
        edit = make_edit(model, unit, ctx["tiny"], ctx["norms"], ctx["seed"])
    except RomeLensError as exc:  # recorded, so a rerun does not retry it
        logger.warning("%s failed: %s", unit.key, exc)
        return row | {"error": str(exc)}
    if edit is None and unit.kind == "random":
        return None
    row["edit_seconds"] = time.perf_counter() - t0
    probes = probes_of(unit, ctx["unrelated"])
    if edit is None:
        row["sites"] = []
        row["scans"] = run_scans(model, unit, ctx["candidates"], probes, ctx["z"])
        return row
    row["sites"] = site_rows(model, edit)
    with edit.applied(model):
        row["scans"] = run_scans(model, unit, ctx["candidates"], probes, ctx["z"])
    return row


# --------------------------------------------------------------------------- metrics
def _norm(text: str) -> str:
    return text.strip().casefold()


def object_hit(objects: list[str], fact: dict[str, Any], k: int) -> bool:
    """The new object's first token (or the whole string) among the top ``k`` objects."""
    wanted = {_norm(fact["new_token"]), _norm(fact["target_new"])} - {""}
    return any(_norm(o) in wanted for o in objects[:k])


def true_hit(suppressed: list[list[str]], fact: dict[str, Any], k: int) -> bool:
    """The true object's first word among the top ``k`` suppressed tokens of any component."""
    wanted = _norm(fact["target_true"].split()[0]) if fact["target_true"].split() else ""
    return bool(wanted) and any(_norm(s) == wanted for c in suppressed for s in c[:k])


def edited_layers(row: dict[str, Any]) -> set[int]:
    """The layers the unit's edit changed (sites of zero norm change nothing)."""
    return {int(s["layer"]) for s in row.get("sites", []) if s["norm"] > 0}


def is_noop(row: dict[str, Any]) -> bool:
    """An edit that changed no weight (e.g. an erasure already satisfied): left out of rates."""
    return row["kind"] != "none" and not edited_layers(row)


def fact_finding(findings: list[dict[str, Any]], fact: dict[str, Any],
                 layers: set[int]) -> dict[str, Any] | None:
    """The finding naming the fact's subject, else the most confident one at an edited layer."""
    at_edit = [f for f in findings if f["layer"] in layers]
    named = [f for f in at_edit if f["subject"] == fact["subject"]]
    return (named or at_edit or [None])[0]


def subject_rank(findings: list[dict[str, Any]], fact: dict[str, Any],
                 layers: set[int]) -> int | None:
    """Best 1-based place of the true subject in the rankings of findings at edited layers."""
    places = [i + 1 for f in findings if f["layer"] in layers
              for i, (s, _) in enumerate(f["subjects"]) if s == fact["subject"]]
    return min(places) if places else None


def reversal_ok(scan_: dict[str, Any], fact: dict[str, Any],
                unrelated: list[str]) -> dict[str, bool]:
    """Whether the edit prompt's top-1 returned and the other prompts kept theirs."""
    by_prompt = {r["prompt"]: r for r in scan_["recovery"]}
    own = by_prompt.get(fact["prompt"])
    others = [by_prompt.get(p) for p in [*fact["neighbours"], *unrelated]
              if p != fact["prompt"]]
    returned = bool(own and own["restored"])
    kept = bool(by_prompt) and all(r is not None and r["restored"] for r in others)
    changed = bool(own and own["edited"] != own["base"])
    return {"returned": returned, "kept": kept, "both": returned and kept, "changed": changed}


def state_metrics(row: dict[str, Any], mode: str) -> dict[str, Any]:
    """Detection, sites, localisation and false-positive counts of one state."""
    scan_ = row["scans"][mode]
    layers = edited_layers(row)
    found = [f for f in scan_["findings"] if f["layer"] is not None]
    flagged = {f["layer"] for f in found}
    return {"detected": bool(found), "exact": flagged == layers and bool(layers),
            "localised": bool(found) and found[0]["layer"] in layers,
            "fp_layers": len(flagged - layers), "clean_layers": row["n_layers"] - len(layers)}


def fact_metrics(row: dict[str, Any], mode: str) -> list[dict[str, Any]]:
    """Object, subject and reversal outcomes of each fact of one state."""
    scan_, layers, out = row["scans"][mode], edited_layers(row), []
    for fact in row["facts"]:
        finding = fact_finding(scan_["findings"], fact, layers)
        objects = finding["objects"] if finding else []
        place = subject_rank(scan_["findings"], fact, layers)
        out.append({
            "object_top1": object_hit(objects, fact, 1),
            "object_top10": object_hit(objects, fact, 10),
            "true_suppressed_top10": bool(finding) and true_hit(finding["suppressed"], fact, 10),
            "subject_top1": place == 1, "subject_top10": place is not None and place <= 10,
            "subject_named": any(f["subject"] == fact["subject"] for f in scan_["findings"]
                                 if f["layer"] in layers),
            **reversal_ok(scan_, fact, row["unrelated"]),
        })
    return out


def _pct(values: list[bool]) -> float | None:
    return round(100.0 * sum(values) / len(values), 1) if values else None


def experiment_table(rows: list[dict[str, Any]], mode: str) -> dict[str, Any]:
    """Every metric of one experiment in one mode."""
    states = [state_metrics(r, mode) for r in rows]
    facts = [m for r in rows for m in fact_metrics(r, mode)]
    changed = [m for m in facts if m["changed"]]
    clean = sum(s["clean_layers"] for s in states)
    return {
        "states": len(states), "facts": len(facts),
        "detection": _pct([s["detected"] for s in states]),
        "exact_sites": _pct([s["exact"] for s in states]),
        "localisation": _pct([s["localised"] for s in states if s["detected"]]),
        "fp_layer_rate": round(100.0 * sum(s["fp_layers"] for s in states) / clean, 2)
        if clean else None,
        **{k: _pct([m[k] for m in facts]) for k in (
            "object_top1", "object_top10", "true_suppressed_top10", "subject_top1",
            "subject_top10", "subject_named")},
        "reversal": _pct([m["both"] for m in facts]),
        "reversal_effective": _pct([m["both"] for m in changed]),
        "prompt_returned": _pct([m["returned"] for m in facts]),
        "others_kept": _pct([m["kept"] for m in facts]),
        "edit_changed_top1": _pct([m["changed"] for m in facts]),
        "scan_seconds": round(statistics.fmean(r["scans"][mode]["seconds"] for r in rows), 2),
    }


def tables(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per experiment and mode, plus the false positives over all states."""
    done = [r for r in rows if "scans" in r and not is_noop(r)]
    names = list(dict.fromkeys(r["experiment"] for r in rows))
    out: dict[str, Any] = {"experiments": {}, "false_positives": {}}
    for name in names:
        mine = [r for r in done if r["experiment"] == name]
        if not mine:
            continue
        out["experiments"][name] = {mode: experiment_table(mine, mode)
                                    for mode in ("blind", "base")}
        out["experiments"][name]["failed_or_noop"] = sum(
            r["experiment"] == name for r in rows) - len(mine)
        out["experiments"][name]["edit_seconds"] = round(
            statistics.fmean(r.get("edit_seconds", 0.0) for r in mine), 2)
    for mode in ("blind", "base"):
        states = [state_metrics(r, mode) for r in done if r["kind"] != "random"]
        clean = sum(s["clean_layers"] for s in states)
        unedited = [state_metrics(r, mode) for r in done if r["kind"] == "none"]
        out["false_positives"][mode] = {
            "layers_flagged_pct": round(100.0 * sum(s["fp_layers"] for s in states) / clean, 2)
            if clean else None,
            "unedited_findings": sum(s["fp_layers"] for s in unedited),
            "states_with_fp_pct": _pct([s["fp_layers"] > 0 for s in states]),
        }
    return out


# --------------------------------------------------------------------------- calibration
def calibration(rows: list[dict[str, Any]], default: float) -> dict[str, Any]:
    """The blind statistic on unedited layers (null) and ROME-edited layers (positive)."""
    null, states, positive = [], [], []
    for r in rows:
        if "scans" not in r or is_noop(r) or r["kind"] not in ("none", "rome", "rome-erasure"):
            continue
        scores, layers = r["scans"]["blind"]["layer_scores"], edited_layers(r)
        clean = [s for i, s in enumerate(scores) if i not in layers]
        null += clean
        states.append(max(clean))
        positive += [scores[i] for i in layers]
    if not null:
        return {}
    t_layer, t_state = threshold_for(null), threshold_for(states)
    return {
        "statistic": "ScanReport.layer_scores (robust leave-one-out z of the top component)",
        "null_layers": len(null), "null_states": len(states), "rome_edited_layers": len(positive),
        "null_quantiles": quantiles(null), "rome_quantiles": quantiles(positive),
        "z_threshold_layer_fp_5pct": t_layer, "z_threshold_state_fp_5pct": t_state,
        "library_default": default,
        "at_threshold": {name: {"threshold": t, "layer_fp_pct": _rate(null, t),
                                "state_fp_pct": _rate(states, t),
                                "rome_detection_pct": _rate(positive, t)}
                         for name, t in (("layer_5pct", t_layer), ("state_5pct", t_state),
                                         ("default", default))},
    }


def threshold_for(null: list[float], target: float = FP_TARGET) -> float:
    """The smallest 2-decimal threshold flagging at most ``target`` of ``null`` (``>=``)."""
    ordered = sorted(null, reverse=True)
    allowed = int(math.floor(target * len(ordered)))
    if allowed >= len(ordered):
        return round(min(ordered), 2)
    return math.floor(ordered[allowed] * 100 + 1) / 100


def _rate(values: list[float], t: float) -> float | None:
    return _pct([v >= t for v in values])


def quantiles(values: list[float]) -> dict[str, float] | None:
    """Min, 5/50/95th percentiles and max."""
    if not values:
        return None
    ordered = sorted(values)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)

    return {"min": round(ordered[0], 3), "p05": at(0.05), "p50": at(0.5), "p95": at(0.95),
            "max": round(ordered[-1], 3)}


# --------------------------------------------------------------------------- the run
def rome_norms(rows: list[dict[str, Any]], default: int) -> dict[int, float]:
    """The delta norm of each default-layer ROME unit, by index (what controls copy)."""
    return {r["index"]: r["sites"][0]["norm"] for r in rows
            if r["kind"] == "rome" and r["layer"] == default and r.get("sites")}


def identity(key: str, case_ids: list[int]) -> str:
    """A row's identity: the unit and its facts."""
    return f"{key}:{','.join(map(str, case_ids))}"


def run(model: Any, units: list[Unit], path: Path, ctx: dict[str, Any],
        budget: Budget) -> list[dict[str, Any]]:
    """Every unit not done yet with these settings; rows appended as they come."""
    rows = [r for r in read_rows(path) if r.get("config") == ctx["config"]]
    ignored = len(read_rows(path)) - len(rows)
    if ignored:
        logger.warning("%s: ignoring %d rows computed with other settings", path.name, ignored)
    done = {identity(r["key"], [f["case_id"] for f in r["facts"]]) for r in rows}
    ctx["norms"] = rome_norms(rows, ctx["default_layer"])
    todo = [u for u in units if identity(u.key, [f.case_id for f in u.facts]) not in done]
    for unit in tqdm(todo, desc="forensics"):
        if budget.spent():
            break
        row = run_unit(model, unit, ctx)
        if row is None:
            logger.warning("%s waits for the norm of rome@L%d#%d", unit.key,
                           ctx["default_layer"], unit.index)
            continue
        append_row(path, row)
        rows.append(row)
        if unit.kind == "rome" and unit.layer == ctx["default_layer"] and row.get("sites"):
            ctx["norms"][unit.index] = row["sites"][0]["norm"]
    return rows


def print_table(result: dict[str, Any]) -> None:
    """The per-experiment table, blind / with base, beside Youssef et al."""
    head = ("experiment", "st", "det", "loc", "fp%", "obj1", "obj10", "sub1", "sub10", "rev",
            "rev*")
    print(f"{head[0]:18s}" + "".join(f"{h:>7s}" for h in head[1:]) + "   (blind | base)")
    keys = ("states", "detection", "localisation", "fp_layer_rate", "object_top1",
            "object_top10", "subject_top1", "subject_top10", "reversal", "reversal_effective")
    for name, modes in result["tables"]["experiments"].items():
        for mode in ("blind", "base"):
            cells = [modes[mode][k] for k in keys]
            text = "".join(f"{'-' if c is None else c:>7}" for c in cells)
            print(f"{(name if mode == 'blind' else ''):14s}{mode:>5s}{text}")
    print(f"Youssef et al. 2025 (no base): object top-1 up to {YOUSSEF_2025['object_top1']}%, "
          f"reversal up to {YOUSSEF_2025['reversal']}%")
    print("false positives:", json.dumps(result["tables"]["false_positives"]))
    cal = result.get("calibration") or {}
    if cal:
        print("calibration:", json.dumps(cal["at_threshold"]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--plan", default=None, help="JSON list (or a file) of experiments")
    parser.add_argument("--n", type=int, default=None, help="at most N units per experiment")
    parser.add_argument("--candidates", type=int, default=1000, help="0: every subject")
    parser.add_argument("--calibrate", action="store_true")
    parser.add_argument("--experiments", nargs="+", default=None, metavar="NAME",
                        help="run only these experiments of the plan (e.g. none rome@L1)")
    parser.add_argument("--z-threshold", type=float, default=None)
    parser.add_argument("--data", type=Path, default=TRAIN)
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-minutes", type=float, default=None)
    parser.add_argument("--json", "--out", dest="out", type=Path, default=OUT)
    parser.add_argument("--rows", type=Path, default=None,
                        help="JSONL rows (default: beside --json; --calibrate: the main run's)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    budget = Budget(args.max_minutes)
    model, label = load(args.model)
    plan = read_plan(args.plan, model)
    rows_path = args.rows or (OUT if args.calibrate else args.out).with_suffix(".jsonl")
    facts = known_facts(model, fact_count(plan) + N_UNRELATED, args.data,
                        rows_path.with_suffix(".facts.json"))
    # facts are assigned over the whole plan, so --calibrate and --n rows are the full run's
    units = expand(plan, facts[:-N_UNRELATED], model, args.n, args.seed)
    # the candidates hold every subject the whole plan edits, whichever units run now, so rows
    # of partial runs (--n, --calibrate, --experiments) are those of the full run
    planned = [f for u in expand(plan, facts[:-N_UNRELATED], model, None, args.seed)
               if u.kind != "random" for f in u.facts]
    if args.calibrate:
        units = [u for u in units if u.kind in ("none", "rome")]
    if args.experiments:
        units = [u for u in units if u.name in args.experiments]
    edited = [f for u in units if u.kind != "random" for f in u.facts]
    cands, dropped = candidates(model, args.data, planned, args.candidates, args.seed)
    config = {"model": label, "data": args.data.name, "candidates": len(cands),
              "candidate_cap": args.candidates, "z_threshold": args.z_threshold,
              "seed": args.seed}
    ctx = {"config": config, "tiny": args.model == "tiny", "seed": args.seed,
           "candidates": cands, "unrelated": facts[-N_UNRELATED:], "z": args.z_threshold,
           "default_layer": rome_default_layer(model)}
    warm_keys(model, units, cands, ctx["tiny"])
    rows = run(model, units, rows_path, ctx, budget)
    wanted = {identity(u.key, [f.case_id for f in u.facts]) for u in units}
    rows = [r for r in rows if identity(r["key"], [f["case_id"] for f in r["facts"]]) in wanted]
    default_z = ScanConfig().z_threshold if args.z_threshold is None else args.z_threshold
    result = {
        "benchmark": "forensics", "model": label, "plan": plan, "units": len(units),
        "fact_edits": len(edited), "rows": len(rows), "candidates": len(cands),
        "candidates_dropped": dropped, "calibrate": args.calibrate,
        "tables": tables(rows), "calibration": calibration(rows, default_z),
        "youssef_2025": YOUSSEF_2025, "complete": len(rows) == len(units),
        "provenance": provenance(seed=args.seed),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print_table(result)
    if not result["complete"]:
        print("not every unit is done; run the same command again to continue")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
