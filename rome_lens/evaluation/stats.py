"""Does one yes/no property of an edit predict another? 2x2 tables and their odds ratio.

The ripple benchmark asks whether the probe's verdict (the original object survives
downstream: INSERTION) predicts that an edit's consequences fail to follow (compositional
failure). Each edit is a unit with two booleans, ``exposed`` (e.g. INSERTION) and ``event``
(e.g. failure); :class:`ContingencyTable` counts them and :func:`odds_ratio_test` gives

* the odds ratio ``(a d) / (b c)`` (rows exposed / unexposed, columns event / no event): the
  odds of the event among exposed units over the odds among the others; 1 means no
  association. **Zero cells** (Haldane-Anscombe correction): where any cell is 0, 0.5 is added
  to all four before dividing, so the ratio stays finite (it is pulled toward 1, a
  conservative bias). A table with an empty row or column has no contrast at all: its ratio is
  ``nan``, never a corrected number;
* a percentile **bootstrap** interval: units are resampled with replacement, each resample's
  table gets the same correction, resamples with an empty row or column are skipped (their
  count is reported), and the interval is read off the log ratios (seeded, deterministic);
* Fisher's exact two-sided p-value (the hypergeometric probability of tables at most as likely
  as the observed one, with the margins fixed), exact for the small tables the benchmark has;
* :func:`rank_auc`, for a continuous predictor (the original object's best rank): the
  probability that a unit with the event scores above one without (Mann-Whitney, ties 1/2).

Example:
    >>> table = ContingencyTable.from_pairs(
    ...     [(True, True)] * 6 + [(True, False)] * 2 + [(False, True)] + [(False, False)] * 4)
    >>> table
    ContingencyTable([[6, 2], [1, 4]])
    >>> odds_ratio(table)
    12.0
    >>> round(fisher_exact(table), 4)
    0.1026
    >>> result = odds_ratio_test(table.pairs(), resamples=200, seed=0)
    >>> result.low < result.estimate < result.high
    True
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

HALDANE = 0.5
"""What is added to every cell of a table with a zero cell (Haldane-Anscombe)."""


@dataclass(frozen=True, repr=False)
class ContingencyTable:
    """Counts of units by two booleans: exposure (rows) and event (columns).

    Attributes:
        a: exposed, with the event.
        b: exposed, without the event.
        c: unexposed, with the event.
        d: unexposed, without the event.
    """

    a: int
    b: int
    c: int
    d: int

    def __post_init__(self) -> None:
        if min(self.a, self.b, self.c, self.d) < 0:
            raise ValueError(f"counts must be >= 0, got {self.rows}")

    def __repr__(self) -> str:
        return f"ContingencyTable({self.rows})"

    @classmethod
    def from_pairs(cls, pairs: Iterable[tuple[bool, bool]]) -> ContingencyTable:
        """The table of ``(exposed, event)`` pairs, one per unit."""
        counts = {key: 0 for key in ((True, True), (True, False), (False, True), (False, False))}
        for exposed, event in pairs:
            counts[(bool(exposed), bool(event))] += 1
        return cls(counts[(True, True)], counts[(True, False)], counts[(False, True)],
                   counts[(False, False)])

    @property
    def rows(self) -> list[list[int]]:
        """``[[a, b], [c, d]]``."""
        return [[self.a, self.b], [self.c, self.d]]

    @property
    def n(self) -> int:
        """The number of units."""
        return self.a + self.b + self.c + self.d

    @property
    def has_contrast(self) -> bool:
        """Whether both rows and both columns have units (else no odds ratio exists)."""
        return min(self.a + self.b, self.c + self.d, self.a + self.c, self.b + self.d) > 0

    def pairs(self) -> list[tuple[bool, bool]]:
        """The units as ``(exposed, event)`` pairs (inverse of :meth:`from_pairs`)."""
        return ([(True, True)] * self.a + [(True, False)] * self.b
                + [(False, True)] * self.c + [(False, False)] * self.d)

    def event_rate(self, exposed: bool) -> float:
        """The fraction of a row's units with the event (nan for an empty row)."""
        hit, miss = (self.a, self.b) if exposed else (self.c, self.d)
        return hit / (hit + miss) if hit + miss else math.nan


def odds_ratio(table: ContingencyTable, correction: float = HALDANE) -> float:
    """``(a d) / (b c)``, with ``correction`` added to every cell where one is zero.

    Args:
        table: the counts.
        correction: added to all four cells when any is zero (0 disables it: a zero cell then
            gives 0 or inf, and 0/0 gives nan).

    Returns:
        The odds ratio; ``nan`` when a row or column is empty (nothing to compare).

    Example:
        >>> odds_ratio(ContingencyTable(0, 5, 4, 8))  # (0.5 * 8.5) / (5.5 * 4.5)
        0.171...
    """
    if not table.has_contrast:
        return math.nan
    a, b, c, d = (float(x) for x in (table.a, table.b, table.c, table.d))
    if min(a, b, c, d) == 0.0:
        a, b, c, d = a + correction, b + correction, c + correction, d + correction
    if b * c == 0.0:
        return math.inf if a * d > 0.0 else math.nan
    return a * d / (b * c)


def fisher_exact(table: ContingencyTable) -> float:
    """Fisher's exact test, two-sided: P(a table no more likely than this one | margins).

    Example:
        >>> round(fisher_exact(ContingencyTable(3, 1, 1, 3)), 4)  # the lady tasting tea
        0.4857
    """
    row, col, n = table.a + table.b, table.a + table.c, table.n
    if n == 0:
        return 1.0
    total = math.comb(n, col)

    def prob(a: int) -> float:
        return math.comb(row, a) * math.comb(n - row, col - a) / total

    observed = prob(table.a)
    tables = range(max(0, col - (n - row)), min(row, col) + 1)
    p_value = sum(p for a in tables if (p := prob(a)) <= observed * (1.0 + 1e-7))
    return min(1.0, p_value)


def rank_auc(events: Sequence[float], others: Sequence[float]) -> float:
    """P(a unit with the event scores above one without), ties counted 1/2 (Mann-Whitney).

    Returns:
        The AUC in [0, 1]; 0.5 means the score does not separate the groups; nan if a group
        is empty.

    Example:
        >>> rank_auc([3.0, 4.0], [1.0, 2.0]), rank_auc([1.0], [1.0])
        (1.0, 0.5)
    """
    if not events or not others:
        return math.nan
    wins = sum((e > o) + 0.5 * (e == o) for e in events for o in others)
    return wins / (len(events) * len(others))


@dataclass(frozen=True, repr=False)
class OddsRatio:
    """An odds ratio with its bootstrap interval and Fisher's exact p-value.

    Attributes:
        table: the observed table.
        estimate: its odds ratio (:func:`odds_ratio`, corrected where a cell is zero).
        low: the interval's lower end.
        high: the interval's upper end.
        p_value: Fisher's exact two-sided p-value.
        level: the interval's coverage.
        resamples: bootstrap resamples drawn.
        skipped: resamples without contrast (an empty row or column), left out.
        correction: what was added to the cells of tables with a zero cell.
    """

    table: ContingencyTable
    estimate: float
    low: float
    high: float
    p_value: float
    level: float
    resamples: int
    skipped: int
    correction: float

    def __repr__(self) -> str:
        return (f"OddsRatio({self.estimate:.3g} [{self.low:.3g}, {self.high:.3g}], "
                f"p={self.p_value:.3g}, {self.table.rows})")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the table as ``[[a, b], [c, d]]``)."""
        return {
            "table": self.table.rows, "n": self.table.n, "odds_ratio": self.estimate,
            "ci": [self.low, self.high], "level": self.level, "fisher_p": self.p_value,
            "event_rate_exposed": self.table.event_rate(True),
            "event_rate_unexposed": self.table.event_rate(False),
            "resamples": self.resamples, "skipped_resamples": self.skipped,
            "correction": self.correction,
        }


def odds_ratio_test(
    pairs: Sequence[tuple[bool, bool]], *, resamples: int = 2000, level: float = 0.95,
    seed: int = 0, correction: float = HALDANE,
) -> OddsRatio:
    """The odds ratio of ``(exposed, event)`` units with a percentile bootstrap interval.

    Args:
        pairs: one ``(exposed, event)`` pair per unit (e.g. per edit).
        resamples: bootstrap resamples of the units.
        level: the interval's coverage, in (0, 1).
        seed: the resampling seed (the result is deterministic per seed).
        correction: added to every cell of a (resampled) table with a zero cell.

    Returns:
        An :class:`OddsRatio`; estimate and interval are ``nan`` without contrast.

    Raises:
        ValueError: ``level`` outside (0, 1) or ``resamples`` below 1.
    """
    if not 0.0 < level < 1.0 or resamples < 1:
        raise ValueError(f"need 0 < level < 1 and resamples >= 1, got {level}, {resamples}")
    table = ContingencyTable.from_pairs(pairs)
    estimate = odds_ratio(table, correction)
    low = high = math.nan
    skipped = resamples
    if table.has_contrast:
        logs = _bootstrap_log_ratios(pairs, resamples, seed, correction)
        skipped = resamples - int(logs.numel())
        if logs.numel():
            tail = (1.0 - level) / 2
            q = torch.quantile(logs, torch.tensor([tail, 1.0 - tail], dtype=torch.float64))
            low, high = math.exp(float(q[0])), math.exp(float(q[1]))
    return OddsRatio(table, estimate, low, high, fisher_exact(table), level, resamples,
                     skipped, correction)


def _bootstrap_log_ratios(
    pairs: Sequence[tuple[bool, bool]], resamples: int, seed: int, correction: float
) -> torch.Tensor:
    """Log odds ratios of the resamples that have contrast (cells corrected as observed)."""
    cell = torch.tensor([2 * (not e) + (not v) for e, v in pairs])  # 0=a, 1=b, 2=c, 3=d
    gen = torch.Generator().manual_seed(seed)
    index = torch.randint(len(pairs), (resamples, len(pairs)), generator=gen)
    counts = torch.nn.functional.one_hot(cell[index], 4).sum(dim=1).to(torch.float64)
    a, b, c, d = counts.unbind(dim=1)
    contrast = torch.stack([a + b, c + d, a + c, b + d]).amin(dim=0) > 0
    zero = counts.amin(dim=1) == 0
    counts = counts + correction * zero[:, None].to(torch.float64)
    a, b, c, d = counts[contrast].unbind(dim=1)
    logs = a.log() + d.log() - b.log() - c.log()
    return logs[~logs.isnan()]  # 0/0 exists only without a correction
