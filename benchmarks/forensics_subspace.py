"""Exploration for blind edit detection (issue #17): an edit in C's low-variance key subspace.

ROME's update is ``u r^T`` with ``u ∝ C^-1 k*``: in the eigenbasis of the key statistics C its
key side is ``(E^T k*) / lambda``, concentrated on the directions ordinary text rarely excites.
The unedited weight has no reason to hold a single outstanding component there, so the ratio
of the two largest singular values of ``E_m^T W`` (``E_m``: the ``m`` eigenvectors of C with the
smallest eigenvalues) should single the edited layer out better than the plain spectrum of W.
For each statistic this script prints the robust z-score of the log ratio at each layer against
the other layers (median / MAD), on the unedited model and after each of ``--n`` ROME edits at
the default layer, and whether the new object is read back from questions about the subject
(:class:`rome_lens.audit.ScanConfig` ``queries``: the tokens the edit makes likelier).

Usage:
    python benchmarks/forensics_subspace.py [--n 5]
        [--json benchmarks/results/forensics_subspace.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _provenance import provenance  # noqa: E402

import rome_lens  # noqa: E402
from rome_lens import evaluation as ev  # noqa: E402
from rome_lens.evaluation.relations import RELATIONS  # noqa: E402
from rome_lens.models import access  # noqa: E402
from rome_lens.predict import next_token_logprobs_batch  # noqa: E402
from rome_lens.requests import target_tokens  # noqa: E402
from rome_lens.statistics import corpus_tokens  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "counterfact-dev.json"
SUBSPACES = (16, 64, 256, 1024)


def key_eigenbases(model: Any, hp: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Eigenvalues (ascending) and eigenvectors of C at every layer, from one corpus pass."""
    tokens, _ = corpus_tokens(model, None, hp)
    hooks = [access.key_hook_name(layer) for layer in range(model.cfg.n_layers)]
    d_mlp = int(access.mlp_out_weight(model, 0).shape[0])
    totals = [torch.zeros(d_mlp, d_mlp, dtype=torch.float64) for _ in hooks]
    count = 0
    with torch.no_grad():
        for start in range(0, tokens.shape[0], 16):
            _, states = access.run_with_states(model, tokens[start:start + 16], hooks)
            for total, hook in zip(totals, hooks, strict=True):
                keys = states[hook].reshape(-1, d_mlp).float()
                total += (keys.T @ keys).double()
            count += states[hooks[0]].reshape(-1, d_mlp).shape[0]
    out = []
    for total in totals:
        lam, vecs = torch.linalg.eigh(total / count)
        out.append((lam.float(), vecs.float()))
    return out


def layer_statistics(model: Any, layer: int, eig: tuple[torch.Tensor, torch.Tensor]
                     ) -> dict[str, float]:
    """s1 / s2 of W, of W in the m lowest-variance key directions, and of C^-1/2 W."""
    weight = access.read_mlp_out(model, layer).float()
    lam, vecs = eig
    s = torch.linalg.svdvals(weight)
    out = {"plain": float(s[0] / s[1])}
    for m in SUBSPACES:
        s = torch.linalg.svdvals(vecs[:, :m].T @ weight)
        out[f"low{m}"] = float(s[0] / s[1])
    scale = lam.clamp_min(float(lam.max()) * 1e-6).sqrt()[:, None]
    s = torch.linalg.svdvals((vecs.T @ weight) / scale)
    out["whitened"] = float(s[0] / s[1])
    return out


def robust_z(values: list[float], layer: int) -> float:
    """The log value at ``layer`` against the other layers' (median, 1.4826 MAD)."""
    others = torch.tensor([math.log(v) for i, v in enumerate(values) if i != layer])
    median = others.median()
    mad = float((others - median).abs().median()) * 1.4826 + 1e-9
    return float((math.log(values[layer]) - median) / mad)


def object_rank(model: Any, edit: Any, record: Any) -> tuple[int | None, list[str]]:
    """Rank of the new object's first token among the tokens the edit makes likelier."""
    prompts = [r.templates[0].format(record.request.subject) for r in RELATIONS.values()]
    with edit.applied(model):
        edited = next_token_logprobs_batch(model, prompts)
    unedited = next_token_logprobs_batch(model, prompts)
    top = (edited.exp() - unedited.exp()).sum(0).topk(10).indices.tolist()
    new = int(target_tokens(model, record.target_new)[0])
    return (top.index(new) if new in top else None), [model.tokenizer.decode([t]) for t in top]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=5)
    parser.add_argument("--json", type=Path,
                        default=Path("benchmarks/results/forensics_subspace.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    model = rome_lens.load_model()
    hp = rome_lens.default_hparams(model)
    layer, n_layers = int(hp.layer), int(model.cfg.n_layers)
    t0 = time.perf_counter()
    eigs = key_eigenbases(model, hp)
    base = [layer_statistics(model, lyr, eigs[lyr]) for lyr in range(n_layers)]
    names = list(base[0])
    unedited = {k: [robust_z([b[k] for b in base], lyr) for lyr in range(n_layers)]
                for k in names}
    rows = []
    records = ev.known_records(model, ev.load_counterfact(DATA), args.n)
    for record in records:
        edit = rome_lens.compute_rome(model, record.request)
        with edit.applied(model):
            stats = layer_statistics(model, layer, eigs[layer])
        z = {}
        for k in names:
            values = [b[k] for b in base]
            values[layer] = stats[k]
            z[k] = robust_z(values, layer)
        rank, top = object_rank(model, edit, record)
        rows.append({"case_id": record.case_id, "subject": record.request.subject,
                     "target_new": record.target_new, "z_edited_layer": z,
                     "object_rank": rank, "top_objects": top})
        print(json.dumps(rows[-1]), flush=True)
    result = {
        "benchmark": "forensics_subspace", "layer": layer, "subspaces": SUBSPACES,
        "unedited_z": unedited,
        "unedited_max_z": {k: max(v) for k, v in unedited.items()},
        "edited_z_min": {k: min(r["z_edited_layer"][k] for r in rows) for k in names},
        "object_top1": sum(r["object_rank"] == 0 for r in rows) / len(rows),
        "object_top10": sum(r["object_rank"] is not None for r in rows) / len(rows),
        "rows": rows, "seconds": time.perf_counter() - t0, "provenance": provenance(seed=0),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k not in ("rows", "provenance")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
