"""Statistics corpus size and ridge: ROME's ES / PS / NS against the tokens behind C.

ROME's update direction ``C^-1 k*`` depends on the key statistics C; k* and v* do not. So each
record is edited ONCE with the default settings (its k* and residual v* - v(k*) cached in
``<out>.parts.pt``), and the rank-one update is re-solved for every (corpus size, ridge): the
sweep costs one ROME edit per record plus one C per size. Corpus sizes are prefixes of the
same model-sampled corpus (sequences of 128 tokens, seed 0), so 16k is part of 64k and of 256k.
The records are the first N of counterfact-dev the unedited model knows (as
``benchmarks/counterfact.py``); each (size, ridge, record) row is appended to
``<out>.jsonl`` (resumable) and the table goes to ``<out>.json`` with the seconds each C took.

Usage:
    python benchmarks/corpus_size.py --n 60 --sizes 128 512 2048 --ridges 0 0.001 0.01 0.1
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).parent))
from _many import append_row, read_rows  # noqa: E402
from _provenance import provenance  # noqa: E402

import rome_lens  # noqa: E402
from rome_lens import evaluation as ev  # noqa: E402
from rome_lens.edits import LowRankSite  # noqa: E402
from rome_lens.rome.update import rank_one_factors  # noqa: E402
from rome_lens.statistics import StatisticsConfig, second_moment  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "counterfact-dev.json"
OUT = Path("benchmarks/results/corpus_size")
SEQ_LEN = 128


def edit_parts(model, records, path: Path) -> dict[int, dict[str, torch.Tensor]]:
    """k*, residual and the default edit's seconds per record (computed once, cached)."""
    parts: dict[int, dict[str, torch.Tensor]] = torch.load(path) if path.exists() else {}
    for rec in tqdm(records, desc="ROME k*, v*"):
        if rec.case_id in parts:
            continue
        t0 = time.perf_counter()
        edit = rome_lens.compute_edit(model, rec.request, method="rome")
        parts[rec.case_id] = {"k_star": edit.k_star.reshape(-1), "right": edit.right,
                              "seconds": torch.tensor(time.perf_counter() - t0)}
        torch.save(parts, path)
    return parts


def timed_moments(model, layer: int, n_seq: int) -> tuple[torch.Tensor, float]:
    """C from the first ``n_seq`` sequences of the default corpus, and its seconds."""
    t0 = time.perf_counter()
    mom2 = second_moment(model, layer, hparams=StatisticsConfig(n_seq, SEQ_LEN, 0))
    return mom2, time.perf_counter() - t0


def resolved_edit(template, layer: int, mom2, part, ridge: float, n_seq: int):
    """The record's ROME edit with the update re-solved for another C and ridge."""
    left, right = rank_one_factors(mom2, part["k_star"], part["right"], ridge)
    site = LowRankSite(layer, left[:, None], right[None])
    hparams = {**template.hparams, "mom2_ridge": ridge, "stats_sequences": n_seq}
    return dataclasses.replace(template, sites=(site,), hparams=hparams)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=60)
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 512, 2048],
                        help="corpus sizes in sequences of 128 tokens")
    parser.add_argument("--ridges", type=float, nargs="+", default=[0.0, 1e-3, 1e-2, 1e-1])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    model = rome_lens.load_model()
    layer = rome_lens.default_hparams(model).layer
    records = ev.known_records(model, ev.load_counterfact(args.data), args.n)
    unedited = ev.summarize(ev.score_records(model, records))
    parts = edit_parts(model, records, args.out.with_suffix(".parts.pt"))
    template = rome_lens.compute_edit(model, records[0].request, method="rome")
    rows_path = args.out.with_suffix(".jsonl")
    done = {(r["size"], r["ridge"], r["case_id"]) for r in read_rows(rows_path)}
    stats_seconds = {}
    for n_seq in args.sizes:
        mom2, stats_seconds[n_seq] = timed_moments(model, layer, n_seq)
        for ridge in args.ridges:
            for rec in tqdm(records, desc=f"{n_seq * SEQ_LEN} tokens, ridge {ridge}"):
                if (n_seq, ridge, rec.case_id) in done:
                    continue
                edit = resolved_edit(template, layer, mom2, parts[rec.case_id], ridge, n_seq)
                with edit.applied(model):
                    scores = ev.score_record(model, rec)
                append_row(rows_path, {"size": n_seq, "ridge": ridge, "case_id": rec.case_id,
                                       **dataclasses.asdict(scores)})
    table = summary_table(read_rows(rows_path), args, {r.case_id for r in records})
    result = {
        "benchmark": "corpus_size", "model": rome_lens.DEFAULT_MODEL, "layer": layer,
        "records": len(records), "seq_len": SEQ_LEN, "unedited": unedited, "table": table,
        "stats_seconds": {str(k * SEQ_LEN): v for k, v in stats_seconds.items()},
        "rome_seconds_median": float(torch.stack([p["seconds"] for p in parts.values()]).median()),
        "provenance": provenance(seed=0),
    }
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    print(f"unedited ES {unedited['ES']:.1f} PS {unedited['PS']:.1f} NS {unedited['NS']:.1f}")
    for row in table:
        print(f"{row['tokens']:>7} tokens ridge {row['ridge']:<6} ES {row['ES']:5.1f} "
              f"PS {row['PS']:5.1f} NS {row['NS']:5.1f} (gap {unedited['NS'] - row['NS']:.1f})")
    return 0


def summary_table(rows, args, case_ids: set[int]) -> list[dict[str, float]]:
    """ES / PS / NS / S per (size, ridge) over the run's records."""
    fields = {f.name for f in dataclasses.fields(ev.RecordScores)}
    table = []
    for n_seq in args.sizes:
        for ridge in args.ridges:
            scores = [ev.RecordScores(**{k: v for k, v in r.items() if k in fields})
                      for r in rows if r["size"] == n_seq and r["ridge"] == ridge
                      and r["case_id"] in case_ids]
            if scores:
                table.append({"tokens": n_seq * SEQ_LEN, "ridge": ridge, "records": len(scores),
                              **ev.summarize(scores)})
    return table


if __name__ == "__main__":
    raise SystemExit(main())
