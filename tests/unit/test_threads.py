"""rome_lens.threads: torch threads that fit the cores other processes leave free."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
import torch

from rome_lens import threads


@pytest.fixture(autouse=True)
def _restore_threads(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    before = torch.get_num_threads()
    monkeypatch.setattr(threads, "_STATE", threads._State())
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize(
    ("available", "busy", "ceiling", "expected"),
    [(2, 0.0, 2, 2), (2, 0.3, 2, 2), (2, 0.6, 2, 1), (2, 1.0, 2, 1), (2, 2.0, 2, 1),
     (8, 3.0, 8, 5), (8, 0.0, 4, 4)],
)
def test_choose_threads(available: int, busy: float, ceiling: int, expected: int) -> None:
    assert threads.choose_threads(available, busy, ceiling) == expected


def test_fixed_and_torch_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.set_num_threads(2)
    monkeypatch.setenv(threads.ENV, "1")
    assert threads.fit_threads() == 1 and torch.get_num_threads() == 1
    torch.set_num_threads(2)
    monkeypatch.setenv(threads.ENV, "torch")
    assert threads.fit_threads() == 2 and torch.get_num_threads() == 2
    for bad in ("many", "0"):
        monkeypatch.setenv(threads.ENV, bad)
        with pytest.raises(ValueError, match=threads.ENV):
            threads.fit_threads()


def test_auto_follows_busy_cores_and_respects_the_user(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(threads.ENV, "auto")
    monkeypatch.setattr(threads, "cores", lambda: 2)
    busy = {"now": 1.0}
    monkeypatch.setattr(threads, "busy_cores", lambda seconds=0.1: busy["now"])
    torch.set_num_threads(2)
    assert threads.fit_threads() == 1 and torch.get_num_threads() == 1  # a core is taken
    busy["now"] = 0.0
    assert threads.fit_threads() == 2  # freed: back to the count torch had
    torch.set_num_threads(1)  # the user's choice is the new ceiling
    assert threads.fit_threads() == 1
    monkeypatch.setattr(threads, "busy_cores", lambda seconds=0.1: None)  # no /proc/stat
    assert threads.fit_threads() == 1


@pytest.fixture
def spinning_child() -> Iterator[None]:
    """Another process keeping one core busy for the test (skipped without /proc/stat)."""
    if threads.busy_cores(0.01) is None:
        pytest.skip("no /proc/stat")
    loop = "import time\nend = time.time() + 5\nwhile time.time() < end:\n    pass\n"
    child = subprocess.Popen([sys.executable, "-c", loop])
    try:
        time.sleep(0.3)  # let it start spinning
        yield
    finally:
        child.kill()
        child.wait()


def test_busy_cores_sees_another_process(spinning_child: None) -> None:
    busy = threads.busy_cores(0.5)
    assert busy is not None and busy >= 0.6, busy  # one core, whatever else runs


def test_a_loop_reuses_the_last_look_instead_of_pausing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(threads.ENV, "auto")
    if threads.busy_cores(0.01) is None:
        pytest.skip("no /proc/stat")
    threads.fit_threads()  # first look: samples SAMPLE_S
    time.sleep(threads.SAMPLE_S * 1.5)  # an edit's worth of work since

    def no_sampling(seconds: float = 0.1) -> float:
        raise AssertionError("sampled again although the last look is recent")

    monkeypatch.setattr(threads, "busy_cores", no_sampling)
    start = time.perf_counter()
    threads.fit_threads()
    assert time.perf_counter() - start < threads.SAMPLE_S  # no pause
    # right after a look the window is too short: it samples again
    calls: list[float] = []
    monkeypatch.setattr(threads, "busy_cores", lambda seconds=0.1: calls.append(seconds) or 0.0)
    threads.fit_threads()
    assert calls == [threads.SAMPLE_S]


def test_the_window_since_the_last_look_sees_another_process(spinning_child: None) -> None:
    assert threads.recent_busy_cores() is not None  # first look: samples
    time.sleep(0.5)  # the window
    busy = threads.recent_busy_cores()
    assert busy is not None and busy >= 0.6, busy  # one core, whatever else runs
