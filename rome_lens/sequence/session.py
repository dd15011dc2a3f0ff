"""Sequential editing: a session that computes, applies, monitors, saves and undoes edits.

Sequential editing (Gupta et al. 2024; the MEMIT and AlphaEdit papers) writes batch after batch
of facts into one model, each computed on the model with every earlier batch applied. With
rome_lens that is already the plain call (``compute_edit`` on an edited model records the
applied edits as ``edit.parents``); :class:`EditSequence` adds the bookkeeping a sequence
needs, for any registered method:

* ``add(requests)`` computes the next edit with :func:`rome_lens.compute_edit` on the model as
  it is (earlier edits applied), applies it, checks its health
  (:class:`~rome_lens.audit.HealthMonitor`: update norms, weight growth, fluency; disabling
  edits are flagged with a warning) and records it. A failing ``add`` (a bad request, an
  interrupted computation, a failing check) leaves the model and the sequence exactly as before.
* ``revert()`` undoes the whole sequence bit for bit (the weights equal those before the
  sequence, ``torch.equal``; edits applied before the sequence stay); ``pop()`` undoes the last
  edit, ``remove(i)`` any one (the others stay, recomputed exactly).
* ``save(folder)`` writes every edit file and a JSON manifest (order, ids, method, health);
  :meth:`EditSequence.load` re-applies them in order on a fresh copy of the model, giving
  bit-identical weights; ``replay(model)`` does the same from memory.

As a context manager the sequence is non-destructive, like :meth:`Edit.applied
<rome_lens.edits.Edit.applied>`: ``with EditSequence(...) as seq:`` reverts every edit still in
the sequence on exit, even after an exception. Save inside the block what you want to keep, or
use the sequence without ``with`` to keep the edits applied.

Example:
    >>> batches = [[EditRequest("{} lives in", "Alice Smith", "Paris")],
    ...            [EditRequest("{} works in", "Bob Jones", "London")]]
    >>> with EditSequence(model, method="ft-l", layer=1) as seq:
    ...     for batch in batches:
    ...         edit = seq.add(batch)
    ...     folder = seq.save(tmp / "facts")
    ...     print(seq)
    EditSequence(ft-l: 2 edits, 2 requests; 0 flagged)
    >>> rome_lens.applied_edits(model)                 # reverted on exit
    []
    >>> again = EditSequence.load(folder, model)      # the same weights, bit for bit
    >>> len(again), again.edits[1].parents == (again.edits[0].id,)
    (2, True)
    >>> again.health[1]
    EditHealth(#1 ...: update ... of ||W||, growth ..., entropy .../..., perplexity .../...)
    >>> removed = again.revert()
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

from tqdm.auto import tqdm

from rome_lens._typing import Model
from rome_lens.audit.health import EditHealth, HealthMonitor
from rome_lens.edits import Edit, applied_ids, load_edit
from rome_lens.errors import CorruptEditFileError, EditStateError, InvalidRequestError
from rome_lens.methods import compute_edit, get_method
from rome_lens.requests import EditRequest
from rome_lens.sequence.manifest import (
    MANIFEST_NAME,
    manifest_for,
    read_manifest,
    write_manifest,
)

logger = logging.getLogger(__name__)


def _monitor_from(monitor: bool | HealthMonitor | None) -> HealthMonitor | None:
    if isinstance(monitor, HealthMonitor):
        return monitor
    if monitor is True:
        return HealthMonitor()
    if monitor in (False, None):
        return None
    raise InvalidRequestError(f"monitor must be True, False or a HealthMonitor, got {monitor!r}")


class EditSequence:
    """A sequence of edits of one model, computed one batch at a time on the edited model.

    Args:
        model: the model to edit (edits already applied to it stay; they are not part of the
            sequence, and the first edit records them as parents).
        method: a registered editing method (:func:`rome_lens.available_methods`).
        monitor: ``True`` (default): check every edit with a default
            :class:`~rome_lens.audit.HealthMonitor`; ``False``: no checks; or a monitor of
            your own (thresholds, prompts).
        **options: the method's options, passed to every ``compute_edit`` call (ROME:
            ``layer``, ``hparams``, ``stats``, ...; FT-L: ``layer``, ``hparams``).

    Raises:
        InvalidRequestError: unknown method or a bad ``monitor``.
    """

    def __init__(
        self,
        model: Model,
        method: str = "rome",
        *,
        monitor: bool | HealthMonitor = True,
        **options: Any,
    ) -> None:
        get_method(method)  # an unknown method fails here, not at the first add
        self.model = model
        self.method = method
        self.options: MappingProxyType[str, Any] = MappingProxyType(dict(options))
        self.monitor = _monitor_from(monitor)
        self._edits: list[Edit] = []
        self._health: dict[str, EditHealth] = {}

    # ------------------------------------------------------------------ contents
    @property
    def edits(self) -> tuple[Edit, ...]:
        """The edits of the sequence, in application order."""
        return tuple(self._edits)

    @property
    def health(self) -> tuple[EditHealth, ...]:
        """The health records of the monitored edits, in application order."""
        return tuple(self._health[e.id] for e in self._edits if e.id in self._health)

    @property
    def flagged(self) -> list[EditHealth]:
        """Health records of the edits flagged as disabling."""
        return [record for record in self.health if record.flagged]

    @property
    def requests(self) -> list[EditRequest]:
        """Every request of the sequence, in order."""
        return [r for edit in self._edits for r in edit.requests]

    def __len__(self) -> int:
        return len(self._edits)

    def __iter__(self) -> Iterator[Edit]:
        return iter(self._edits)

    def __getitem__(self, index: int) -> Edit:
        return self._edits[index]

    def __repr__(self) -> str:
        n = len(self._edits)
        state = f"{len(self.flagged)} flagged" if self.monitor is not None else "not monitored"
        return (f"EditSequence({self.method}: {n} edit{'' if n == 1 else 's'}, "
                f"{len(self.requests)} requests; {state})")

    # ------------------------------------------------------------------ growing
    def add(self, requests: EditRequest | Sequence[EditRequest], **options: Any) -> Edit:
        """Compute the next edit on the edited model, apply it, check it and record it.

        Args:
            requests: one request or a batch (one edit realises the whole batch).
            **options: options for this call only, over the sequence's options.

        Returns:
            The applied edit.

        Raises:
            InvalidRequestError: bad requests or options (the model and sequence unchanged).
            EditStateError: an edit of the sequence was reverted outside the sequence.
        """
        self._check_applied()
        start = time.perf_counter()
        edit = compute_edit(self.model, requests, method=self.method, **{**self.options, **options})
        return self._push(edit, time.perf_counter() - start)

    def extend(
        self, batches: Iterable[EditRequest | Sequence[EditRequest]], progress: bool = False
    ) -> list[Edit]:
        """:meth:`add` each batch in turn (``progress``: a tqdm bar); returns the new edits.

        A failing batch raises; the batches before it stay in the sequence.
        """
        items = list(batches)
        return [self.add(batch) for batch in tqdm(items, desc="edit batches", unit="batch",
                                                  disable=not progress)]

    def push(self, edit: Edit) -> Edit:
        """Append an edit computed elsewhere (hand-built, loaded): apply, check, record it.

        Raises:
            EditStateError: the edit is already applied, or does not fit the model.
        """
        self._check_applied()
        return self._push(edit, 0.0)

    def _push(self, edit: Edit, seconds: float) -> Edit:
        edit.apply(self.model)
        try:
            record = self.monitor.check(self.model, edit) if self.monitor is not None else None
        except BaseException:
            if self.monitor is not None:
                self.monitor.forget(edit.id)
            edit.revert(self.model)
            raise
        self._edits.append(edit)
        if record is not None:
            self._health[edit.id] = record
        logger.info("sequence step %d: %s (%d requests, %.1f s)%s", len(self._edits), edit,
                    len(edit.requests), seconds, f"; {record!r}" if record is not None else "")
        return edit

    # ------------------------------------------------------------------ undoing
    def _check_applied(self) -> None:
        live = set(applied_ids(self.model))
        lost = [e.id for e in self._edits if e.id not in live]
        if lost:
            raise EditStateError(
                f"edit(s) {lost} of this sequence are no longer applied to the model (reverted "
                "outside the sequence); the sequence no longer describes the model"
            )

    def remove(self, edit: Edit | int) -> Edit:
        """Revert one edit of the sequence (by value or position); the others stay, exactly.

        Edits after it were computed with it applied; they are kept as they are.

        Returns:
            The removed edit.
        """
        self._check_applied()
        index = edit if isinstance(edit, int) else self._index(edit)
        target = self._edits[index]
        target.revert(self.model)
        del self._edits[index]
        self._health.pop(target.id, None)
        if self.monitor is not None:
            self.monitor.forget(target.id)
        logger.info("sequence: reverted %s (%d edits left)", target, len(self._edits))
        return target

    def _index(self, edit: Edit) -> int:
        ids = [e.id for e in self._edits]
        if edit.id not in ids:
            raise EditStateError(f"edit {edit.id} is not part of this sequence")
        return ids.index(edit.id)

    def pop(self) -> Edit:
        """Revert the last edit and drop it from the sequence; returns it."""
        if not self._edits:
            raise EditStateError("the sequence is empty")
        return self.remove(len(self._edits) - 1)

    revert_last = pop

    def revert(self) -> list[Edit]:
        """Revert every edit of the sequence, last first, and empty the sequence.

        The weights are again exactly those before the sequence (edits applied before it stay).

        Returns:
            The reverted edits, in application order (apply them again, or save them).
        """
        self._check_applied()
        removed = list(self._edits)
        while self._edits:
            self.pop()
        return removed

    def __enter__(self) -> EditSequence:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.revert()

    # ------------------------------------------------------------------ files
    def save(self, folder: str | os.PathLike[str], overwrite: bool = False) -> Path:
        """Write every edit (:meth:`Edit.save`) and ``sequence.json`` into ``folder``.

        Args:
            folder: the folder (created if missing).
            overwrite: replace a sequence saved there before (its edit files are removed).

        Returns:
            The folder.

        Raises:
            FileExistsError: ``folder`` holds a saved sequence and ``overwrite`` is false.
        """
        folder = Path(folder)
        manifest = folder / MANIFEST_NAME
        if manifest.exists():
            if not overwrite:
                raise FileExistsError(f"{folder} already holds a saved sequence "
                                      "(pass overwrite=True to replace it)")
            _remove_saved(folder)
        folder.mkdir(parents=True, exist_ok=True)
        monitor = self.monitor.settings() if self.monitor is not None else None
        contents = manifest_for(self._edits, self.method, self.health, monitor)
        for edit, entry in zip(self._edits, contents.entries, strict=True):
            edit.save(folder / entry.file)
        write_manifest(folder, contents)
        logger.info("saved %d edits to %s", len(self._edits), folder)
        return folder

    @classmethod
    def load(
        cls,
        folder: str | os.PathLike[str],
        model: Model,
        *,
        monitor: bool | HealthMonitor = False,
        **options: Any,
    ) -> EditSequence:
        """Re-apply a saved sequence to ``model`` (a fresh copy of the model it was computed on).

        Every file is read and checked before any weight is touched; the weights afterwards are
        bit-identical to those of the saved sequence.

        Args:
            folder: a folder written by :meth:`save`.
            model: the model (its unedited weights must be the sequence's base model).
            monitor: monitor the edits added after loading (``True``: with the saved settings);
                the saved health records are kept either way.
            **options: method options for later :meth:`add` calls.

        Raises:
            CorruptEditFileError: a corrupt manifest or edit file, or an edit file that does not
                hold the edit the manifest names.
            FingerprintMismatchError: the sequence was computed on another model.
        """
        saved = read_manifest(folder)
        edits = []
        for i, entry in enumerate(saved.entries):
            edit = load_edit(Path(folder) / entry.file, model=model)
            if edit.id != entry.id:
                raise CorruptEditFileError(
                    f"{folder}: manifest entry {i} names edit {entry.id}, but {entry.file} holds "
                    f"edit {edit.id}"
                )
            edits.append(edit)
        if monitor is True and saved.monitor is not None:
            monitor = HealthMonitor(**_settings(saved.monitor))
        sequence = cls(model, saved.method, monitor=monitor, **options)
        sequence._apply_saved(edits, saved.health)
        return sequence

    def replay(self, model: Model, *, monitor: bool | HealthMonitor = False) -> EditSequence:
        """Apply this sequence's edits, in order, to another copy of its model.

        Returns:
            A new sequence on ``model`` with the same edits, options and health records.
        """
        sequence = EditSequence(model, self.method, monitor=monitor, **self.options)
        sequence._apply_saved(self._edits, self.health)
        return sequence

    def _apply_saved(self, edits: Sequence[Edit], health: Sequence[EditHealth]) -> None:
        """Apply ``edits`` in order without checks; undo them all if one fails."""
        applied: list[Edit] = []
        try:
            for edit in edits:
                edit.apply(self.model)
                applied.append(edit)
        except BaseException:
            for edit in reversed(applied):
                edit.revert(self.model)
            raise
        self._edits.extend(edits)
        self._health.update({record.edit_id: record for record in health})
        if self.monitor is not None:
            self.monitor.history.extend(health)
        logger.info("applied %d saved edits of a %s sequence", len(edits), self.method)


def _settings(saved: dict[str, Any]) -> dict[str, Any]:
    """Saved monitor settings as ``HealthMonitor`` arguments (JSON turned tuples into lists)."""
    settings = dict(saved)
    if "prompts" in settings:
        settings["prompts"] = tuple(settings["prompts"])
    return settings


def _remove_saved(folder: Path) -> None:
    """Remove a saved sequence's manifest and the edit files it lists."""
    manifest = folder / MANIFEST_NAME
    try:
        listed = [str(e["file"]) for e in json.loads(manifest.read_text())["edits"]]
    except (OSError, ValueError, KeyError, TypeError):
        listed = []
    for name in listed:
        if Path(name).name == name:
            (folder / name).unlink(missing_ok=True)
    manifest.unlink()
