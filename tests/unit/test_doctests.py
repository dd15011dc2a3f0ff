"""Every docstring example of the package runs, on tiny random models.

The examples document the real API on the real model (``model`` is the embedded Gemma in the
docs); here they run against a tiny random model with a character-level tokenizer, so they show
outputs only where those are the same on any model (shapes, types, reprs with ``...``). Lines
that truly need the embedded model or the network are marked ``# doctest: +SKIP``.

Names every example may use (besides the names of its own module):

* ``rome_lens``, ``torch``, ``dataclasses``, ``EditRequest``, ``RomeHyperParams``;
* ``model``: a tiny Gemma-layout HookedTransformer (TransformerLens 4.x: the tiny bridge);
* ``request``: ``EditRequest("{} lives in", "Alice Smith", "Paris", "Rome")``;
* ``hp``: small ROME hyperparameters (layer 1, few Adam steps, few contexts, a small corpus);
* ``corpus``: a few short texts for key statistics;
* ``tmp``: a fresh temporary directory (``pathlib.Path``), the working directory of the test.
"""

from __future__ import annotations

import dataclasses
import doctest
import importlib
import pkgutil
from pathlib import Path
from types import ModuleType
from typing import Any

import matplotlib
import pytest
import torch
from _support import STATS_CORPUS, one_thread
from tiny import HAS_HOOKED, tiny_model

import rome_lens
from rome_lens import EditRequest, RomeHyperParams

OPTIONS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
matplotlib.use("Agg")  # examples draw figures; no window


def _modules() -> list[ModuleType]:
    found = [rome_lens]
    for info in pkgutil.walk_packages(rome_lens.__path__, prefix="rome_lens."):
        found.append(importlib.import_module(info.name))
    return found


def _examples(module: ModuleType) -> list[doctest.DocTest]:
    finder = doctest.DocTestFinder(exclude_empty=True)
    tests = finder.find(module, module.__name__, globs={})
    return sorted((t for t in tests if t.examples), key=lambda t: t.lineno or 0)


MODULES_WITH_EXAMPLES = {m.__name__: m for m in _modules() if _examples(m)}


def _namespace(tmp: Path) -> dict[str, Any]:
    model = tiny_model("gemma" if HAS_HOOKED else "bridge")
    hp = RomeHyperParams(
        layer=1, v_num_grad_steps=5, n_contexts_short=2, context_len_short=3,
        n_contexts_long=2, context_len_long=5, stats_sequences=64, stats_seq_len=32,
        mom2_ridge=1e-3,
    )
    return {
        "rome_lens": rome_lens,
        "torch": torch,
        "dataclasses": dataclasses,
        "EditRequest": EditRequest,
        "RomeHyperParams": RomeHyperParams,
        "model": model,
        "request": EditRequest("{} lives in", "Alice Smith", "Paris", "Rome"),
        "hp": hp,
        "corpus": list(STATS_CORPUS),
        "tmp": tmp,
    }


@pytest.fixture(scope="session")
def _cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache for every module's examples: statistics are computed once per tiny model."""
    return tmp_path_factory.mktemp("doctest_cache")


def test_the_package_has_examples() -> None:
    assert "rome_lens" in MODULES_WITH_EXAMPLES
    assert "rome_lens.rome.compute" in MODULES_WITH_EXAMPLES


@pytest.mark.parametrize("name", sorted(MODULES_WITH_EXAMPLES))
def test_docstring_examples(
    name: str, tmp_path: Path, _cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ROME_LENS_CACHE", str(_cache_dir))
    monkeypatch.chdir(tmp_path)  # examples that save files write them here
    module = MODULES_WITH_EXAMPLES[name]
    globs = {**vars(module), **_namespace(tmp_path)}
    runner = doctest.DocTestRunner(optionflags=OPTIONS)
    report = _Output()
    with one_thread():
        for test in _examples(module):
            test.globs = dict(globs)
            runner.run(test, out=report, clear_globs=True)
    import matplotlib.pyplot as plt

    plt.close("all")
    if report.text:
        pytest.fail(report.text, pytrace=False)


class _Output:
    """Collects a doctest runner's report of failures."""

    def __init__(self) -> None:
        self.text = ""

    def __call__(self, text: str) -> None:
        self.text += text
