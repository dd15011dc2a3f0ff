"""Worker of compare_revisions.py: runs ROME edits with whatever rome_lens is on PYTHONPATH.

Speaks JSON lines on stdin/stdout. Uses only calls that exist in every release being compared
(``load_model``, ``default_hparams``, ``second_moment``, ``compute_rome``, ``edit.applied``,
``evaluation.load_counterfact/known_records/score_record``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import resource
import sys
import time
from typing import Any

import torch

import rome_lens
from rome_lens import evaluation as ev


def _digest(edit: Any) -> str:
    digest = hashlib.sha256()
    for t in (edit.left, edit.right):
        digest.update(t.detach().cpu().float().numpy().tobytes())
    return digest.hexdigest()[:16]


class Worker:
    def __init__(self, data: str, n_known: int) -> None:
        t0 = time.perf_counter()
        self.model = rome_lens.load_model()
        self.load_s = time.perf_counter() - t0
        self.layer = rome_lens.default_hparams(self.model).layer
        self.stats = rome_lens.second_moment(self.model, self.layer)
        self.records = ev.load_counterfact(data)
        self.n_known = n_known
        self.edits: dict[int, Any] = {}

    def known(self) -> dict[str, Any]:
        known = ev.known_records(self.model, self.records, self.n_known)
        return {"case_ids": [r.case_id for r in known]}

    def _record(self, case_id: int) -> Any:
        return next(r for r in self.records if r.case_id == case_id)

    def edit(self, case_id: int, keep: bool = False) -> dict[str, Any]:
        rec = self._record(case_id)
        t0 = time.perf_counter()
        edit = rome_lens.compute_rome(self.model, rec.request, layer=self.layer, stats=self.stats)
        seconds = time.perf_counter() - t0
        with edit.applied(self.model):
            scores = ev.score_record(self.model, rec)
        if keep:
            self.edits[case_id] = edit
        return {"case_id": case_id, "seconds": seconds, "timings": edit.info["timings"],
                "steps": len(edit.info["losses"]), "final_loss": edit.info["losses"][-1],
                "digest": _digest(edit), "right": edit.right.tolist(),
                "scores": dataclasses.asdict(scores)}

    def second_edit(self, applied_case: int, case_id: int) -> dict[str, Any]:
        """Time an edit computed while another edit is applied (default statistics path)."""
        rec = self._record(case_id)
        with self.edits[applied_case].applied(self.model):
            t0 = time.perf_counter()
            edit = rome_lens.compute_rome(self.model, rec.request, layer=self.layer)
            seconds = time.perf_counter() - t0
        return {"case_id": case_id, "seconds": seconds, "timings": edit.info["timings"]}

    def first_edit_default_stats(self, case_id: int) -> dict[str, Any]:
        rec = self._record(case_id)
        t0 = time.perf_counter()
        edit = rome_lens.compute_rome(self.model, rec.request, layer=self.layer)
        return {"case_id": case_id, "seconds": time.perf_counter() - t0,
                "timings": edit.info["timings"]}

    def kept(self) -> dict[str, Any]:
        return {"case_ids": list(self.edits)}

    def rss(self) -> dict[str, Any]:
        return {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                "load_s": self.load_s, "threads": torch.get_num_threads(),
                "rome_lens": rome_lens.__file__}


def main() -> int:
    logging.basicConfig(level=logging.WARNING)
    replies, sys.stdout = sys.stdout, sys.stderr  # libraries print; only replies go to stdout
    worker: Worker | None = None
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd.pop("op")
        if op == "init":
            worker = Worker(**cmd)
            out: dict[str, Any] = {"ok": True}
        elif op == "quit":
            break
        else:
            assert worker is not None
            out = getattr(worker, op)(**cmd)
        replies.write(json.dumps(out) + "\n")
        replies.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
