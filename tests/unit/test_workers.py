"""rome_lens.parallel: a sweep over 2 Ray actors gives the serial rows, bit for bit, in order.

The Ray tests start one small local Ray for the module (2 CPUs, no dashboard) and skip when Ray
is not installed. Workers import the per-record function of this module and ``tiny`` by name,
so the module's folders go on their PYTHONPATH; their statistics go to a cache of their own, so
they compute them themselves rather than reading the serial run's.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
from pathlib import Path
from typing import Any

import pytest
from tiny import HAS_HOOKED, tiny_model

import rome_lens
from rome_lens import EditRequest, RomeHyperParams
from rome_lens._extras import MissingExtraError
from rome_lens.evaluation import CounterFactRecord, score_record
from rome_lens.parallel import WorkerPool, map_records, threads_per_worker

TESTS = Path(__file__).resolve().parents[1]
KIND = "gemma" if HAS_HOOKED else "bridge"
HP = RomeHyperParams(layer=1, v_num_grad_steps=5, n_contexts_short=2, context_len_short=3,
                     n_contexts_long=1, context_len_long=5, stats_sequences=36, stats_seq_len=32)
NAMES = ["Alice Smith", "Bob Jones", "Carol Lee", "Dave Brown", "Erin Stone"]
CITIES = ["Paris", "Rome", "Oslo", "Lima", "Kyiv"]


def _records() -> list[CounterFactRecord]:
    return [
        CounterFactRecord(
            case_id=i,
            request=EditRequest("{} lives in", name, CITIES[(i + 1) % 5], CITIES[i]),
            paraphrase_prompts=[f"Where is home? {name} lives in"],
            neighborhood_prompts=[f"{NAMES[(i + 2) % 5]} lives in"],
            target_true=CITIES[i],
        )
        for i, name in enumerate(NAMES)
    ]


def edit_and_score(model: Any, record: CounterFactRecord) -> dict[str, Any]:
    """The per-record function: a ROME edit, scored applied, reverted (model left unedited)."""
    edit = rome_lens.compute_rome(model, record.request, hparams=HP)
    with edit.applied(model):
        row = dataclasses.asdict(score_record(model, record))
    row["edit_digest"] = edit.sites[0].digest()  # the edit's tensors, bit for bit
    return row


def _no_model() -> Any:
    raise AssertionError("load() must not be called when the caller passes its model")


def test_serial_path_runs_here_without_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # any `import ray` now fails
    seen: list[int] = []
    out = map_records(lambda model, x: (model, x * 2), [1, 2, 3], load=_no_model, model="m",
                      on_result=lambda i, r: seen.append(i), progress=False)
    assert out == [("m", 2), ("m", 4), ("m", 6)] and seen == [0, 1, 2]
    assert map_records(lambda model, x: x, [], load=_no_model, workers=2) == []
    with pytest.raises(MissingExtraError, match=r"pip install 'rome_lens\[ray\]'"):
        map_records(lambda model, x: x, [1], load=_no_model, workers=2)


def test_bad_worker_counts_are_refused() -> None:
    with pytest.raises(ValueError, match="workers must be >= 1, got 0"):
        WorkerPool(_no_model, workers=0)
    with pytest.raises(ValueError, match="threads must be >= 1"):
        WorkerPool(_no_model, threads=0)
    assert threads_per_worker(2, cores=2) == 1
    assert threads_per_worker(3, cores=2) == 1
    assert threads_per_worker(2, cores=16) == 8


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory: pytest.TempPathFactory) -> Any:
    ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'rome_lens[ray]'")
    path = [str(TESTS), str(TESTS / "unit"), os.environ.get("PYTHONPATH", "")]
    env = {"PYTHONPATH": os.pathsep.join(p for p in path if p),
           "ROME_LENS_CACHE": str(tmp_path_factory.mktemp("worker_cache"))}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": env})
    yield ray
    ray.shutdown()


def test_two_workers_give_the_serial_rows(
    local_ray: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ROME_LENS_CACHE", str(tmp_path))  # the serial run's own statistics
    records = _records()
    load = functools.partial(tiny_model, KIND)
    # One torch thread everywhere (conftest sets it here): equal threads, equal float sums.
    serial = map_records(edit_and_score, records, load=load, threads=1, progress=False)
    arrived: list[int] = []
    with WorkerPool(load, workers=2, threads=1) as pool:
        rows = pool.map(edit_and_score, records, progress=False,
                        on_result=lambda i, row: arrived.append(i))
        again = pool.map(edit_and_score, records[:2], progress=False)  # actors reused
    assert local_ray.is_initialized()  # the pool leaves a Ray it did not start running
    assert arrived == list(range(len(records)))
    assert [r["case_id"] for r in rows] == [r.case_id for r in records]
    assert rows == serial  # bit for bit: every probability, every edit tensor
    assert again == serial[:2]
    with pytest.raises(RuntimeError, match="closed"):
        pool.map(edit_and_score, records)


def test_an_error_in_a_worker_reaches_the_caller(local_ray: Any) -> None:
    with pytest.raises(local_ray.exceptions.RayTaskError, match="record 1 fails"):
        map_records(_fail_on_second, _records()[:2], load=functools.partial(tiny_model, KIND),
                    workers=2, threads=1, progress=False)


def test_stop_starts_no_further_record(local_ray: Any) -> None:
    asked = []

    def stop() -> bool:  # runs here, in the driver: a closure is fine
        asked.append(1)
        return len(asked) > 3

    serial = map_records(_case_id, _records(), load=_no_model, model="m", stop=stop,
                         progress=False)
    assert serial == [0, 1, 2]
    asked.clear()
    rows = map_records(_case_id, _records(), load=_named_model, workers=2, threads=1,
                       stop=stop, progress=False)
    assert rows == [0, 1, 2]


def _named_model() -> str:
    return "a model"


def _case_id(model: Any, record: CounterFactRecord) -> int:
    return record.case_id


def _fail_on_second(model: Any, record: CounterFactRecord) -> int:
    if record.case_id == 1:
        raise ValueError("record 1 fails")
    return record.case_id
