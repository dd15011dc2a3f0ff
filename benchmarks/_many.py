"""Shared parts of the many-edit benchmarks (batch_editing.py, sequential_editing.py).

Fact selection (cached), resumable JSONL rows, a minute budget, scoring of many records, and
the summary of a list of scores. Not a library module: benchmarks only.
"""

from __future__ import annotations

import json
import logging
import resource
import time
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import rome_lens
from rome_lens import evaluation as ev

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT.parent / "shared" / "data" / "counterfact-train.json"
logger = logging.getLogger("benchmarks")


class Budget:
    """A wall-clock budget in minutes (``None``: unlimited)."""

    def __init__(self, minutes: float | None) -> None:
        self.deadline = None if minutes is None else time.monotonic() + 60 * minutes

    def spent(self) -> bool:
        """Whether the budget is used up (checked before each unit of work)."""
        return self.deadline is not None and time.monotonic() > self.deadline


def known_facts(model: Any, n: int, data: Path, cache: Path) -> list[ev.CounterFactRecord]:
    """The first ``n`` records the unedited model knows, one per subject (selection cached)."""
    records = ev.load_counterfact(data)
    by_id = {r.case_id: r for r in records}
    if cache.exists():
        saved = json.loads(cache.read_text())
        if saved["data"] == data.name and len(saved["case_ids"]) >= n:
            return [by_id[c] for c in saved["case_ids"][:n]]
    chosen: list[ev.CounterFactRecord] = []
    subjects: set[str] = set()
    for first in range(0, len(records), 128):  # batched; same selection as one at a time
        block = [r for r in records[first : first + 128] if r.request.subject not in subjects]
        for rec in ev.known_records(model, block, len(block)):
            if rec.request.subject not in subjects and len(chosen) < n:
                chosen.append(rec)
                subjects.add(rec.request.subject)
        if len(chosen) >= n:
            break
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"data": data.name, "case_ids": [r.case_id for r in chosen],
                                 "rule": "p(true) > p(new) on the edit prompt; one per subject"}))
    return chosen


def score_all(
    model: Any, records: list[ev.CounterFactRecord], generation_records: int = 0,
    gen_tokens: int = 50,
) -> list[dict[str, Any]]:
    """ES/PS/NS of every record (batched); fluency for the first ``generation_records``."""
    scorer = getattr(ev, "score_records", None)
    if scorer is not None:
        scores = scorer(model, records, progress=False)
    else:  # pragma: no cover - older library
        scores = [ev.score_record(model, r) for r in records]
    for i, rec in enumerate(records[:generation_records]):
        prompts = rec.generation_prompts or [rec.request.text, *rec.paraphrase_prompts]
        gen = ev.generation_metrics(model, prompts[:2], rec.target_new, rec.target_true,
                                    n_tokens=gen_tokens)
        scores[i].fluency = gen["fluency"]
        scores[i].mentions_new = gen["mentions_new"]
        scores[i].mentions_true = gen["mentions_true"]
    return [asdict(s) for s in scores]


def summary(rows: Iterable[dict[str, Any]]) -> dict[str, float]:
    """ES/PS/NS/S/GE over score dicts."""
    return ev.summarize([ev.RecordScores(**r) for r in rows])


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The JSONL rows written so far."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def append_row(path: Path, row: dict[str, Any]) -> None:
    """Append one JSON row and flush (a killed run loses at most the row in progress)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as sink:
        sink.write(json.dumps(row) + "\n")


def peak_memory_gib() -> float:
    """Peak resident memory of this process so far (GiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def hparams_from(cls: type, model: Any, settings: list[str]) -> Any:
    """A method's default hyperparameters with ``key=value`` overrides (JSON values)."""
    from dataclasses import replace

    from rome_lens.methods import default_memit_hparams

    base = default_memit_hparams(model, cls)
    changes = {}
    for item in settings:
        key, _, value = item.partition("=")
        changes[key] = json.loads(value)
    return replace(base, **changes)


def load_named(name: str, tag: str, **tiny_options: Any) -> tuple[Any, str]:
    """A model and its label: ``embedded``, ``tiny`` (a smoke test) or a name for load_model.

    ``tiny`` is a random model from tests/tiny.py (gemma layout where HookedTransformer exists,
    else the bridge) whose statistics go to a temporary cache named after ``tag``.
    """
    import os
    import sys
    import tempfile

    if name == "embedded":
        return rome_lens.load_model(), rome_lens.DEFAULT_MODEL
    if name == "tiny":
        sys.path.insert(0, str(ROOT / "tests"))
        from tiny import HAS_HOOKED, tiny_model

        os.environ.setdefault("ROME_LENS_CACHE", tempfile.mkdtemp(prefix=f"{tag}_tiny_"))
        kind = "gemma" if HAS_HOOKED else "bridge"
        layers = tiny_options.get("n_layers")
        shape = f", {layers} layers" if layers else ""
        return tiny_model(kind, **tiny_options), f"tiny random {kind}{shape} (tests/tiny.py)"
    return rome_lens.load_model(name), name


def add_worker_args(parser: Any) -> None:
    """``--workers N``, ``--ray-address ADDR``, ``--threads T`` (rome_lens.parallel)."""
    parser.add_argument("--workers", type=int, default=1,
                        help="Ray actors, each loading the model once (1: this process, no "
                             "Ray); needs pip install 'rome_lens[ray]'")
    parser.add_argument("--ray-address", default=None,
                        help="a Ray cluster (ray.init address, e.g. 'auto'); default: a local "
                             "Ray started for this run")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per worker (default: an equal share of the cores "
                             "with Ray, torch's default with --workers 1); rows are identical "
                             "bit for bit between runs with equal threads per process")


def tiny_settings(memit: bool) -> dict[str, Any]:
    """Settings that make an edit of the tiny model take well under a second."""
    small: dict[str, Any] = dict(
        v_num_grad_steps=8, n_contexts_short=2, context_len_short=3, n_contexts_long=1,
        context_len_long=5, stats_sequences=36, stats_seq_len=32)
    if memit:
        small |= {"z_batch": 2, "z_precision": "float32"}
    return small


SHARED_TARGETS = ROOT / "benchmarks" / "results" / "cache" / "targets"


def sync_targets(to_repo: bool = False) -> int:
    """Copy cached z targets between the machine's cache and the repository's copy.

    z targets cost ~5 s per fact and a fresh machine has no cache, so the benchmarks keep the
    targets of their facts in ``benchmarks/results/cache/targets`` (about 3 KB per fact).
    Files are keyed by base model, applied edits, request and hyperparameters, so a copied file
    is used only where it would have been computed the same way.

    Args:
        to_repo: copy the machine's new targets into the repository (else the other way).

    Returns:
        The number of files copied.
    """
    import shutil

    machine = rome_lens.cache_dir("targets")
    source, sink = (machine, SHARED_TARGETS) if to_repo else (SHARED_TARGETS, machine)
    if not source.exists():
        return 0
    sink.mkdir(parents=True, exist_ok=True)
    copied = 0
    for path in source.glob("*.safetensors"):
        if not (sink / path.name).exists():
            shutil.copy2(path, sink / path.name)
            copied += 1
    return copied


def load_model() -> Any:
    """The embedded model, quietly (with the repository's cached z targets copied in)."""
    logging.basicConfig(level=logging.WARNING)
    copied = sync_targets()
    if copied:
        logger.warning("%d cached z targets copied from %s", copied, SHARED_TARGETS)
    return rome_lens.load_model()
