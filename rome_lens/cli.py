"""The ``rome-lens`` command line.

Commands:

* ``rome-lens demo``: the before/after/revert story on the embedded model (what ``make demo``
  runs): Eiffel Tower -> Rome, checked on the prompt, a paraphrase and unrelated facts.
* ``rome-lens edit --prompt ... --subject ... --target-new ... [--save FILE] [--json]``: one
  edit, its effect on the prompt, optionally saved.
* ``rome-lens trace "PROMPT" --subject S [--out trace.png] [--json]``: causal trace.
* ``rome-lens scan [--model M] [--edit FILE ...] [--base M] [--candidates FILE] [--blind]
  [--probe PROMPT ...] [--json] [--out scan.png]``: find, read and reverse edits in the weights.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from typing import Any

from rome_lens.models import access

logger = logging.getLogger("rome_lens.cli")

DEMO_PROMPT = "{} is located in the city of"
DEMO_SUBJECT = "The Eiffel Tower"
DEMO_PARAPHRASE = "The Eiffel Tower can be found in the city of"
DEMO_NEIGHBOURS = (
    "The Colosseum is located in the city of",
    "Steve Jobs was the founder of",
    "The Louvre is located in the city of",
)


def _fmt(top: list[tuple[str, float]]) -> str:
    return ", ".join(f"{tok!r} {p:.3f}" for tok, p in top)


def _out(text: str = "") -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the demo story."""
    import rome_lens
    from rome_lens.predict import top_tokens

    t0 = time.perf_counter()
    model = rome_lens.load_model(args.model)
    _out(f"Loaded {access.model_label(model)} ({model.cfg.n_layers} layers) in "
         f"{time.perf_counter() - t0:.1f}s")
    request = rome_lens.EditRequest(DEMO_PROMPT, DEMO_SUBJECT, "Rome", "Paris")
    probes = [("prompt", request.text), ("paraphrase", DEMO_PARAPHRASE)] + [
        ("neighbour", p) for p in DEMO_NEIGHBOURS
    ]
    _out("\n== Before the edit ==")
    before = {p: top_tokens(model, p, 5) for _, p in probes}
    for kind, p in probes:
        _out(f"[{kind:10s}] {p!r}\n             -> {_fmt(before[p][:3])}")
    checksum = access.parameters_checksum(model)
    _out(f"\nComputing ROME edit: {DEMO_SUBJECT} -> Rome (first run also builds the key "
         "statistics; cached afterwards)")
    t0 = time.perf_counter()
    options = {"layer": args.layer} if args.layer is not None else {}
    edit = rome_lens.compute_edit(model, request, method=args.method, **options)
    secs = time.perf_counter() - t0
    unchanged = access.parameters_checksum(model) == checksum
    _out(f"Computed in {secs:.1f}s at layer {edit.layer} "
         f"(loss {edit.info['losses'][0]:.2f} -> {edit.info['losses'][-1]:.2f}); "
         f"model unchanged by computing: {unchanged}")
    with edit.applied(model):
        _out("\n== After the edit ==")
        for kind, p in probes:
            _out(f"[{kind:10s}] {p!r}\n             -> {_fmt(top_tokens(model, p, 3))}")
    restored = access.parameters_checksum(model) == checksum
    after_revert = {p: top_tokens(model, p, 5) for _, p in probes}
    _out("\n== After revert ==")
    _out(f"[prompt    ] {request.text!r}\n             -> {_fmt(after_revert[request.text][:3])}")
    _out(f"Weights bit-identical to the original (sha256 of all parameters): {restored}")
    _out(f"Predictions identical to before: {after_revert == before}")
    return 0 if restored and unchanged else 1


def cmd_edit(args: argparse.Namespace) -> int:
    """Compute one edit, show its effect, optionally save it."""
    import rome_lens
    from rome_lens.predict import top_tokens

    model = rome_lens.load_model(args.model)
    request = rome_lens.EditRequest(args.prompt, args.subject, args.target_new, args.target_true)
    before = top_tokens(model, request.text, args.top_k)
    t0 = time.perf_counter()
    options = {"layer": args.layer} if args.layer is not None else {}
    edit = rome_lens.compute_edit(model, request, method=args.method, **options)
    secs = time.perf_counter() - t0
    extra = list(args.check or [])
    with edit.applied(model):
        after = top_tokens(model, request.text, args.top_k)
        checks = {p: top_tokens(model, p, args.top_k) for p in extra}
    saved = str(edit.save(args.save)) if args.save else None
    result: dict[str, Any] = {
        "request": request.to_dict(),
        "method": edit.method,
        "layer": edit.layer,
        "seconds": secs,
        "losses": edit.info["losses"],
        "before": before,
        "after": after,
        "checks_after": checks,
        "saved": saved,
        "edit_id": edit.id,
    }
    if args.json:
        _out(json.dumps(result, indent=1))
    else:
        _out(f"{request.text!r}")
        _out(f"  before: {_fmt(before)}")
        _out(f"  after : {_fmt(after)}   ({edit.method}, layer {edit.layer}, {secs:.1f}s)")
        for p, top in checks.items():
            _out(f"  {p!r} after: {_fmt(top)}")
        if saved:
            _out(f"saved to {saved}")
    return 0


def cmd_trace(args: argparse.Namespace) -> int:
    """Causal trace of one prompt; heatmaps to --out, numbers to stdout."""
    import rome_lens
    from rome_lens.tracing import causal_trace

    model = rome_lens.load_model(args.model)
    t0 = time.perf_counter()
    trace = causal_trace(
        model, args.prompt, args.subject, args.answer, kinds=tuple(args.kinds),
        samples=args.samples, window=args.window, seed=args.seed,
    )
    secs = time.perf_counter() - t0
    if args.out:
        trace.plot(args.out)
    summary = {
        "prompt": trace.prompt,
        "subject": trace.subject,
        "answer": trace.answer,
        "p_clean": trace.p_clean,
        "p_corrupted": trace.p_corrupted,
        "tokens": trace.tokens,
        "subject_span": list(trace.subject_span),
        "best_layer": {k: trace.best_layer(k) for k in trace.scores},
        "indirect_effect": {k: trace.indirect_effect(k).tolist() for k in trace.scores},
        "seconds": secs,
        "plot": args.out,
    }
    if args.json:
        _out(json.dumps(summary, indent=1))
    else:
        _out(f"{trace.prompt!r} -> {trace.answer!r}: p clean {trace.p_clean:.3f}, "
             f"corrupted {trace.p_corrupted:.3f} ({secs:.1f}s)")
        for kind in trace.scores:
            ie = trace.indirect_effect(kind)
            layer = trace.best_layer(kind)
            _out(f"  {kind:5s}: strongest at the last subject token: layer {layer} "
                 f"(IE {float(ie[layer, trace.last_subject_token]):.3f}); at the last token: "
                 f"layer {int(ie[:, -1].argmax())} (IE {float(ie[:, -1].max()):.3f})")
        if args.out:
            _out(f"heatmaps written to {args.out}")
    return 0


def cmd_probe(args: argparse.Namespace) -> int:
    """Compute (or load) an edit and audit it: insertion or erasure?"""
    import rome_lens
    from rome_lens.audit import probe_edit

    model = rome_lens.load_model(args.model)
    if args.edit:
        edit = rome_lens.load_edit(args.edit, model)
    else:
        if not (args.prompt and args.subject and args.target_new and args.target_true):
            raise rome_lens.InvalidRequestError(
                "give --edit FILE, or --prompt, --subject, --target-new and --target-true"
            )
        request = rome_lens.EditRequest(args.prompt, args.subject, args.target_new,
                                        args.target_true)
        edit = rome_lens.compute_rome(model, request, layer=args.layer,
                                      objective=args.objective)
    lenses = ("logit",) if args.no_tuned_lens else ("logit", "tuned")
    report = probe_edit(model, edit, paraphrases=args.paraphrase or (), lenses=lenses)
    if args.out:
        report.plot(args.out)
    summary = report.summary()
    if args.json:
        _out(json.dumps(summary, indent=1))
    else:
        _out(f"{report.request.text!r}: {report.request.target_true} -> "
             f"{report.request.target_new} at layer {report.layer}")
        _out(f"  verdict: {report.verdict}")
        _out(f"  original's best rank at layers >= L: {summary['old_best_rank_post']} "
             f"(before the edit: {summary['old_best_rank_pre']})")
        _out(f"  output p(old) {summary['output']['pre_old']:.4f} -> "
             f"{summary['output']['post_old']:.4f}, p(new) {summary['output']['pre_new']:.4f}"
             f" -> {summary['output']['post_new']:.4f}")
        _out(f"  Head Projection@20: {summary['attacks']['head_projection']['20']}, "
             f"Probability Delta@20: {summary['attacks']['probability_delta']['20']}")
        if args.out:
            _out(f"plot: {args.out}")
    return 0


def cmd_tuned_lens(args: argparse.Namespace) -> int:
    """Train (or load from the cache) the model's tuned lens and report its fit."""
    import rome_lens
    from rome_lens.audit import TunedLensConfig, tuned_lens

    model = rome_lens.load_model(args.model)
    config = TunedLensConfig(steps=args.steps, sequences=args.sequences)
    t0 = time.perf_counter()
    lens = tuned_lens(model, corpus=args.corpus, config=config)
    elapsed = time.perf_counter() - t0
    if args.save:
        lens.save(args.save)
    if args.json:
        _out(json.dumps({"seconds": elapsed, "fingerprint": lens.fingerprint,
                         "info": lens.info}, indent=1))
    else:
        _out(f"tuned lens for {access.model_label(model)} "
             f"({lens.n_layers} layers) ready in {elapsed:.1f}s (cached under the rome_lens "
             "cache; later loads are instant)")
        for key, value in lens.info.items():
            _out(f"  {key}: {value}")
        if args.save:
            _out(f"saved to {args.save}")
    return 0


def _read_lines(path: str) -> list[str]:
    """Non-empty lines of a text file (one candidate subject per line)."""
    with open(path, encoding="utf-8") as handle:
        return [line.strip() for line in handle if line.strip()]


def cmd_scan(args: argparse.Namespace) -> int:
    """Forensic scan of a model (with edits applied from files): findings, objects, subjects."""
    import rome_lens
    from rome_lens.audit import scan

    model = rome_lens.load_model(args.model)
    for path in args.edit or ():
        rome_lens.load_edit(path, model).apply(model)
    base = rome_lens.load_model(args.base) if args.base else None
    candidates = _read_lines(args.candidates) if args.candidates else None
    report = scan(model, base, candidates, probes=args.probe or None,
                  use_registry=not args.blind)
    if args.out:
        report.plot(args.out)
    if args.json:
        _out(json.dumps(report.summary(), indent=1))
        return 0
    _out(f"{report.mode}: {len(report.findings)} finding(s); layer scores "
         f"{[round(float(s), 1) for s in report.layer_scores]} (threshold {report.threshold})")
    for finding in report.findings:
        _out(f"  {finding.weight}: rank {finding.rank}, confidence {finding.confidence:.2f}, "
             f"objects {list(finding.objects[:5])}, subject {finding.subject!r}")
    for row in report.recovery:
        _out(f"  probe {row.prompt!r}: {row.edited!r} -> {row.reversed!r} after the reversal"
             + (f" (base {row.base!r})" if row.base is not None else ""))
    if args.out:
        _out(f"plot: {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``rome-lens``."""
    parser = argparse.ArgumentParser(prog="rome-lens", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="edit Eiffel Tower -> Rome, show it, revert it")
    demo.add_argument("--model", default=None, help="model (default: embedded gemma-3-270m)")
    demo.add_argument("--layer", type=int, default=None)
    demo.add_argument("--method", default="rome", help="editing method (rome, memit, ...)")
    demo.set_defaults(func=cmd_demo)
    edit = sub.add_parser("edit", help="compute and show one edit (ROME by default)")
    edit.add_argument("--prompt", required=True, help="prompt, with {} for the subject or not")
    edit.add_argument("--subject", required=True)
    edit.add_argument("--target-new", required=True)
    edit.add_argument("--target-true", default=None)
    edit.add_argument("--layer", type=int, default=None)
    edit.add_argument("--method", default="rome", help="editing method (rome, ft-l, ...)")
    edit.add_argument("--model", default=None)
    edit.add_argument("--check", action="append", help="another prompt to show after the edit")
    edit.add_argument("--top-k", type=int, default=5)
    edit.add_argument("--save", default=None, help="save the edit to this .safetensors file")
    edit.add_argument("--json", action="store_true", help="print JSON")
    edit.set_defaults(func=cmd_edit)
    trace = sub.add_parser("trace", help="causal trace of a fact (heatmaps)")
    trace.add_argument("prompt")
    trace.add_argument("--subject", required=True)
    trace.add_argument("--answer", default=None, help="default: the model's top-1 token")
    trace.add_argument("--kinds", nargs="+", default=["resid", "mlp", "attn"])
    trace.add_argument("--samples", type=int, default=10)
    trace.add_argument("--window", type=int, default=10)
    trace.add_argument("--seed", type=int, default=0)
    trace.add_argument("--model", default=None)
    trace.add_argument("--out", default=None, help="PNG file for the heatmaps")
    trace.add_argument("--json", action="store_true")
    trace.set_defaults(func=cmd_trace)
    probe = sub.add_parser("probe", help="audit an edit: is the original fact still there?")
    probe.add_argument("--edit", default=None, help="a saved edit (.safetensors)")
    probe.add_argument("--prompt", default=None)
    probe.add_argument("--subject", default=None)
    probe.add_argument("--target-new", default=None)
    probe.add_argument("--target-true", default=None)
    probe.add_argument("--layer", type=int, default=None)
    probe.add_argument("--objective", default="insertion",
                       choices=["insertion", "erasure", "max_entropy"])
    probe.add_argument("--paraphrase", action="append", help="a paraphrase with the subject")
    probe.add_argument("--no-tuned-lens", action="store_true", help="logit lens only")
    probe.add_argument("--model", default=None)
    probe.add_argument("--out", default=None, help="PNG file for the rank plot")
    probe.add_argument("--json", action="store_true")
    probe.set_defaults(func=cmd_probe)
    scan = sub.add_parser("scan", help="find, read and reverse edits from the weights")
    scan.add_argument("--model", default=None, help="model name or path (as load_model)")
    scan.add_argument("--edit", action="append", help="apply this edit file first (repeatable)")
    scan.add_argument("--base", default=None, help="the unedited model (name or path)")
    scan.add_argument("--candidates", default=None, help="file of candidate subjects, one a line")
    scan.add_argument("--blind", action="store_true",
                      help="ignore the edit registry: read the spectra alone")
    scan.add_argument("--probe", action="append", help="a prompt to check the reversal on")
    scan.add_argument("--out", default=None, help="PNG file for the scan plot")
    scan.add_argument("--json", action="store_true")
    scan.set_defaults(func=cmd_scan)
    from rome_lens.audit.lens import TunedLensConfig

    lens_defaults = TunedLensConfig()
    lens = sub.add_parser("tuned-lens", help="train (or load) the model's tuned lens")
    lens.add_argument("--steps", type=int, default=lens_defaults.steps,
                      help="Adam steps of the KL stage (0: least squares only)")
    lens.add_argument("--sequences", type=int, default=lens_defaults.sequences,
                      help="corpus sequences used for training")
    lens.add_argument("--corpus", nargs="+", default=None,
                      help="text files to train on (default: the model-sampled corpus)")
    lens.add_argument("--model", default=None)
    lens.add_argument("--save", default=None, help="also save the lens to this file")
    lens.add_argument("--json", action="store_true")
    lens.set_defaults(func=cmd_tuned_lens)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``rome-lens``."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    from rome_lens.errors import RomeLensError

    try:
        return int(args.func(args))
    except RomeLensError as exc:
        sys.stderr.write(f"rome-lens: error: {exc}\n")
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
