"""Does localisation inform editing? (Hase et al. 2023) on the embedded model.

For N CounterFact dev records the model knows: an MLP causal trace of the fact (restored
p(true) by layer at the last subject token), and a ROME edit at each of the chosen layers with
its rewrite score ``(p_post(new) - p_pre(new)) / (1 - p_pre(new))`` on the edit prompt (first
token of the new object) and its CounterFact ES/PS/NS. Edit success is then regressed on

* the layer alone (one-hot layers: how much the layer explains),
* the tracing effect alone (the fact's MLP indirect effect at that layer),
* both,

and the R^2 values are reported beside Hase et al.'s for ROME on GPT-J (layer .947, tracing
.016, both .948; REFERENCE.md §4), with a scatter plot. Per-(fact, layer) rows go to a JSONL
file, so the run resumes.

Usage:
    python benchmarks/localization_vs_editing.py [--n 30] [--layers 0 2 4 ...]
        [--out benchmarks/results/localization_vs_editing.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).parent))
from _provenance import provenance  # noqa: E402

import rome_lens  # noqa: E402
from rome_lens import evaluation as ev  # noqa: E402
from rome_lens.predict import next_token_logprobs  # noqa: E402
from rome_lens.requests import target_tokens  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "counterfact-dev.json"
HASE_2023_ROME = {"layer": 0.947, "tracing": 0.016, "both": 0.948,
                  "source": "Hase et al. 2023, ROME on GPT-J, CounterFact (REFERENCE.md §4)"}


def r_squared(x: np.ndarray, y: np.ndarray) -> float:
    """R^2 of an ordinary least-squares fit of y on x (with intercept)."""
    design = np.column_stack([np.ones(len(y)), x])
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    resid = y - design @ coef
    total = ((y - y.mean()) ** 2).sum()
    return float(1 - (resid**2).sum() / total) if total > 0 else float("nan")


def regressions(rows: list[dict[str, Any]], target: str) -> dict[str, float]:
    layers = sorted({r["layer"] for r in rows})
    one_hot = np.array([[r["layer"] == lyr for lyr in layers[1:]] for r in rows], dtype=float)
    tracing = np.array([[r["tracing_effect"]] for r in rows])
    y = np.array([r[target] for r in rows], dtype=float)
    return {"layer": r_squared(one_hot, y), "tracing": r_squared(tracing, y),
            "both": r_squared(np.hstack([one_hot, tracing]), y)}


def plot(rows: list[dict[str, Any]], path: Path, target: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    layers = sorted({r["layer"] for r in rows})
    axes[0].scatter([r["tracing_effect"] for r in rows], [r[target] for r in rows],
                    c=[r["layer"] for r in rows], cmap="viridis", s=12)
    axes[0].set_xlabel("MLP tracing effect at the edited layer")
    axes[0].set_ylabel(target.replace("_", " "))
    means = [np.mean([r[target] for r in rows if r["layer"] == lyr]) for lyr in layers]
    trace_means = [np.mean([r["tracing_effect"] for r in rows if r["layer"] == lyr])
                   for lyr in layers]
    axes[1].plot(layers, means, marker="o", label=target.replace("_", " "))
    axes[1].plot(layers, trace_means, marker="s", label="tracing effect")
    axes[1].set_xlabel("edited layer")
    axes[1].legend(fontsize=8)
    fig.suptitle(f"localisation vs editing ({len({r['case_id'] for r in rows})} facts)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=30)
    parser.add_argument("--layers", type=int, nargs="+", default=None,
                        help="edited layers (default: every other layer)")
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--out", type=Path,
                        default=Path("benchmarks/results/localization_vs_editing.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    model = rome_lens.load_model()
    layers = args.layers or list(range(0, model.cfg.n_layers, 2))
    records = ev.known_records(model, ev.load_counterfact(args.data), args.n)
    jsonl = args.out.with_suffix(".jsonl")
    done = {}
    if jsonl.exists():
        for line in jsonl.read_text().splitlines():
            row = json.loads(line)
            done[(row["case_id"], row["layer"])] = row
    with jsonl.open("a") as sink:
        for rec in tqdm(records, desc="facts"):
            if all((rec.case_id, lyr) in done for lyr in layers):
                continue
            trace = rome_lens.causal_trace(model, rec.request.text, rec.request.subject,
                                           rec.target_true, kinds=("mlp",), samples=args.samples)
            effect = trace.indirect_effect("mlp")[:, trace.last_subject_token]
            new_tok = int(target_tokens(model, rec.target_new)[0])
            p_pre = float(next_token_logprobs(model, rec.request.text).exp()[new_tok])
            before = ev.score_record(model, rec)
            for lyr in layers:
                if (rec.case_id, lyr) in done:
                    continue
                t0 = time.perf_counter()
                edit = rome_lens.compute_rome(model, rec.request, layer=lyr)
                seconds = time.perf_counter() - t0
                with edit.applied(model):
                    p_post = float(next_token_logprobs(model, rec.request.text).exp()[new_tok])
                    after = ev.score_record(model, rec)
                row = {
                    "case_id": rec.case_id, "layer": lyr,
                    "tracing_effect": float(effect[lyr]),
                    "p_clean": trace.p_clean, "p_corrupted": trace.p_corrupted,
                    "rewrite_score": (p_post - p_pre) / (1 - p_pre),
                    "es": float(np.mean(after.efficacy)),
                    "ps": float(np.mean(after.paraphrase)) if after.paraphrase else None,
                    "ns": float(np.mean(after.neighborhood)) if after.neighborhood else None,
                    "ns_before": float(np.mean(before.neighborhood))
                    if before.neighborhood else None,
                    "edit_s": seconds,
                }
                done[(rec.case_id, lyr)] = row
                sink.write(json.dumps(row) + "\n")
                sink.flush()
    rows = [done[(r.case_id, lyr)] for r in records for lyr in layers
            if (r.case_id, lyr) in done]
    result: dict[str, Any] = {
        "benchmark": "localization_vs_editing",
        "model": rome_lens.DEFAULT_MODEL,
        "n_facts": len(records),
        "layers": layers,
        "r2_rewrite_score": regressions(rows, "rewrite_score"),
        "r2_paraphrase": regressions([r for r in rows if r["ps"] is not None], "ps"),
        "r2_neighborhood": regressions([r for r in rows if r["ns"] is not None], "ns"),
        "hase_2023_rome_gptj": HASE_2023_ROME,
        "mean_by_layer": {
            str(lyr): {k: float(np.mean([r[k] for r in rows if r["layer"] == lyr
                                         and r[k] is not None]))
                       for k in ("rewrite_score", "ps", "ns", "tracing_effect")}
            for lyr in layers
        },
        "provenance": provenance(seed=0),
    }
    plot(rows, args.out.with_suffix(".png"), "rewrite_score")
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("r2_rewrite_score", "r2_paraphrase",
                                              "r2_neighborhood")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
