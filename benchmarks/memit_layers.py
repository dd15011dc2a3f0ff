"""MEMIT / AlphaEdit settings sweep: layer ranges and mom2_update_weight on known facts.

The default layer range and lambda of a model are chosen with this script. Facts: the first N
records of counterfact-train.json the unedited model knows (p(true) > p(new)), one per subject,
edited in ONE batch per setting; ES / PS / NS of the batch are reported next to the unedited
model's on the same facts, with the health monitor's record of the batch (each site's update
norm relative to its weight, perplexity of the held-aside text, generation entropy). Targets
are cached (``cache_targets``), so settings that share the last layer of their range share the
expensive part; each line is appended to ``<out>.jsonl`` and the table of every setting in it
is written to ``<out>.json``.

Usage:
    python benchmarks/memit_layers.py --n 100 \\
        --config '{"layers":[2,3,4],"mom2_update_weight":1000}' \\
        --config '{"layers":[1,2,3,4],"mom2_update_weight":100}' \\
        --config '{"method":"alphaedit","layers":[2,3,4]}'
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _many import (  # noqa: E402
    TRAIN,
    append_row,
    known_facts,
    load_model,
    read_rows,
    score_all,
    summary,
    sync_targets,
)
from _provenance import provenance  # noqa: E402

import rome_lens  # noqa: E402

OUT = Path("benchmarks/results/memit_layers")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--config", action="append", default=[],
                        help="JSON hyperparameters (plus 'method': memit or alphaedit)")
    parser.add_argument("--data", type=Path, default=TRAIN)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    model = load_model()
    facts = known_facts(model, args.n, args.data, args.out.with_suffix(".facts.json"))
    unedited = summary(score_all(model, facts))
    table = [{"config": "unedited", **unedited}]
    print("unedited", {k: round(unedited[k], 1) for k in ("ES", "PS", "NS", "S")})
    for text in args.config or ['{"method": "memit"}']:
        config = json.loads(text)
        method = config.pop("method", "memit")
        alpha = method == "alphaedit"
        cls = rome_lens.AlphaEditHyperParams if alpha else rome_lens.MemitHyperParams
        hp = replace(rome_lens.methods.default_memit_hparams(model, cls), **config)
        t0 = time.perf_counter()
        edit = rome_lens.compute_edit(model, [f.request for f in facts], method=method,
                                      hparams=hp, cache_targets=True)
        seconds = time.perf_counter() - t0
        sync_targets(to_repo=True)
        health = rome_lens.HealthMonitor().check(model, edit)  # update norms, perplexity
        with edit.applied(model):
            s = summary(score_all(model, facts))
        row = {"method": method, "config": config, "seconds": seconds,
               "fit_errors": edit.info["fit_errors"], **s, "health": health.to_dict()}
        append_row(args.out.with_suffix(".jsonl"), row)
        table.append(row)
        print(method, config, {k: round(s[k], 1) for k in ("ES", "PS", "NS", "S")}, health)
    table = table[:1] + read_rows(args.out.with_suffix(".jsonl"))  # every setting run so far
    result = {"benchmark": "memit_layers", "model": rome_lens.DEFAULT_MODEL, "facts": len(facts),
              "table": table, "provenance": provenance(seed=0)}
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
