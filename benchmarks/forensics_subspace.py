"""Blind edit detection in C's low-variance key subspace, on the embedded model (issue #17).

ROME's update is ``u r^T`` with ``u ∝ C^-1 k*``: in the eigenbasis of the key statistics C its
key side is ``(E^T k*) / lambda``, concentrated on the directions ordinary text rarely excites.
The unedited weight has no reason to hold one outstanding component there, so ``log(s1/s2)`` of
``E_m^T W`` (``E_m``: the ``m`` eigenvectors of C with the smallest eigenvalues) singles an edited
layer out where the plain spectrum of W does not.

For the unedited model and after each edit (``--n`` ROME edits at the default layer, ``--n-deep``
at a deeper layer, ``--memit`` MEMIT batches of ``--batch`` facts), this script records every
layer's ``log(s1/s2)`` of W and of ``E_m^T W`` for several ``m`` (raw values: any score can be
recomputed from the JSON) and two scores of each subspace, both robust leave-one-out z-scores
over layers (median / MAD): ``zdiff`` = z(low) - z(plain) and ``logdiff`` = z(low - plain).
It then runs the library's blind scan (``scan(model, use_registry=False)``, default
:class:`rome_lens.audit.ScanConfig`: the candidates' matched scores, the spectrum, the
key-subspace score) with the edited subjects among distractors as candidates, and reports per
edit the flagged layers, the named subject, the new object read from questions about it, and
whether the scan's reversal restores the edit prompt's unedited top-1 token. Controls: the
unedited model, scanned with the same candidates, and ``--random`` random rank-one changes of
the first ROME edits' layers and norms. Edits are kept in ~/.cache/rome_lens/
forensics_subspace_edits and reused by later runs.

Usage (run alone; ~35 s per ROME edit on 2 AVX2 cores, the key statistics of every layer once):
    python benchmarks/forensics_subspace.py [--n 15] [--n-deep 5] [--memit 2] [--batch 10]
        [--random 5] [--distractors 200]
        [--json benchmarks/results/forensics_subspace.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _provenance import provenance  # noqa: E402

import rome_lens  # noqa: E402
from rome_lens import Edit, LowRankSite, base_fingerprint, load_edit  # noqa: E402
from rome_lens import evaluation as ev  # noqa: E402
from rome_lens.audit import ScanConfig, scan  # noqa: E402
from rome_lens.audit.forensics.spectrum import leave_one_out_z, top_ratio  # noqa: E402
from rome_lens.models import access  # noqa: E402
from rome_lens.requests import target_tokens  # noqa: E402
from rome_lens.statistics import second_moments  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "counterfact-dev.json"
SUBSPACES = (64, 256, 512)
FLOOR = ScanConfig().z_floor
EDITS = Path.home() / ".cache" / "rome_lens" / "forensics_subspace_edits"


def eigenbases(model: Any, hp: Any) -> list[torch.Tensor]:
    """Eigenvectors of C at every layer, ascending eigenvalues (C from one cached pass)."""
    layers = list(range(model.cfg.n_layers))
    moments = second_moments(model, layers, hparams=hp)
    return [torch.linalg.eigh(moments[layer].double().cpu())[1].float() for layer in layers]


def raw_ratios(model: Any, bases: list[torch.Tensor]) -> dict[str, list[float]]:
    """``log(s1/s2)`` of every layer's W and of W in the m lowest-variance key directions."""
    weights = [access.read_mlp_out(model, layer).float().cpu()
               for layer in range(model.cfg.n_layers)]
    out = {"plain": [top_ratio(w) for w in weights]}
    for m in SUBSPACES:
        out[f"low{m}"] = [top_ratio(e[:, :m].T @ w) for w, e in zip(weights, bases, strict=True)]
    return out


def spectra(model: Any, bases: list[torch.Tensor], k: int = 16) -> dict[str, list[list[float]]]:
    """The top ``k`` singular values of every layer's W and of W in each low-variance subspace."""
    weights = [access.read_mlp_out(model, layer).float().cpu()
               for layer in range(model.cfg.n_layers)]
    out = {"plain": [torch.linalg.svdvals(w)[:k].tolist() for w in weights]}
    for m in SUBSPACES:
        out[f"low{m}"] = [torch.linalg.svdvals(e[:, :m].T @ w)[:k].tolist()
                          for w, e in zip(weights, bases, strict=True)]
    return out


def scores(raw: dict[str, list[float]]) -> dict[str, list[float]]:
    """``zdiff{m}`` and ``logdiff{m}`` of every layer, and the plain spectrum's own z."""
    plain = torch.tensor(raw["plain"])
    out = {"plain": leave_one_out_z(plain, FLOOR).tolist()}
    for m in SUBSPACES:
        low = torch.tensor(raw[f"low{m}"])
        out[f"zdiff{m}"] = (leave_one_out_z(low, FLOOR) - leave_one_out_z(plain, FLOOR)).tolist()
        out[f"logdiff{m}"] = leave_one_out_z(low - plain, FLOOR).tolist()
    return out


def blind_scan(model: Any, edit: Any, records: list[Any], distractors: list[str]
               ) -> dict[str, Any]:
    """The library's blind scan of the edited model, scored against the edit's facts."""
    subjects = [r.request.subject for r in records]
    prompt = records[0].request.text
    unedited_top = rome_lens.top_tokens(model, prompt, 1)[0][0]
    with edit.applied(model):
        t0 = time.perf_counter()
        report = scan(model, use_registry=False, candidates=[*subjects, *distractors])
        seconds = time.perf_counter() - t0
        edited_top = rome_lens.top_tokens(model, prompt, 1)[0][0]
        restored = None
        if report.reversal is not None:
            with report.reversal.applied(model):
                restored = rome_lens.top_tokens(model, prompt, 1)[0][0] == unedited_top
    named = {f.subject for f in report.findings if f.subject is not None}
    first = {r.request.subject: ev_first(model, r.target_new) for r in records}
    hits = [any(f.subject == s and f.objects and _norm(f.objects[0]) == first[s]
                for f in report.findings) for s in subjects]
    hits10 = [any(f.subject == s and first[s] in [_norm(o) for o in f.objects[:10]]
                  for f in report.findings) for s in subjects]
    named_any = {name for f in report.findings for name, _ in f.subjects
                 if f.mode == "subject"} | named
    return {
        "layers": list(report.layers), "modes": [f.mode for f in report.findings],
        "key_scores": [round(float(s), 3) for s in report.key_scores]
        if report.key_scores is not None else None,
        "subjects_named": sum(s in named for s in subjects), "facts": len(subjects),
        "object_top1": sum(hits), "object_top10": sum(hits10),
        "subjects_named_any": sum(s in named_any for s in subjects),
        "changed_top1": edited_top != unedited_top,
        "reversal_restores": restored, "scan_seconds": round(seconds, 2),
        "findings": [repr(f) for f in report.findings],
    }


def ev_first(model: Any, target: str) -> str:
    """The first token of ``target`` as the scan decodes it (stripped, case-folded)."""
    token = int(target_tokens(model, target)[0])
    return _norm(model.tokenizer.decode([token]))


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text[:40])


def _norm(text: str) -> str:
    return text.strip().casefold()


def run_edit(model: Any, kind: str, records: list[Any], bases: list[torch.Tensor],
             distractors: list[str], layer: int | None) -> dict[str, Any]:
    path = EDITS / f"{kind}-{layer}-{_safe(records[0].request.subject)}.safetensors"
    t0 = time.perf_counter()
    edit_seconds: float | None = None
    if path.exists():  # computed by an earlier run (the same facts, seed and hyperparameters)
        edit = load_edit(path, model)
    else:
        if kind == "memit":
            edit = rome_lens.compute_edit(model, [r.request for r in records], method="memit")
        else:
            edit = rome_lens.compute_rome(model, records[0].request, layer=layer)
        edit_seconds = round(time.perf_counter() - t0, 1)
        EDITS.mkdir(parents=True, exist_ok=True)
        edit.save(path)
    return measure(model, kind, edit, records, bases, distractors, edit_seconds)


def random_like(model: Any, edit: Any, seed: int) -> Any:
    """A random rank-one change of the same layer and Frobenius norm as ``edit`` (a control)."""
    (site,) = edit.sites
    gen = torch.Generator().manual_seed(seed)
    weight = access.read_mlp_out(model, site.layer)
    left = torch.randn(weight.shape[0], 1, generator=gen)
    right = torch.randn(1, weight.shape[1], generator=gen)
    left *= float(site.delta().norm()) / float((left @ right).norm())
    return Edit(sites=(LowRankSite(site.layer, left, right),), requests=(), method="random",
                hparams={"seed": seed}, base_fingerprint=base_fingerprint(model))


def measure(model: Any, kind: str, edit: Any, records: list[Any], bases: list[torch.Tensor],
            distractors: list[str], edit_seconds: float | None) -> dict[str, Any]:
    with edit.applied(model):
        raw = raw_ratios(model, bases)
        spec = spectra(model, bases)
    row = {"kind": kind, "layers": sorted({s.layer for s in edit.sites}),
           "subjects": [r.request.subject for r in records],
           "targets": [r.target_new for r in records], "edit_seconds": edit_seconds,
           "relative_norms": {s.layer: float(s.delta().norm()
                                              / access.read_mlp_out(model, s.layer).norm())
                              for s in edit.sites},
           "raw": raw, "scores": scores(raw), "spectra": spec,
           "scan": blind_scan(model, edit, records, distractors)}
    logging.getLogger("forensics_subspace").warning(
        "%s %s: scores at edited layers %s; scan %s", kind, row["subjects"][:2],
        {k: [round(v[i], 1) for i in row["layers"]] for k, v in row["scores"].items()},
        {k: row["scan"][k] for k in ("layers", "subjects_named", "object_top1",
                                     "reversal_restores")})
    return row


def summary(unedited: dict[str, list[float]], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per score: the unedited model's max, and per kind the edited layers' min / median."""
    out: dict[str, Any] = {}
    for name, values in unedited.items():
        entry: dict[str, Any] = {"unedited_max": round(max(values), 2),
                                 "unedited_argmax": values.index(max(values))}
        others = [r["scores"][name][i] for r in rows for i in range(len(values))
                  if i not in r["layers"]]
        entry["edited_models_other_layers_max"] = round(max(others), 2) if others else None
        for kind in sorted({r["kind"] for r in rows}):
            best = [max(r["scores"][name][i] for i in r["layers"]) for r in rows
                    if r["kind"] == kind]
            entry[kind] = {"min": round(min(best), 2),
                           "median": round(sorted(best)[len(best) // 2], 2),
                           "detected_at_4": sum(b >= 4 for b in best), "n": len(best)}
        out[name] = entry
    return out


def scan_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The library scan's blind detection, naming, reading and reversal per kind."""
    out = {}
    for kind in sorted({r["kind"] for r in rows}):
        group = [r for r in rows if r["kind"] == kind]
        exact = [set(r["scan"]["layers"]) == set(r["layers"]) for r in group]
        out[kind] = {
            "states": len(group),
            "detected": sum(bool(set(r["scan"]["layers"]) & set(r["layers"])) for r in group),
            "exact_sites": sum(exact),
            "false_layers": sum(len(set(r["scan"]["layers"]) - set(r["layers"])) for r in group),
            "facts": sum(r["scan"]["facts"] for r in group),
            "subjects_named": sum(r["scan"]["subjects_named"] for r in group),
            "object_top1": sum(r["scan"]["object_top1"] for r in group),
            "object_top10": sum(r["scan"].get("object_top10", 0) for r in group),
            "subjects_named_any": sum(r["scan"].get("subjects_named_any", 0) for r in group),
            "reversal_restores": sum(bool(r["scan"]["reversal_restores"]) for r in group
                                     if r["scan"]["changed_top1"]),
            "changed_top1": sum(bool(r["scan"]["changed_top1"]) for r in group),
        }
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=15)
    parser.add_argument("--n-deep", type=int, default=5)
    parser.add_argument("--deep-layer", type=int, default=6)
    parser.add_argument("--memit", type=int, default=2)
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--distractors", type=int, default=200)
    parser.add_argument("--random", type=int, default=5,
                        help="random rank-one controls (norms of the first ROME edits)")
    parser.add_argument("--json", type=Path,
                        default=Path("benchmarks/results/forensics_subspace.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    model = rome_lens.load_model()
    hp = rome_lens.default_hparams(model)
    t0 = time.perf_counter()
    bases = eigenbases(model, hp)
    unedited_raw = raw_ratios(model, bases)
    unedited = scores(unedited_raw)
    need = args.n + args.n_deep + args.memit * args.batch
    records = ev.known_records(model, ev.load_counterfact(DATA), need)
    taken = {r.request.subject for r in records}
    distractors = [r.request.subject for r in ev.load_counterfact(DATA)
                   if r.request.subject not in taken][: args.distractors]
    unedited_scan = scan(model, use_registry=False,
                         candidates=[*(r.request.subject for r in records), *distractors])
    plan = ([("rome", [r], int(hp.layer)) for r in records[: args.n]]
            + [("rome", [r], args.deep_layer)
               for r in records[args.n : args.n + args.n_deep]])
    rest = records[args.n + args.n_deep:]
    plan += [("memit", rest[i * args.batch:(i + 1) * args.batch], None)
             for i in range(args.memit)]
    rows = [run_edit(model, kind, recs, bases, distractors, layer)
            for kind, recs, layer in plan]
    for i, row in enumerate(rows[: args.random]):
        source = load_edit(next(EDITS.glob(f"rome-{hp.layer}-*{_safe(row['subjects'][0])}*")),
                           model)
        rows.append(measure(model, "random", random_like(model, source, seed=i),
                            records[i: i + 1], bases, distractors, None))
    for row in rows:
        if row["kind"] == "rome" and row["layers"] != [int(hp.layer)]:
            row["kind"] = f"rome@L{row['layers'][0]}"
    result = {
        "benchmark": "forensics_subspace", "default_layer": int(hp.layer),
        "subspaces": SUBSPACES, "floor": FLOOR, "config": repr(ScanConfig()),
        "unedited": {"raw": unedited_raw, "scores": unedited,
                     "scan_findings": [repr(f) for f in unedited_scan.findings],
                     "spectra": spectra(model, bases),
                     "scan_layers": list(unedited_scan.layers)},
        "summary": summary(unedited, rows), "scan_summary": scan_summary(rows),
        "rows": rows, "seconds": round(time.perf_counter() - t0, 1),
        "provenance": provenance(seed=0),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("summary", "scan_summary", "seconds")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
