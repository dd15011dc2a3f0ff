"""Edit requests and the one place that finds a subject's tokens in a prompt.

A request names a fact by a prompt that contains its subject, e.g.
``EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome")``. The prompt is
either a template with ``{}`` where the subject goes, or a full prompt that contains the subject
verbatim. Targets are continuations: a leading space is added when they are tokenised (the
convention of CounterFact and the ROME paper), unless they already start with whitespace.

:func:`subject_token_span` is the only function that maps a subject to token positions; ROME,
tracing and probes all call it, so BOS tokens, leading spaces and multi-token subjects are handled
once.

Example:
    >>> req = EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome", "Paris")
    >>> req.text
    'The Eiffel Tower is located in the city of'
    >>> tokens, (start, end) = subject_token_span(model, req.text, req.subject)
    >>> "".join(model.to_str_tokens(tokens[start:end]))  # gemma: 'The', ' Eiffel', ' Tower'
    'The Eiffel Tower'
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from jaxtyping import Int

from rome_lens._typing import Model
from rome_lens.errors import InvalidRequestError, SubjectNotFoundError
from rome_lens.models import access


@dataclass(frozen=True)
class EditRequest:
    """One factual rewrite: make ``prompt`` about ``subject`` continue with ``target_new``.

    Args:
        prompt: template with ``{}`` for the subject, or a full prompt containing the subject.
        subject: the subject string (e.g. ``"The Eiffel Tower"``).
        target_new: the new object (e.g. ``"Rome"``).
        target_true: the current object, optional (e.g. ``"Paris"``); used by checks and
            evaluation.

    Raises:
        InvalidRequestError: empty subject or target, or ``target_new == target_true``.
        SubjectNotFoundError: a full prompt that does not contain the subject.
    """

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None

    def __post_init__(self) -> None:
        for field in ("prompt", "subject", "target_new"):
            value = getattr(self, field)
            if not isinstance(value, str):
                raise InvalidRequestError(f"{field} must be a string, got {type(value).__name__}")
            if not value.strip():
                raise InvalidRequestError(f"{field} is empty or whitespace: {value!r}")
        if self.target_true is not None:
            if not isinstance(self.target_true, str) or not self.target_true.strip():
                raise InvalidRequestError(f"target_true is empty: {self.target_true!r}")
            if self.target_true.strip() == self.target_new.strip():
                raise InvalidRequestError(
                    f"target_new equals target_true ({self.target_new!r}): nothing to edit"
                )
        if self.prompt.count("{}") > 1:
            raise InvalidRequestError(f"prompt has more than one '{{}}' slot: {self.prompt!r}")
        if "{}" not in self.prompt and self.subject not in self.prompt:
            raise SubjectNotFoundError(
                f"subject {self.subject!r} does not occur in prompt {self.prompt!r} "
                "(use '{}' in the prompt to mark where the subject goes)"
            )

    @property
    def template(self) -> str:
        """The prompt as a template with ``{}`` for the subject."""
        if "{}" in self.prompt:
            return self.prompt
        return self.prompt.replace(self.subject, "{}", 1)

    @property
    def text(self) -> str:
        """The prompt with the subject filled in."""
        return self.template.replace("{}", self.subject)

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (for JSON)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EditRequest:
        """Inverse of :meth:`to_dict`."""
        return cls(
            prompt=data["prompt"],
            subject=data["subject"],
            target_new=data["target_new"],
            target_true=data.get("target_true"),
        )


def check_requests(requests: EditRequest | Sequence[EditRequest]) -> list[EditRequest]:
    """One request or a list of them, validated as a batch.

    Returns:
        The requests as a list.

    Raises:
        InvalidRequestError: an empty batch, an item that is not an :class:`EditRequest`, the
            same request twice, or two requests that ask the same prompt and subject for
            different new objects (a conflict no edit can satisfy).
    """
    items = [requests] if isinstance(requests, EditRequest) else list(requests)
    if not items:
        raise InvalidRequestError("no requests given")
    seen: dict[tuple[str, str], EditRequest] = {}
    for i, request in enumerate(items):
        if not isinstance(request, EditRequest):
            raise InvalidRequestError(
                f"request {i} must be an EditRequest, got {type(request).__name__}"
            )
        key = (request.template, request.subject)
        if key in seen:
            other = seen[key]
            what = "is given twice" if other == request else (
                f"asks for both {other.target_new!r} and {request.target_new!r}")
            raise InvalidRequestError(
                f"conflicting requests: {request.text!r} (subject {request.subject!r}) {what}"
            )
        seen[key] = request
    return items


def target_text(target: str) -> str:
    """A target as the continuation that is tokenised: with one leading space."""
    return target if target[:1].isspace() else " " + target


def target_tokens(model: Model, target: str) -> Int[torch.Tensor, " n"]:
    """Token ids of a target continuation (no BOS).

    Raises:
        InvalidRequestError: if the target tokenises to nothing.
    """
    if not target.strip():
        raise InvalidRequestError(f"target is empty or whitespace: {target!r}")
    ids = model.to_tokens(target_text(target), prepend_bos=False, truncate=False)[0]
    if ids.numel() == 0:
        raise InvalidRequestError(f"target {target!r} tokenises to no tokens")
    return ids


def subject_token_span(
    model: Model,
    text: str,
    subject: str,
    occurrence: int = -1,
    char_start: int | None = None,
) -> tuple[Int[torch.Tensor, " pos"], tuple[int, int]]:
    """Tokenise ``text`` and find the token positions covering ``subject``.

    Character offsets from the tokenizer decide which tokens overlap the subject, so a
    leading-space token (``" Eiffel"``) or a token that merges the subject's last characters
    with what follows still counts. Without offsets (slow tokenizers) the span is found by
    tokenising prefixes.

    Args:
        model: the model whose tokenizer is used (BOS prepended as the model expects).
        text: the full prompt.
        subject: the subject string, which must occur in ``text``.
        occurrence: which occurrence to use when the subject appears several times
            (default: the last, which is where a context-prefixed prompt puts it).
        char_start: character offset of the subject in ``text``, when the caller knows it
            (overrides ``occurrence``).

    Returns:
        ``(tokens, (start, end))``: the 1-D token ids and the half-open span of the subject.

    Raises:
        SubjectNotFoundError: if the subject is not in the text.
    """
    if char_start is None:
        starts = [i for i in range(len(text)) if text.startswith(subject, i)]
        if not subject or not starts:
            raise SubjectNotFoundError(f"subject {subject!r} does not occur in prompt {text!r}")
        char_start = starts[occurrence]
    elif not subject or not text.startswith(subject, char_start):
        raise SubjectNotFoundError(
            f"subject {subject!r} does not occur at character {char_start} of {text!r}"
        )
    char_end = char_start + len(subject)
    tokens = access.to_tokens(model, text)
    tokenizer = model.tokenizer
    assert tokenizer is not None, "the model has no tokenizer"
    span: tuple[int, int] | None = None
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
        offsets = enc["offset_mapping"]
        shift = int(tokens.shape[0]) - len(offsets)  # BOS added by TransformerLens
        if shift >= 0 and enc["input_ids"] == tokens[shift:].tolist():
            hits = [
                i + shift
                for i, (a, b) in enumerate(offsets)
                if b > a and a < char_end and b > char_start
            ]
            if hits:
                span = (hits[0], hits[-1] + 1)
    if span is None:
        span = _span_by_prefixes(model, text, char_start, char_end, int(tokens.shape[0]))
    return tokens, span


def _span_by_prefixes(
    model: Model, text: str, char_start: int, char_end: int, total: int
) -> tuple[int, int]:
    """Fallback: count the tokens of the text before and through the subject."""

    def n_tokens(prefix: str) -> int:
        return int(model.to_tokens(prefix, truncate=False).shape[1]) if prefix else (
            int(model.to_tokens("x", truncate=False).shape[1]) - 1
        )

    start = n_tokens(text[:char_start])
    end = min(max(n_tokens(text[:char_end]), start + 1), total)
    return start, end
