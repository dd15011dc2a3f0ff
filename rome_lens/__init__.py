"""rome_lens: locate, edit and audit factual knowledge in TransformerLens models.

Example (``load_model()`` is skipped in the doctests, which run on a tiny random model):
    >>> import rome_lens
    >>> model = rome_lens.load_model()  # doctest: +SKIP
    >>> req = rome_lens.EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome")
    >>> edit = rome_lens.compute_edit(model, req)             # ROME; model unchanged
    >>> with edit.applied(model):                             # reverted on exit
    ...     top = rome_lens.top_tokens(model, req.text, k=3)  # [(token, probability), ...]
    >>> len(top)
    3
"""

from rome_lens._cache import cache_dir
from rome_lens.audit import (
    EditHealth,
    HealthMonitor,
    ProbeReport,
    TunedLens,
    VerdictRule,
    probe_edit,
    tuned_lens,
)
from rome_lens.edits import (
    DenseSite,
    Edit,
    LowRankSite,
    applied_edits,
    base_fingerprint,
    base_weights,
    load_edit,
    revert_all,
)
from rome_lens.errors import (
    CorruptEditFileError,
    EditStateError,
    FingerprintMismatchError,
    InvalidRequestError,
    LayerOutOfRangeError,
    NonFiniteError,
    PromptTooLongError,
    RomeLensError,
    SubjectNotFoundError,
    UnsupportedModelError,
)
from rome_lens.methods import (
    AlphaEditHyperParams,
    MemitHyperParams,
    available_methods,
    compute_edit,
    register_method,
)
from rome_lens.models import DEFAULT_MODEL, load_model
from rome_lens.predict import top_tokens
from rome_lens.requests import EditRequest, subject_token_span
from rome_lens.rome import RomeHyperParams, compute_rome, default_hparams
from rome_lens.sequence import EditSequence
from rome_lens.statistics import second_moment
from rome_lens.tracing import activation_patch, causal_trace, trace_dataset

#: The first release's name of the edit value; every method now returns :class:`Edit`.
RomeEdit = Edit

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MODEL",
    "AlphaEditHyperParams",
    "MemitHyperParams",
    "CorruptEditFileError",
    "DenseSite",
    "Edit",
    "EditHealth",
    "EditRequest",
    "EditSequence",
    "EditStateError",
    "ProbeReport",
    "TunedLens",
    "VerdictRule",
    "FingerprintMismatchError",
    "HealthMonitor",
    "InvalidRequestError",
    "LowRankSite",
    "LayerOutOfRangeError",
    "NonFiniteError",
    "PromptTooLongError",
    "RomeEdit",
    "RomeHyperParams",
    "RomeLensError",
    "SubjectNotFoundError",
    "UnsupportedModelError",
    "activation_patch",
    "applied_edits",
    "available_methods",
    "base_fingerprint",
    "base_weights",
    "cache_dir",
    "causal_trace",
    "compute_edit",
    "compute_rome",
    "default_hparams",
    "load_edit",
    "load_model",
    "probe_edit",
    "register_method",
    "revert_all",
    "second_moment",
    "subject_token_span",
    "trace_dataset",
    "tuned_lens",
    "top_tokens",
]
