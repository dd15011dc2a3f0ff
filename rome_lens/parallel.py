"""Spread a per-record sweep over Ray actors that each load the model once.

Why this module exists: evaluation sweeps (CounterFact, zsRE, ...) do the same independent work
for every record (edit, score, revert), so they parallelise over records, but every record
needs the model, and loading it costs seconds to minutes. :func:`map_records` starts ``workers``
Ray actors; each loads the model ONCE (``load()``) and then runs ``fn(model, record)`` for its
share of the records. Records are sharded deterministically (record ``i`` goes to actor
``i % workers``, and an actor runs its records in order), and results are handed back in record
order, so a benchmark that appends each result to its resumable JSONL as it arrives writes the
same file as a serial run (bit for bit when every process uses the same number of torch
threads), and an interrupted parallel run resumes like a serial one.

With ``workers=1`` (and no ``address``) nothing is distributed and Ray is not imported: the
sweep runs in this process, on ``model`` if given, exactly as a plain loop would.
:class:`WorkerPool` keeps the loaded models for several sweeps (e.g. one per editing method).

Example:
    >>> def n_tokens(model, prompt):  # module-level: Ray pickles it for the workers
    ...     return model.to_tokens(prompt).shape[1]
    >>> prompts = ["The Eiffel Tower is in", "Rome is the capital of"]
    >>> rows = map_records(n_tokens, prompts, load=rome_lens.load_model, model=model,
    ...                    progress=False)   # workers=1: here, on ``model``, no Ray
    >>> len(rows)
    2
    >>> rows = map_records(n_tokens, prompts, load=rome_lens.load_model,
    ...                    workers=2)  # doctest: +SKIP

``fn`` and ``load`` are sent to the workers with cloudpickle: functions of the driver's script
travel by value, functions of other modules by reference (the workers must be able to import
them: Ray adds the driver script's folder and the current directory to the workers' path).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import torch
from tqdm.auto import tqdm

from rome_lens._extras import require
from rome_lens._typing import Model

logger = logging.getLogger(__name__)

R = TypeVar("R")
T = TypeVar("T")


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS / Windows
        return os.cpu_count() or 1


def threads_per_worker(workers: int, cores: int | None = None) -> int:
    """Torch threads for each of ``workers`` processes sharing ``cores`` cores (>= 1).

    Each worker gets an equal share and no more: more threads than cores oversubscribe the
    machine, and torch's OpenMP threads stall whenever another process holds their core (on
    2 cores a busy second process slowed a benchmark 1.5-1.8x, NOTES.md), so on 2 cores each of
    2 workers runs 1 thread. A fixed count per worker also fixes the order of its float sums.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    return max(1, (cores if cores is not None else available_cores()) // workers)


class _Worker:
    """One Ray actor: loads the model once, then runs ``fn(model, record)`` per call."""

    def __init__(self, load: Callable[[], Model], threads: int) -> None:
        # Set before loading: the load itself (GGUF de-quantisation, statistics) runs matmuls.
        torch.set_num_threads(threads)
        self._model = load()

    def run(self, fn: Callable[[Model, Any], Any], record: Any) -> Any:
        """``fn``'s result for one record."""
        return fn(self._model, record)


class WorkerPool:
    """Models loaded once, here or in Ray actors, that several sweeps can share.

    ``with WorkerPool(load, workers=2) as pool:`` starts the actors (and a local Ray if none
    is running); each :meth:`map` reuses them, so a benchmark that sweeps several methods over
    the same records loads the model once per worker, not once per method. Leaving the block
    stops the actors (and the Ray this pool started).

    Args:
        load: builds the model in each worker (called once per actor; e.g.
            ``rome_lens.load_model`` or a ``functools.partial`` of it). Also called in this
            process, at the first :meth:`map`, when running without Ray and ``model`` is None.
        workers: number of Ray actors; 1 (and no ``address``) runs here without Ray.
        address: a Ray cluster to connect to (``ray.init(address=...)``, e.g. ``"auto"`` or
            ``"ray://head:10001"``); None starts a local Ray (or uses one already started in
            this process).
        model: the model to use in this process when running without Ray (saves a load when
            the caller has one already); never sent to the workers.
        threads: torch threads (and Ray CPUs) per actor; default: an equal share of this
            machine's cores (:func:`threads_per_worker`) for a local Ray, 1 on a cluster.
            Without Ray: this process's torch threads during :meth:`map` (restored after);
            default: leave torch's setting alone.
        actor_options: extra ``ray.remote`` options of the actors (e.g. ``{"num_gpus": 1}``).

    Results are bit for bit those of a serial run with the same number of torch threads per
    process: a different thread count changes the order of floating-point sums (e.g. over the
    tokens of a statistics batch), which moves probabilities in their last digits.

    Raises:
        ValueError: ``workers`` or ``threads`` is below 1.
        rome_lens._extras.MissingExtraError: Ray is needed (``workers > 1`` or ``address``)
            but not installed; the message names ``pip install 'rome_lens[ray]'``.
    """

    def __init__(
        self,
        load: Callable[[], Model],
        *,
        workers: int = 1,
        address: str | None = None,
        model: Model | None = None,
        threads: int | None = None,
        actor_options: Mapping[str, Any] | None = None,
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be >= 1 or None, got {threads}")
        self.workers = workers
        self._load = load
        self._model = model
        self._ray: Any = None
        self._actors: list[Any] = []
        self._started_ray = False
        self._threads = threads
        self._closed = False
        self._distributed = workers > 1 or address is not None
        if not self._distributed:
            return
        ray = require("ray", f"--workers {workers} (a sweep on Ray)")
        if threads is None:
            threads = 1 if address is not None else threads_per_worker(workers)
        self._ray = ray
        if not ray.is_initialized():
            if address is None:
                # Room for every actor even with more workers than cores; each actor's own
                # thread count keeps it from oversubscribing the machine.
                ray.init(num_cpus=max(workers * threads, available_cores()),
                         include_dashboard=False, log_to_driver=False)
            else:
                ray.init(address=address)
            self._started_ray = True
        try:
            remote = ray.remote(num_cpus=threads, **dict(actor_options or {}))(_Worker)
            self._actors = [remote.remote(load, threads) for _ in range(workers)]
        except BaseException:
            self.close()
            raise
        logger.info("WorkerPool: %d Ray actors, %d torch thread(s) each", workers, threads)

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the actors and the Ray this pool started (idempotent)."""
        self._closed = True
        ray, self._ray = self._ray, None
        if ray is None:
            return
        for actor in self._actors:
            ray.kill(actor)
        self._actors = []
        if self._started_ray:
            ray.shutdown()

    def map(
        self,
        fn: Callable[[Model, R], T],
        records: Sequence[R],
        *,
        on_result: Callable[[int, T], None] | None = None,
        progress: bool = True,
        desc: str | None = None,
        stop: Callable[[], bool] | None = None,
    ) -> list[T]:
        """``[fn(model, r) for r in records]``, record ``i`` on actor ``i % workers``.

        Args:
            fn: the per-record function ``fn(model, record) -> result``. Every record of a
                worker sees the same model object, so ``fn`` must leave it as it found it (e.g.
                apply its edit in ``edit.applied(model)``). Must be picklable for Ray: a
                module-level function or a ``functools.partial`` of one, not a closure over a
                model.
            records: the records, in the order results are delivered and returned.
            on_result: called as ``on_result(i, result)`` for each record, in record order, as
                soon as the results of records ``0..i`` have all arrived (append to a JSONL
                here).
            progress: show a tqdm progress bar (it counts results as they arrive).
            desc: the progress bar's label.
            stop: asked before each record starts (e.g. a time budget); once it returns True
                no further record starts, and those already started finish.

        Returns:
            The results, in record order: of every record, or of the records before the first
            that ``stop`` kept from starting.

        Raises:
            RuntimeError: the pool is closed.
            ray.exceptions.RayTaskError: ``fn`` or ``load`` raised in a worker (results
                delivered before stay delivered).
        """
        records = list(records)
        if not records:
            return []
        if self._closed:
            raise RuntimeError("this WorkerPool is closed")
        if not self._distributed:
            return self._map_here(fn, records, on_result, progress, desc, stop)
        ray = self._ray
        fn_ref = ray.put(fn)  # sent once; each task gets it back from the object store
        # Tasks of one caller run on an actor in submission order, so which actor computes a
        # record depends on its index alone, never on timing. Two tasks queued per actor keep
        # it busy while a result travels back, and let ``stop`` act within a record or two.
        window = 2 * self.workers
        index: dict[Any, int] = {}
        arrived: dict[int, T] = {}
        results: list[T] = []
        pending: list[Any] = []
        submitted = 0
        stopped = False
        with tqdm(total=len(records), desc=desc, disable=not progress) as bar:
            while True:
                while submitted < len(records) and len(pending) < window and not stopped:
                    if stop is not None and stop():
                        stopped = True  # once asked to stop, start nothing more
                        break
                    actor = self._actors[submitted % self.workers]
                    ref = actor.run.remote(fn_ref, records[submitted])
                    index[ref] = submitted
                    pending.append(ref)
                    submitted += 1
                if not pending:
                    break
                ready, pending = ray.wait(pending, num_returns=1)
                for ref in ready:
                    arrived[index.pop(ref)] = ray.get(ref)
                    bar.update(1)
                while len(results) in arrived:  # hand back the finished prefix, in order
                    i = len(results)
                    results.append(arrived.pop(i))
                    if on_result is not None:
                        on_result(i, results[i])
        return results

    def _map_here(
        self,
        fn: Callable[[Model, R], T],
        records: list[R],
        on_result: Callable[[int, T], None] | None,
        progress: bool,
        desc: str | None,
        stop: Callable[[], bool] | None,
    ) -> list[T]:
        """The serial path: this process, no Ray."""
        previous = torch.get_num_threads()
        if self._threads is not None:
            torch.set_num_threads(self._threads)
        try:
            if self._model is None:
                self._model = self._load()
            results: list[T] = []
            for i, rec in enumerate(tqdm(records, desc=desc, disable=not progress)):
                if stop is not None and stop():
                    break
                results.append(fn(self._model, rec))
                if on_result is not None:
                    on_result(i, results[i])
            return results
        finally:
            torch.set_num_threads(previous)


def map_records(
    fn: Callable[[Model, R], T],
    records: Sequence[R],
    *,
    load: Callable[[], Model],
    workers: int = 1,
    address: str | None = None,
    model: Model | None = None,
    threads: int | None = None,
    on_result: Callable[[int, T], None] | None = None,
    progress: bool = True,
    desc: str | None = None,
    stop: Callable[[], bool] | None = None,
) -> list[T]:
    """One sweep on a :class:`WorkerPool` of its own: ``[fn(model, r) for r in records]``.

    Args:
        fn: the per-record function (see :meth:`WorkerPool.map`).
        records: the records, in the order results are delivered and returned.
        load: builds the model in each worker (see :class:`WorkerPool`).
        workers: number of Ray actors; 1 (and no ``address``) runs here without Ray.
        address: a Ray cluster to connect to; None: a local Ray.
        model: the model to use here when running without Ray.
        threads: torch threads per process (see :class:`WorkerPool`).
        on_result: called as ``on_result(i, result)`` in record order as results arrive.
        progress: show a tqdm progress bar.
        desc: the progress bar's label.
        stop: asked before each record starts; once True, no further record starts.

    Returns:
        The results, in record order (of the records before the first that ``stop`` kept
        from starting).
    """
    if not records:
        return []
    with WorkerPool(load, workers=workers, address=address, model=model,
                    threads=threads) as pool:
        return pool.map(fn, records, on_result=on_result, progress=progress, desc=desc,
                        stop=stop)
