"""Plots (matplotlib, imported lazily so the core never needs a display).

This module imports nothing from the rest of rome_lens but its extras helper: a plot takes any
value with the attributes it draws (see :class:`TraceGrids`, :class:`ClassEffects`), so result
values can import their plots without an import cycle. matplotlib is the ``rome_lens[plots]``
extra.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from rome_lens._extras import require

if TYPE_CHECKING:
    import torch


class TraceGrids(Protocol):
    """What :func:`trace_heatmaps` draws (e.g. a ``CausalTraceResult``)."""

    prompt: str
    answer: str
    tokens: list[str]
    subject_span: tuple[int, int]
    p_clean: float
    p_corrupted: float
    scores: dict[str, torch.Tensor]
    window: int


class ClassEffects(Protocol):
    """What :func:`summary_heatmaps` draws (e.g. a ``TraceSummary``)."""

    n_facts: int
    p_clean: float
    p_corrupted: float
    effects: dict[str, dict[str, torch.Tensor]]

    @property
    def total_effect(self) -> float:
        """Average ``p_clean - p_corrupted``."""
        ...

_TITLES = {
    "resid": "single restored layer (residual)",
    "mlp": "restored MLP (window)",
    "attn": "restored attention (window)",
}
_CMAPS = {"resid": "Purples", "mlp": "Greens", "attn": "Reds"}



def _pyplot() -> Any:
    """Matplotlib's pyplot on a non-interactive backend (an extra: ``rome_lens[plots]``)."""
    matplotlib = require("matplotlib", "plotting")
    matplotlib.use("Agg", force=False)
    return require("matplotlib.pyplot", "plotting")

def trace_heatmaps(
    trace: TraceGrids, path: str | None = None, title: str | None = None
) -> Any:
    """The ROME paper's causal-trace heatmaps: p(answer) after restoring each state."""
    plt = _pyplot()

    kinds = list(trace.scores)
    fig, axes = plt.subplots(
        1, len(kinds), figsize=(4.2 * len(kinds), 0.35 * len(trace.tokens) + 1.6), squeeze=False
    )
    labels = [
        f"{tok}*" if trace.subject_span[0] <= i < trace.subject_span[1] else tok
        for i, tok in enumerate(trace.tokens)
    ]
    for ax, kind in zip(axes[0], kinds, strict=True):
        grid = trace.scores[kind].T.numpy()  # [pos, layer]
        im = ax.pcolormesh(grid, cmap=_CMAPS.get(kind, "viridis"), vmin=trace.p_corrupted)
        ax.invert_yaxis()
        ax.set_yticks([i + 0.5 for i in range(len(labels))])
        ax.set_yticklabels(labels)
        ax.set_xlabel("layer" if kind == "resid" else f"centre of {trace.window}-layer window")
        ax.set_title(_TITLES.get(kind, kind), fontsize=10)
        cbar = fig.colorbar(im, ax=ax)
        cbar.set_label(f"p({trace.answer.strip()!s})")
    return _finish(
        fig,
        title
        or f"{trace.prompt!r} -> {trace.answer!r}  (clean {trace.p_clean:.3f}, "
        f"corrupted {trace.p_corrupted:.3f})",
        path,
    )


def summary_heatmaps(
    summary: ClassEffects, path: str | None = None, row_order: Sequence[str] | None = None
) -> Any:
    """Average indirect effect by token class (rows) and layer (columns), one panel per kind.

    Args:
        summary: the effects to draw.
        path: where to save the figure (optional).
        row_order: order of the token classes (default: as stored); classes not in it are left
            out.
    """
    plt = _pyplot()
    import numpy as np

    kinds = list(summary.effects)
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.6 * len(kinds), 3.4), squeeze=False)
    for ax, kind in zip(axes[0], kinds, strict=True):
        classes = _ordered(summary.effects[kind], row_order)
        grid = np.stack([summary.effects[kind][c].numpy() for c in classes])
        im = ax.pcolormesh(grid, cmap=_CMAPS.get(kind, "viridis"))
        ax.invert_yaxis()
        ax.set_yticks([i + 0.5 for i in range(len(classes))])
        ax.set_yticklabels(classes, fontsize=8)
        ax.set_xlabel("layer")
        ax.set_title(f"average indirect effect: {kind}", fontsize=10)
        fig.colorbar(im, ax=ax)
    return _finish(
        fig,
        f"{summary.n_facts} facts: p clean {summary.p_clean:.3f}, "
        f"corrupted {summary.p_corrupted:.3f}, total effect {summary.total_effect:.3f}",
        path,
    )


def _ordered(rows: Mapping[str, Any], order: Sequence[str] | None) -> list[str]:
    """The keys of ``rows`` in ``order`` (default: as stored)."""
    return list(rows) if order is None else [key for key in order if key in rows]


def _finish(fig: Any, title: str, path: str | None) -> Any:
    """Title, layout and optional save, shared by every figure."""
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    if path:
        fig.savefig(path, dpi=120)
    return fig


def probe_ranks(report: Any, path: str | None = None, prompt_kind: str = "edit") -> Any:
    """Rank of the old and new object by layer (log scale), pre vs post, at both positions.

    One row of panels per lens, one column per position; the edit layer is marked.
    """
    plt = _pyplot()

    rows = [r for r in report.records if r["prompt_kind"] == prompt_kind]
    index = min(r["prompt_index"] for r in rows)
    rows = [r for r in rows if r["prompt_index"] == index]
    lenses = sorted({r["lens"] for r in rows}, key=["logit", "tuned"].index)
    positions = ["last_subject", "last"]
    fig, axes = plt.subplots(
        len(lenses), 2, figsize=(10, 3.2 * len(lenses)), squeeze=False, sharey=True
    )
    styles = {("old", "pre"): ("tab:blue", ":"), ("old", "post"): ("tab:blue", "-"),
              ("new", "pre"): ("tab:red", ":"), ("new", "post"): ("tab:red", "-"),
              ("old", "control"): ("tab:gray", "--")}
    names = {"old": report.request.target_true, "new": report.request.target_new}
    for i, lens in enumerate(lenses):
        for j, pos in enumerate(positions):
            ax = axes[i][j]
            for (obj, cond), (color, ls) in styles.items():
                pts = sorted((r["layer"], r["rank"]) for r in rows
                             if r["lens"] == lens and r["position"] == pos
                             and r["object"] == obj and r["condition"] == cond)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], color=color, ls=ls,
                            marker="o", ms=3, label=f"{names[obj]} ({obj}, {cond})")
            ax.axvline(report.layer, color="k", lw=0.8)
            ax.axhline(report.rule.top_k, color="tab:green", lw=0.6, ls="--")
            ax.set_yscale("log")
            ax.invert_yaxis()
            ax.set_xlabel("layer")
            ax.set_ylabel("rank (1 = top)")
            ax.set_title(f"{lens} lens, {pos.replace('_', ' ')} token", fontsize=9)
    axes[0][1].legend(fontsize=7, loc="lower right")
    return _finish(
        fig,
        f"{report.request.text!r}: {report.request.target_true} -> {report.request.target_new} "
        f"at layer {report.layer}: {report.verdict}",
        path,
    )


def forensic_scan(report: Any, path: str | None = None) -> Any:
    """A forensic scan: every layer's spectral outlier score, and each finding's spectrum.

    Left: the outlier score of each MLP output weight's top component (bars; red where a finding
    sits) against the threshold, and (blind scans) each layer's key-subspace score (diamonds)
    against its threshold. Right: singular values of each finding's change (log scale).
    """
    plt = _pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4), squeeze=False)
    scores = [float(s) for s in report.layer_scores]
    flagged = set(report.layers)
    colors = ["tab:red" if i in flagged else "tab:gray" for i in range(len(scores))]
    ax = axes[0][0]
    ax.bar(range(len(scores)), scores, color=colors)
    ax.axhline(report.threshold, color="k", lw=0.8, ls="--", label="threshold")
    if getattr(report, "key_scores", None) is not None:
        keys = [float(s) for s in report.key_scores]
        ax.plot(range(len(keys)), keys, "D", color="tab:blue", ms=4, label="key-subspace score")
        ax.axhline(report.key_threshold, color="tab:blue", lw=0.8, ls=":",
                   label="key threshold")
    ax.set_xlabel("layer")
    ax.set_ylabel("outlier score of the top component")
    ax.legend(fontsize=7)
    ax = axes[0][1]
    for finding in report.findings[:8]:
        values = list(finding.singular_values)
        if values:
            label = f"{finding.weight}" + (f" -> {finding.objects[0]!r}" if finding.objects else "")
            ax.plot(range(1, len(values) + 1), values, marker="o", ms=3, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("component")
    ax.set_ylabel("singular value")
    if report.findings:
        ax.legend(fontsize=7)
    n = len(report.findings)
    return _finish(fig, f"forensic scan ({report.mode}): {n} finding{'' if n == 1 else 's'}",
                   path)
