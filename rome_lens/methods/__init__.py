"""One editor interface: :func:`compute_edit` dispatches to a registry of editing methods.

Every method is a function ``fn(model, requests, **options) -> Edit`` that never modifies the
model. Built in: ``"rome"`` (:func:`rome_lens.rome.compute_rome_edit`), ``"ft-l"``
(:func:`rome_lens.methods.ft_l.compute_ft_l`), ``"memit"`` (:func:`compute_memit`) and
``"alphaedit"`` (:func:`compute_alphaedit`). A new method is one module with such a function
and one :func:`register_method` call (or one line in ``_BUILTIN``).

Example:
    >>> edit = compute_edit(model, EditRequest("{} plays", "LeBron James", "soccer"))
    >>> req1 = EditRequest("{} lives in", "Alice Smith", "Paris")
    >>> req2 = EditRequest("{} works in", "Bob Jones", "Rome")
    >>> edit = compute_edit(model, [req1, req2], method="ft-l", layer=2)
    >>> edit
    Edit(ft-l: 2 requests; blocks.2.mlp.W_out dense...)
    >>> available_methods()
    ['alphaedit', 'ft-l', 'memit', 'rome']
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from rome_lens._typing import Model
from rome_lens.edits import Edit
from rome_lens.errors import InvalidRequestError
from rome_lens.methods.alphaedit import AlphaEditHyperParams, compute_alphaedit
from rome_lens.methods.ft_l import FTLHyperParams, compute_ft_l
from rome_lens.methods.memit import MemitHyperParams, compute_memit, default_memit_hparams
from rome_lens.requests import EditRequest, check_requests
from rome_lens.rome import compute_rome_edit
from rome_lens.threads import fit_threads

logger = logging.getLogger(__name__)

EditFunction = Callable[..., Edit]


@dataclass(frozen=True)
class EditMethod:
    """A registered editing method.

    Attributes:
        name: the ``method=`` name.
        compute: ``fn(model, requests: list[EditRequest], **options) -> Edit``.
        description: one line for listings.
    """

    name: str
    compute: EditFunction
    description: str = ""


_METHODS: dict[str, EditMethod] = {}


def register_method(
    name: str, compute: EditFunction, description: str = "", *, replace: bool = False
) -> EditMethod:
    """Register an editing method under ``name`` (``replace=True`` to override one).

    Raises:
        InvalidRequestError: the name is taken and ``replace`` is false.
    """
    if name in _METHODS and not replace:
        raise InvalidRequestError(f"an editing method named {name!r} is already registered")
    method = EditMethod(name, compute, description)
    _METHODS[name] = method
    return method


def available_methods() -> list[str]:
    """Names of the registered methods, sorted."""
    return sorted(_METHODS)


def get_method(name: str) -> EditMethod:
    """The registered method ``name``.

    Raises:
        InvalidRequestError: no such method (the message lists the registered ones).
    """
    if name not in _METHODS:
        raise InvalidRequestError(
            f"unknown editing method {name!r}; registered: {', '.join(available_methods())}"
        )
    return _METHODS[name]


def compute_edit(
    model: Model,
    requests: EditRequest | Sequence[EditRequest],
    method: str = "rome",
    **options: Any,
) -> Edit:
    """Compute an edit of ``requests`` with ``method``; the model is not modified.

    Args:
        model: the model. Edits already applied to it are the earlier part of a sequence: the
            new edit is computed on the edited model and records them as ``parents``.
        requests: one :class:`~rome_lens.requests.EditRequest` or a list.
        method: a registered method name (:func:`available_methods`).
        **options: the method's options (ROME: ``layer``, ``hparams``, ``stats``, ``corpus``,
            ``loop``, ``objective``, ``entropy_layers``; FT-L: ``layer``, ``hparams``; MEMIT and
            AlphaEdit: ``layers``, ``hparams``, ``corpus``, ``loop``, ``cache_targets``,
            ``progress``, and MEMIT's ``stats``).

    Returns:
        An :class:`~rome_lens.edits.Edit`.

    Raises:
        InvalidRequestError: unknown method, no requests, conflicting requests, or an option
            the method does not take.
    """
    spec = get_method(method)
    batch = check_requests(requests)
    _check_options(spec, options)
    fit_threads()
    return spec.compute(model, batch, **options)


def _check_options(spec: EditMethod, options: dict[str, Any]) -> None:
    """Refuse options the method's function does not take (before anything is computed)."""
    params = inspect.signature(spec.compute).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return
    accepted = [p.name for p in params if p.kind is not inspect.Parameter.VAR_POSITIONAL]
    accepted = accepted[2:]  # after (model, requests)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise InvalidRequestError(
            f"method {spec.name!r} does not take option(s) {', '.join(unknown)}; "
            f"it takes: {', '.join(accepted) or 'none'}"
        )


_BUILTIN: tuple[tuple[str, EditFunction, str], ...] = (
    ("rome", compute_rome_edit, "ROME: one rank-one update per request (Meng et al. 2022)"),
    ("ft-l", compute_ft_l, "FT-L: L-infinity-bounded fine-tuning of one MLP output weight"),
    ("memit", compute_memit, "MEMIT: many facts at once, spread over a range of layers"),
    ("alphaedit", compute_alphaedit, "AlphaEdit: MEMIT projected onto the keys' null space"),
)
for _name, _fn, _description in _BUILTIN:
    register_method(_name, _fn, _description)

__all__ = [
    "AlphaEditHyperParams",
    "EditMethod",
    "FTLHyperParams",
    "MemitHyperParams",
    "available_methods",
    "compute_alphaedit",
    "compute_edit",
    "compute_ft_l",
    "compute_memit",
    "default_memit_hparams",
    "get_method",
    "register_method",
]
