"""Exceptions raised by rome_lens.

Every error that comes from bad input derives from :class:`RomeLensError` (itself a
``ValueError``), so a notebook can catch them all at once, and every one is raised *before* a
model's weights are touched.
"""

from __future__ import annotations


class RomeLensError(ValueError):
    """Base class of every input error raised by rome_lens."""


class SubjectNotFoundError(RomeLensError):
    """The subject does not occur in the prompt."""


class InvalidRequestError(RomeLensError):
    """An edit request is malformed (empty target, new target equal to the true one, ...)."""


class LayerOutOfRangeError(RomeLensError):
    """A layer index is outside ``[0, n_layers)``."""


class NonFiniteError(RomeLensError):
    """A statistic, key, value or loss contains NaN or infinity."""


class PromptTooLongError(RomeLensError):
    """A prompt does not fit in the model's context window."""


class EditStateError(RomeLensError):
    """An edit cannot be applied or reverted in the model's current state."""


class FingerprintMismatchError(EditStateError):
    """An edit was computed on different weights than the model it is applied to."""


class CorruptEditFileError(RomeLensError):
    """A saved edit file fails its checksum or cannot be parsed."""


class UnsupportedModelError(RomeLensError):
    """A local checkpoint is of an architecture rome_lens cannot load (or lacks a tokenizer).

    Raised after reading only the checkpoint's metadata, before any weight is read.
    """
