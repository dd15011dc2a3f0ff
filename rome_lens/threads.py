"""Torch threads that fit a shared machine: one fewer for every core another process holds.

torch runs one OpenMP thread per core and its threads wait for each other at the end of every
parallel operation. When another process holds one of the cores, the thread that shares that
core runs only part of the time and the others wait for it: on 2 cores a busy second process
slowed a short ROME edit 2.8-3.0x (``benchmarks/contention.py``), more than the 2x that losing one
core of two costs. :func:`fit_threads`, called at the start of every edit, causal trace and
sampling run (and per target chunk and per layer of a many-fact edit), measures how many cores
other processes keep busy (``/proc/stat``: since its last look when that was 0.1-30 s ago, as in
a loop of edits, otherwise over the next 0.1 s) and runs torch with the rest (at least one, at
most the count torch had when rome_lens first looked, or the count the user set since).

The environment variable ``ROME_LENS_THREADS`` chooses the policy: ``auto`` (default), a number
(always that many threads), or ``torch`` (never touch torch's setting). Results are identical
bit for bit only between runs with the same thread count: set a number for that.

Example:
    >>> from rome_lens.threads import fit_threads
    >>> fit_threads() >= 1
    True
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import NamedTuple

import torch

logger = logging.getLogger(__name__)

ENV = "ROME_LENS_THREADS"
SAMPLE_S = 0.1  # how long the busy cores are measured (at least)
MAX_WINDOW_S = 30.0  # the longest time since the last look that still counts as "now"


class _Look(NamedTuple):
    """Seconds at one look: busy CPU time of the machine, CPU time of this process, wall clock."""

    busy: float
    own: float
    wall: float


@dataclass
class _State:
    ceiling: int | None = None  # the most threads: torch's (or the user's) count
    last_set: int | None = None  # what fit_threads last set
    last_look: _Look | None = None  # the last look at /proc/stat


_STATE = _State()


def _cpu_busy_seconds() -> float | None:
    """Busy CPU time of the whole machine (all cores) from ``/proc/stat``; None without it."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    ticks = [int(x) for x in fields[1:]]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    busy = sum(ticks[:8]) - idle  # user nice system idle iowait irq softirq steal
    return busy / os.sysconf("SC_CLK_TCK")


def cores() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _look() -> _Look | None:
    """A look now (None without ``/proc/stat``)."""
    busy = _cpu_busy_seconds()
    return None if busy is None else _Look(busy, time.process_time(), time.perf_counter())


def _others_between(start: _Look, end: _Look) -> float:
    """Cores kept busy by other processes between two looks (machine busy minus our own)."""
    return max(0.0, (end.busy - start.busy) - (end.own - start.own)) / (end.wall - start.wall)


def busy_cores(seconds: float = SAMPLE_S) -> float | None:
    """Cores kept busy by OTHER processes over the next ``seconds`` (None where unknown)."""
    start = _look()
    if start is None:
        return None
    time.sleep(seconds)
    end = _look()
    if end is None or end.wall <= start.wall:
        return None
    return _others_between(start, end)


def recent_busy_cores() -> float | None:
    """Cores kept busy by OTHER processes recently, without waiting where possible.

    Since the previous call when that was ``SAMPLE_S`` to ``MAX_WINDOW_S`` seconds ago (the
    previous edit of a loop: no 0.1 s pause per edit); otherwise :func:`busy_cores` samples
    the next ``SAMPLE_S`` seconds. None where ``/proc/stat`` is missing.
    """
    now, last = _look(), _STATE.last_look
    if now is not None and last is not None and SAMPLE_S <= now.wall - last.wall <= MAX_WINDOW_S:
        _STATE.last_look = now
        return _others_between(last, now)
    busy = busy_cores()
    _STATE.last_look = _look()
    return busy


def choose_threads(available: int, busy: float, ceiling: int) -> int:
    """Threads for ``available`` cores when others keep ``busy`` of them busy (1..ceiling).

    A core counts as taken when another process keeps it busy at least half the time.

    Example:
        >>> choose_threads(available=2, busy=1.0, ceiling=2)
        1
        >>> choose_threads(available=2, busy=0.3, ceiling=2)
        2
    """
    free = available - int(busy + 0.5)
    return max(1, min(ceiling, free))


def fit_threads() -> int:
    """Set torch's thread count for the cores free now (see the module docstring); return it."""
    setting = os.environ.get(ENV, "auto").strip().lower()
    if setting == "torch":
        return torch.get_num_threads()
    if setting != "auto":
        try:
            fixed = int(setting)
        except ValueError as err:
            raise ValueError(f"{ENV} must be 'auto', 'torch' or a number, got {setting!r}") from err
        if fixed < 1:
            raise ValueError(f"{ENV} must be at least 1, got {fixed}")
        torch.set_num_threads(fixed)
        return fixed
    current = torch.get_num_threads()
    if _STATE.ceiling is None or current != _STATE.last_set:
        _STATE.ceiling = current  # first call, or the user set a count since: respect it
    busy = recent_busy_cores()
    if busy is None:
        return current
    threads = choose_threads(cores(), busy, _STATE.ceiling)
    if threads != current:
        logger.info("torch threads %d -> %d (other processes keep %.1f cores busy)",
                    current, threads, busy)
        torch.set_num_threads(threads)
    _STATE.last_set = threads
    return threads
