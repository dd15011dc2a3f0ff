"""CPU contention: how much rome_lens slows when another process holds a core.

Each setting runs a fixed workload in a fresh child process, once on an idle machine and once
beside a competitor (one single-threaded busy-loop process per ``--busy`` core). The workload:
sampling ``--tokens`` tokens for 4 sequences (many small ops: the case that suffers most) and
one ROME edit with ``--steps`` value steps (large ops). The fair share of a process on a
machine with ``cores`` cores, ``busy`` of them taken, is ``(cores - busy) / cores`` of it, so a
slowdown above ``cores / (cores - busy)`` (2x for one busy core of two) is more than its share.

Settings (``--settings``, default all):

* ``default``: what a plain ``import rome_lens`` gives (rome_lens's thread policy);
* ``torch``: torch's own defaults (one OpenMP thread per core, spin-waiting barriers), i.e.
  ``ROME_LENS_THREADS=torch``;
* ``passive``: torch's defaults with ``OMP_WAIT_POLICY=PASSIVE`` (waiting threads sleep at once);
* ``one``: one torch thread (``OMP_NUM_THREADS=1``).

Usage:
    python benchmarks/contention.py [--tokens 48] [--steps 5] [--busy 1]
        [--out benchmarks/results/contention.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from _provenance import provenance  # noqa: E402

SETTINGS: dict[str, dict[str, str]] = {
    "default": {},
    "torch": {"ROME_LENS_THREADS": "torch"},
    "passive": {"ROME_LENS_THREADS": "torch", "OMP_WAIT_POLICY": "PASSIVE"},
    "one": {"OMP_NUM_THREADS": "1"},
}
# spins until killed, for at most 15 minutes, and stops within a second once its parent is gone
_BUSY_LOOP = (
    "import os, time\nparent, end = os.getppid(), time.time() + 900\n"
    "while time.time() < end and os.getppid() == parent:\n"
    "    for _ in range(100000):\n        pass\n"
)


def workload(tokens: int, steps: int) -> dict[str, Any]:
    """Time sampling and a short ROME edit in this process (the model load is not timed)."""
    import dataclasses

    import torch

    import rome_lens
    from rome_lens.sampling import sample_tokens

    model = rome_lens.load_model()
    request = rome_lens.EditRequest(
        prompt="The Eiffel Tower is located in the city of", subject="The Eiffel Tower",
        target_new="Rome",
    )
    hp = dataclasses.replace(rome_lens.default_hparams(model), v_num_grad_steps=steps)
    sample_tokens(model, 4, 8, seed=1, batch_size=4)  # warm-up
    stats = rome_lens.second_moment(model, hp.layer, hparams=hp)
    t0 = time.perf_counter()
    sample_tokens(model, 4, tokens, seed=0, batch_size=4)
    sample_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    rome_lens.compute_rome(model, request, hparams=hp, stats=stats)
    edit_s = time.perf_counter() - t0
    return {"threads": torch.get_num_threads(), "sample_s": sample_s,
            "tokens_per_s": 4 * tokens / sample_s, "edit_s": edit_s}


def run_child(setting: str, tokens: int, steps: int) -> dict[str, Any]:
    env = {**os.environ, **SETTINGS[setting]}
    cmd = [sys.executable, __file__, "--child", "--tokens", str(tokens), "--steps", str(steps)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def measure(setting: str, busy: int, tokens: int, steps: int) -> dict[str, Any]:
    competitors = [subprocess.Popen([sys.executable, "-c", _BUSY_LOOP]) for _ in range(busy)]
    try:
        return run_child(setting, tokens, steps)
    finally:
        for proc in competitors:
            proc.kill()
            proc.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--busy", type=int, default=1, help="competing busy cores")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/contention.json"))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(workload(args.tokens, args.steps)))
        return 0
    cores = os.cpu_count() or 1
    fair = cores / max(1, cores - args.busy)
    rows = []
    for setting in args.settings:
        idle = measure(setting, 0, args.tokens, args.steps)
        loaded = measure(setting, args.busy, args.tokens, args.steps)
        row = {"setting": setting, "idle": idle, "busy": loaded,
               "sample_slowdown": loaded["sample_s"] / idle["sample_s"],
               "edit_slowdown": loaded["edit_s"] / idle["edit_s"]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    base = next((r for r in rows if r["setting"] == "torch"), rows[0])
    for row in rows:  # against torch's defaults on an idle machine: what a user had before
        row["busy_vs_torch_idle"] = {
            "sample": row["busy"]["sample_s"] / base["idle"]["sample_s"],
            "edit": row["busy"]["edit_s"] / base["idle"]["edit_s"],
        }
    result = {"benchmark": "contention", "cores": cores, "busy_cores": args.busy,
              "fair_share_slowdown": fair, "rows": rows, "provenance": provenance()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
