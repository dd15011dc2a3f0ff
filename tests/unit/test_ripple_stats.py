"""The 2x2 statistics of the ripple benchmark on hand-made tables with known answers.

Fisher p-values are the textbook ones (the lady tasting tea, 34/70... for [[3, 1], [1, 3]])
and SciPy's documented example (``fisher_exact([[6, 2], [1, 4]])``: 12.0, p = 0.10256...).
"""

from __future__ import annotations

import doctest
import math

import pytest

from rome_lens.evaluation import (
    ContingencyTable,
    OddsRatio,
    fisher_exact,
    odds_ratio,
    odds_ratio_test,
    rank_auc,
)
from rome_lens.evaluation import stats as stats_module

TEA = ContingencyTable(3, 1, 1, 3)
SCIPY = ContingencyTable(6, 2, 1, 4)


def test_table_counts_pairs_and_round_trips() -> None:
    pairs = [(True, True)] * 2 + [(True, False)] + [(False, False)] * 4
    table = ContingencyTable.from_pairs(pairs)
    assert table.rows == [[2, 1], [0, 4]] and table.n == 7
    assert ContingencyTable.from_pairs(table.pairs()) == table
    assert table.event_rate(True) == pytest.approx(2 / 3) and table.event_rate(False) == 0.0
    assert math.isnan(ContingencyTable(0, 0, 1, 1).event_rate(True))
    with pytest.raises(ValueError, match=">= 0"):
        ContingencyTable(-1, 0, 0, 0)


def test_odds_ratio_of_full_tables() -> None:
    assert odds_ratio(SCIPY) == 12.0
    assert odds_ratio(ContingencyTable(10, 5, 4, 8)) == 4.0
    assert odds_ratio(ContingencyTable(5, 10, 8, 4)) == 0.25
    assert odds_ratio(ContingencyTable(3, 3, 7, 7)) == 1.0


def test_zero_cells_get_the_haldane_correction_everywhere() -> None:
    assert odds_ratio(ContingencyTable(0, 5, 4, 8)) == pytest.approx(0.5 * 8.5 / (5.5 * 4.5))
    assert odds_ratio(ContingencyTable(5, 0, 4, 8)) == pytest.approx(5.5 * 8.5 / (0.5 * 4.5))
    assert odds_ratio(ContingencyTable(5, 0, 4, 8), correction=0.0) == math.inf
    assert odds_ratio(ContingencyTable(0, 5, 4, 8), correction=0.0) == 0.0
    # no contrast (an empty row or column): no ratio at all, not a corrected 1
    for table in (ContingencyTable(0, 0, 4, 8), ContingencyTable(3, 0, 4, 0),
                  ContingencyTable(0, 0, 0, 0)):
        assert not table.has_contrast and math.isnan(odds_ratio(table))


def test_fisher_exact_matches_known_p_values() -> None:
    assert fisher_exact(TEA) == pytest.approx(34 / 70)
    assert fisher_exact(SCIPY) == pytest.approx(0.10256410256410257)
    assert fisher_exact(ContingencyTable(5, 0, 0, 5)) == pytest.approx(2 / 252)
    assert fisher_exact(ContingencyTable(2, 2, 2, 2)) == pytest.approx(1.0)
    assert fisher_exact(ContingencyTable(0, 0, 0, 0)) == 1.0


def test_bootstrap_interval_is_deterministic_and_brackets_the_ratio() -> None:
    pairs = ContingencyTable(20, 10, 8, 16).pairs()
    result = odds_ratio_test(pairs, resamples=500, seed=1)
    assert isinstance(result, OddsRatio)
    assert result == odds_ratio_test(pairs, resamples=500, seed=1)
    assert result.estimate == 4.0 and result.low < 4.0 < result.high
    assert 1.0 < result.low  # a strong association on 54 units excludes 1
    assert result.skipped == 0 and result.correction == 0.5
    narrower = odds_ratio_test(pairs, resamples=500, seed=1, level=0.5)
    assert result.low < narrower.low < narrower.high < result.high
    as_dict = result.to_dict()
    assert as_dict["table"] == [[20, 10], [8, 16]] and as_dict["n"] == 54
    assert as_dict["event_rate_exposed"] == pytest.approx(2 / 3)


def test_bootstrap_with_zero_cells_and_without_contrast() -> None:
    sparse = odds_ratio_test(ContingencyTable(6, 0, 2, 5).pairs(), resamples=400, seed=0)
    assert math.isfinite(sparse.estimate) and math.isfinite(sparse.high)
    assert sparse.low <= sparse.estimate <= sparse.high
    assert sparse.p_value == pytest.approx(fisher_exact(ContingencyTable(6, 0, 2, 5)))
    flat = odds_ratio_test([(True, True), (True, False)], resamples=50)
    assert math.isnan(flat.estimate) and math.isnan(flat.low) and flat.skipped == 50
    tiny = odds_ratio_test(ContingencyTable(1, 0, 0, 1).pairs(), resamples=200, seed=0)
    assert 0 < tiny.skipped < 200  # resamples that drew one row only are left out
    with pytest.raises(ValueError, match="level"):
        odds_ratio_test([(True, True)], level=1.0)


def test_rank_auc() -> None:
    assert rank_auc([3.0, 4.0], [1.0, 2.0]) == 1.0
    assert rank_auc([1.0, 2.0], [3.0, 4.0]) == 0.0
    assert rank_auc([1.0, 3.0], [2.0, 2.0]) == 0.5
    assert rank_auc([2.0], [2.0, 1.0]) == 0.75
    assert math.isnan(rank_auc([], [1.0]))


def test_repr_and_examples() -> None:
    result = odds_ratio_test(SCIPY.pairs(), resamples=100, seed=0)
    assert repr(result).startswith("OddsRatio(12 [") and "[[6, 2], [1, 4]]" in repr(result)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for test in finder.find(stats_module, globs=vars(stats_module)):
        runner.run(test)
    assert runner.tries > 0 and runner.failures == 0
