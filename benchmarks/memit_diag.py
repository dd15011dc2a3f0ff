"""Where does MEMIT lose its targets at 1,000 facts? Reach of z, and a second spread pass.

Issue #15 (MEMIT-1000 ES >= 90 is missed; NOTES.md). For the facts of
``benchmarks/memit_layers.py`` (same selection file) and one MEMIT setting, this script:

1. builds the requests' prompts and their cached z targets (``cache_targets``; the repository's
   copy is synced in), and spreads them over the layer range as ``compute_edit`` does;
2. measures, per request, how much of the gap ``z - h`` at the last layer of the range the
   edit closes at the last subject token: ``reach = 1 - |z - h_after| / |z - h_before|``, over
   the mean of the request's prompts (what the solve aims at) and on the bare edit prompt
   alone (what ES reads), and the ES / PS / NS of the batch;
3. with ``--overshoot S`` (repeatable): spreads ``h + S (z - h)`` instead of ``z`` (S > 1 asks
   the solve for more than the targets' change, to make up for what interference loses; reach
   is still measured against ``z``);
4. with ``--passes P > 1``: spreads the SAME targets again on the model with the earlier
   passes applied (a Newton-like correction of what the first pass left: interference between
   keys, the lower layers' changes, Gemma's post-MLP norm) and measures again after each pass.

Rows go to ``<out>.jsonl`` (one per setting and pass).

Usage:
    python benchmarks/memit_diag.py --n 1000 --passes 2 \\
        --config '{"layers":[3,4],"mom2_update_weight":100}'
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _many import (  # noqa: E402
    TRAIN,
    append_row,
    known_facts,
    load_model,
    peak_memory_gib,
    score_all,
    summary,
)
from _provenance import provenance  # noqa: E402

import rome_lens  # noqa: E402
from rome_lens.edits import Edit  # noqa: E402
from rome_lens.methods.memit import (  # noqa: E402
    default_memit_hparams,
    memit_solver,
    resolve_hparams,
)
from rome_lens.methods.spread import (  # noqa: E402
    SpreadOptions,
    measure_rows,
    partial_edit,
    spread,
)
from rome_lens.methods.targets import (  # noqa: E402
    chunk_index,
    first_rows,
    optimise_targets,
    request_chunks,
    request_means,
)
from rome_lens.statistics import second_moment  # noqa: E402

OUT = Path("benchmarks/results/memit_diag")


def states(model: Any, chunks: list, z_layer: int) -> torch.Tensor:
    """Residual leaving ``z_layer`` at the last subject token of every row of every chunk."""
    return measure_rows(model, chunks, z_layer, z_layer)[1]


def reach(z_rows: torch.Tensor, before: torch.Tensor, after: torch.Tensor,
          index: torch.Tensor, first: torch.Tensor) -> dict[str, float]:
    """Fraction of the gap z - h closed, per request (means and quantiles over requests)."""
    n = int(index.max()) + 1
    gap0 = request_means(z_rows - before, index, n)
    gap1 = request_means(z_rows - after, index, n)
    mean_reach = 1 - gap1.norm(dim=1) / gap0.norm(dim=1).clamp_min(1e-9)
    bare = 1 - (z_rows - after)[first].norm(dim=1) / (z_rows - before)[first].norm(dim=1)
    q = torch.tensor([0.1, 0.5, 0.9])
    return {"reach_mean_prompts": float(mean_reach.mean()),
            "reach_mean_prompts_q10_50_90": mean_reach.quantile(q).tolist(),
            "reach_bare_prompt": float(bare.mean()),
            "reach_bare_prompt_q10_50_90": bare.quantile(q).tolist()}


@contextmanager
def applied(model: Any, edits: list[Edit]) -> Iterator[None]:
    """Apply ``edits`` in order for the duration of the block (reverted in reverse order)."""
    with ExitStack() as stack:
        for edit in edits:
            stack.enter_context(edit.applied(model))
        yield


def run_passes(model: Any, facts: list, chunks: list, layers: list[int], hp: Any, solver: Any,
               z_rows: torch.Tensor, before: torch.Tensor, n_passes: int,
               config: dict[str, Any], out: Path) -> None:
    """Spread ``z_rows`` ``n_passes`` times (each on top of the last) and score after each."""
    index = chunk_index(chunks)
    first = first_rows(index)
    passes: list[Edit] = []  # one edit value per pass, applied one on top of the other
    for p in range(1, n_passes + 1):
        t0 = time.perf_counter()
        with applied(model, passes):
            result = spread(model, chunks, layers, z_rows, solver,
                            SpreadOptions.from_hparams(hp))
            passes.append(partial_edit(model, result.sites))
        seconds = time.perf_counter() - t0
        with applied(model, passes):
            after = states(model, chunks, layers[-1])
            scores = summary(score_all(model, facts))
        row = {"config": config, "layers": layers, "pass": p, "seconds": seconds,
               "fit_errors": result.fit_errors, **reach(z_rows, before, after, index, first),
               **{k: scores[k] for k in ("n", "ES", "PS", "NS", "S")},
               "peak_memory_gib": peak_memory_gib()}
        append_row(out.with_suffix(".jsonl"), row | {"provenance": provenance(seed=0)})
        print(json.dumps(row))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--config", action="append", default=[])
    parser.add_argument("--passes", type=int, default=2)
    parser.add_argument("--overshoot", type=float, action="append", default=[])
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    model = load_model()
    facts = known_facts(model, args.n, TRAIN,
                        Path("benchmarks/results/memit_layers_1000.facts.json"))
    requests = [f.request for f in facts]
    for text in args.config or ['{}']:
        config = json.loads(text)
        hp = resolve_hparams(model, None, replace(default_memit_hparams(model), **config),
                             rome_lens.MemitHyperParams)
        layers = list(hp.layers)
        chunks = request_chunks(model, requests, hp)
        targets = optimise_targets(model, chunks, hp, layers[-1], cache=True)
        assert targets.z_rows is not None
        mom2 = {layer: second_moment(model, layer, None, hp) for layer in layers}
        solver = memit_solver(mom2, hp.mom2_update_weight, hp.mom2_ridge)
        before = states(model, chunks, layers[-1])
        for scale in args.overshoot or [1.0]:
            tag = config | ({"overshoot": scale} if scale != 1.0 else {})
            run_passes(model, facts, chunks, layers, replace(hp, overshoot=scale), solver,
                       targets.z_rows, before, args.passes, tag, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
