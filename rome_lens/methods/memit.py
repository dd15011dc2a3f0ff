"""MEMIT: mass-editing memory (Meng et al. 2023; REFERENCE.md §6), for one or thousands of facts.

1. Each request gets a target hidden state z at the last layer of a range of MLP layers
   (:mod:`rome_lens.methods.targets`: ROME's value optimisation, batched over requests).
2. The residual ``z - h`` is spread over the range, lowest layer first, one least-squares solve
   per layer (:mod:`rome_lens.methods.spread`):
   ``Delta_l = (lambda C_l + K^T K)^-1 K^T R_l`` with ``C_l`` the base model's key second moment
   (:func:`rome_lens.statistics.second_moment`) and ``lambda = mom2_update_weight``.

The result is one :class:`~rome_lens.edits.Edit` with one site per layer (rank <= number of
requests), exact to apply and revert like every edit. It records the keys it wrote at each
layer (``edit.keys_at(l)``), the targets ``z`` and the optimised deltas.

Requests that share a subject are refused: they share one key, so one least-squares solve
cannot give them different values (edit them in separate batches, one after the other).

Example:
    >>> from rome_lens import compute_edit
    >>> reqs = [EditRequest("{} lives in", "Alice Smith", "Paris"),
    ...         EditRequest("{} works in", "Bob Jones", "Rome")]
    >>> edit = compute_edit(model, reqs, method="memit", layers=[1, 2])
    >>> edit
    Edit(memit: 2 requests; blocks.1.mlp.W_out rank 2, blocks.2.mlp.W_out rank 2; id ...)
    >>> with edit.applied(model):
    ...     text = model.generate("Alice Smith lives in", max_new_tokens=2, verbose=False)
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from jaxtyping import Float

from rome_lens._typing import Model
from rome_lens.edits import Edit, applied_ids, base_fingerprint
from rome_lens.errors import InvalidRequestError, NonFiniteError
from rome_lens.methods.spread import Solver, Spread, SpreadOptions, spread
from rome_lens.methods.targets import RequestChunk, Targets, optimise_targets, request_chunks
from rome_lens.models import access
from rome_lens.requests import EditRequest, check_requests
from rome_lens.rome import RomeHyperParams, default_hparams, default_precision
from rome_lens.rome.forwards import LOOPS, ValueLoop
from rome_lens.statistics import Corpus, second_moment

logger = logging.getLogger(__name__)


# The MEMIT paper's layer ranges and lambdas (REFERENCE.md §6), by exact model name.
PAPER_LAYERS: dict[str, dict[str, Any]] = {
    "gpt2-xl": {"layers": (13, 14, 15, 16, 17), "mom2_update_weight": 20000.0},
    "gpt-j-6B": {"layers": (3, 4, 5, 6, 7, 8), "mom2_update_weight": 15000.0},
}


@dataclass(frozen=True)
class MemitHyperParams(RomeHyperParams):
    """MEMIT's hyperparameters: ROME's value optimisation plus the layer range and the solve.

    Attributes:
        layers: the edited blocks, ascending (``None``: the model's default range); the targets
            z are set at the last one. ``layer`` (inherited) is ignored.
        mom2_update_weight: lambda, the weight of the preserved keys' second moment (in units of
            one edited key: C is a mean, ``K^T K`` a sum).
        z_batch: requests optimised together in one batch of prompts. The target step's
            autograd activations grow with it and set the peak memory of a many-fact edit:
            8 (default) vs 16 on gemma-3-270m, 32 facts, float32 targets: peak 4.70 vs
            7.34 GiB, 10.4 vs 10.9 s per fact, the same deltas (README, "Batch editing").
        z_precision: as ROME's, but ``"bfloat16"`` by default (1.7x faster on a CPU with
            AVX-512 BF16, same losses to ~1%; measured in README); :func:`default_memit_hparams`
            picks ``"float32"`` where the device has no fast bfloat16.
        fit_rows: every prompt's key is a constraint of the solve (default: each request's
            mean key, as MEMIT).
        bare_row_weight: with ``fit_rows``, how many times each request's bare edit prompt
            counts in the solve and in the fit of its change (1: as every context row;
            ignored without ``fit_rows``).
        other_positions_weight: every key at a position AFTER the last subject token of the
            requests' prompts (the relation tokens, the last prompt token, the target tokens)
            is a "no change" constraint of each layer's solve with this weight (one edited key
            counts 1; 0: off, as MEMIT). The update otherwise also writes at these positions:
            at 1,000 facts on gemma-3-270m that costs ~14 ES points (README, "Batch editing").
        overshoot: the spread aims at ``h + overshoot (z - h)`` instead of ``z`` (``h``: the
            residual leaving the last layer before the edit). A batch's updates interfere (each
            fact's keys also read the others' updates, and the ridge ``lambda C`` shrinks every
            solve), so the batch reaches only part of the way; > 1 asks for more to make up
            for it. 1,000 facts in one batch on gemma-3-270m (README, "Batch editing"): 1.1
            lifts ES / PS 88.6 / 69.3 -> 91.2 / 74.7, but NS falls 79.8 -> 77.4 and generation
            entropy 8.5% below the unedited model's. Default 1 (as MEMIT).
        base_value_scale: scale each target's clamp and weight decay by the BASE model's MLP
            output at the subject (default: the model's as it is, edits applied). Earlier
            edits of a sequence inflate that output at subjects they were not written for
            (gemma-3-270m, layer 4: 2.6 -> 66 over 9 AlphaEdit batches), and a clamp scaled
            by it lets each batch write a larger update than the last: a feedback loop. Same
            targets as the default on a model without edits.

    The defaults differ from ROME's in two places, both for speed at thousands of facts:
    5 + 5 context prefixes instead of 10 + 10, and bfloat16 targets.
    """

    layers: tuple[int, ...] | None = None
    mom2_update_weight: float = 15000.0
    z_batch: int = 8
    z_precision: str = "bfloat16"
    fit_rows: bool = False
    bare_row_weight: float = 1.0
    other_positions_weight: float = 0.0
    base_value_scale: bool = False
    overshoot: float = 1.0
    n_contexts_short: int = 5
    n_contexts_long: int = 5

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(int(x) for x in self.layers))
            if not self.layers or list(self.layers) != sorted(set(self.layers)):
                raise InvalidRequestError(f"layers must be ascending and distinct: {self.layers}")
        if self.mom2_update_weight < 0 or self.z_batch < 1:
            raise InvalidRequestError("mom2_update_weight must be >= 0 and z_batch >= 1")
        if not (math.isfinite(self.bare_row_weight) and self.bare_row_weight > 0):
            raise InvalidRequestError(
                f"bare_row_weight must be > 0, got {self.bare_row_weight}")
        if not (math.isfinite(self.overshoot) and self.overshoot > 0):
            raise InvalidRequestError(f"overshoot must be > 0, got {self.overshoot}")
        if not (math.isfinite(self.other_positions_weight) and self.other_positions_weight >= 0):
            raise InvalidRequestError(
                f"other_positions_weight must be >= 0, got {self.other_positions_weight}")

    @staticmethod
    def model_defaults() -> dict[str, dict[str, Any]]:
        """Exact TransformerLens model names -> overrides of the defaults.

        GPT-2 XL's and GPT-J's are the MEMIT paper's; gemma-3-270m's were measured at 1,000
        facts (README, "Default layers and lambda for gemma-3-270m").
        """
        return PAPER_LAYERS | {
            "gemma-3-270m": {"layers": (3, 4), "mom2_update_weight": 300.0, "fit_rows": True,
                             "other_positions_weight": 0.03},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MemitHyperParams:
        """Inverse of :meth:`to_dict` (unknown keys are ignored)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def default_memit_hparams(model: Model, cls: type[MemitHyperParams] = MemitHyperParams) -> Any:
    """A MEMIT-style method's hyperparameters for ``model``.

    Overrides come from ``cls.model_defaults()`` (exact model names); a model without an entry
    gets four layers from ROME's default layer. ``z_precision`` falls back to ``"float32"``
    where the model's device has no fast bfloat16 (a CPU without AVX-512 BF16 or AMX: there
    bfloat16 matmuls are emulated, measured 170x slower than float32 on an AVX2 EPYC).

    Example:
        >>> default_memit_hparams(model).layers      # gemma-3-270m  # doctest: +SKIP
        (3, 4)
        >>> type(default_memit_hparams(model, rome_lens.AlphaEditHyperParams)).__name__
        'AlphaEditHyperParams'
    """
    name = str(model.cfg.model_name).rsplit("/", 1)[-1]
    overrides = dict(cls.model_defaults().get(name, {}))
    overrides.setdefault("z_precision", default_precision(model.cfg.device))
    if "layers" not in overrides:
        first, last = default_hparams(model).layer or 0, access.n_layers(model) - 1
        overrides["layers"] = tuple(range(min(first, last), min(first + 4, last + 1)))
    return cls(**overrides)


def resolve_hparams(
    model: Model, layers: Sequence[int] | None, hparams: Any, cls: type[MemitHyperParams]
) -> Any:
    """Hyperparameters with validated ``layers`` (argument > hparams > model default)."""
    hp = hparams if hparams is not None else default_memit_hparams(model, cls)
    if not isinstance(hp, cls):
        raise InvalidRequestError(f"hparams must be {cls.__name__}, got {type(hp).__name__}")
    chosen = layers if layers is not None else hp.layers
    if chosen is None:
        chosen = default_memit_hparams(model, cls).layers
    checked = tuple(sorted({access.check_layer(model, int(x)) for x in chosen}))
    if not checked:
        raise InvalidRequestError("layers must name at least one block")
    return replace(hp, layers=checked, layer=checked[-1])


def check_subjects(requests: Sequence[EditRequest]) -> None:
    """Refuse a batch in which two requests share a subject (they would share one key)."""
    seen: dict[str, int] = {}
    for i, request in enumerate(requests):
        if request.subject in seen:
            raise InvalidRequestError(
                f"requests {seen[request.subject]} and {i} share the subject "
                f"{request.subject!r}: a batch writes one value per subject key; edit them in "
                "separate batches, one after the other"
            )
        seen[request.subject] = i


def memit_solver(
    mom2: dict[int, Float[torch.Tensor, "d_mlp d_mlp"]], weight: float, ridge: float = 0.0
) -> Solver:
    """MEMIT's per-layer solve: ``left = (weight C' + K^T K + P)^-1 K^T``, ``right = R`` (float64).

    ``P``: the solver's optional ``preserve`` Gram matrix of keys whose output must not change
    (``other_positions_weight``).

    ``C' = C + ridge * mean(diag C) I``: as for ROME, a finite statistics corpus leaves C's
    small eigenvalues noisy, and the ridge keeps the solve from amplifying them.
    """

    def solve(layer: int, keys: torch.Tensor, residuals: torch.Tensor,
              preserve: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        c = mom2[layer].to("cpu", torch.float64)
        if ridge > 0:
            c = c + ridge * c.diagonal().mean() * torch.eye(c.shape[0], dtype=c.dtype)
        k = keys.to("cpu", torch.float64)
        a = weight * c + k.T @ k
        if preserve is not None:
            a = a + preserve.to("cpu", torch.float64)
        left = torch.linalg.solve(a, k.T)
        if not torch.isfinite(left).all():
            raise NonFiniteError(f"the MEMIT solve at layer {layer} is not finite")
        return left.float(), residuals.detach().to("cpu", torch.float32)

    return solve


def check_loop(loop: str) -> None:
    """Refuse an unknown value-loop name."""
    if loop not in LOOPS:
        raise InvalidRequestError(f"loop must be prefix_cache, residual or naive, got {loop!r}")


def run_many(
    model: Model, chunks: list[RequestChunk], hp: Any, method: str, solver: Solver, *,
    loop: ValueLoop, cache_targets: bool, progress: bool, info: dict[str, Any],
) -> Edit:
    """The shared pipeline of MEMIT-style methods: targets, then the spread with ``solver``."""
    t0 = time.perf_counter()
    requests = [r for chunk in chunks for r in chunk.requests]
    targets = optimise_targets(model, chunks, hp, hp.layers[-1], loop, cache_targets, progress)
    t1 = time.perf_counter()
    assert targets.z_rows is not None
    result = spread(model, chunks, hp.layers, targets.z_rows, solver,
                    SpreadOptions.from_hparams(hp), progress)
    t2 = time.perf_counter()
    info |= {"timings": {"targets_s": t1 - t0, "spread_s": t2 - t1},
             "final_losses": targets.final_losses, "cached_targets": targets.cached,
             "target_seconds": targets.seconds,
             "residual_norms": result.residual_norms, "fit_errors": result.fit_errors,
             "loop": loop, "api": access.api_name(model),
             "weight_space": access.weight_space(model)}
    logger.info("%s: %d requests, %d layers in %.1f s", method, len(requests), len(hp.layers),
                t2 - t0)
    return _edit(model, requests, hp, method, result, targets, info)


def _edit(
    model: Model, requests: list[EditRequest], hp: Any, method: str, result: Spread,
    targets: Targets, info: dict[str, Any],
) -> Edit:
    tensors = {f"keys.L{layer}": k.float().contiguous() for layer, k in result.keys.items()}
    tensors |= {"z": targets.z.detach().cpu().float(), "delta": targets.delta.float()}
    return Edit(
        sites=tuple(result.sites), requests=tuple(requests), method=method,
        hparams=hp.to_dict(), base_fingerprint=base_fingerprint(model),
        parents=applied_ids(model), model_name=access.model_label(model), info=info,
        tensors=tensors,
    )


def compute_memit(
    model: Model,
    requests: EditRequest | Sequence[EditRequest],
    layers: Sequence[int] | None = None,
    hparams: MemitHyperParams | None = None,
    *,
    stats: dict[int, torch.Tensor] | None = None,
    corpus: Corpus = None,
    loop: ValueLoop = "prefix_cache",
    cache_targets: bool = False,
    progress: bool = True,
) -> Edit:
    """MEMIT for a batch of requests (the ``"memit"`` method of :func:`rome_lens.compute_edit`).

    The model is not modified. Edits already applied to it are the earlier part of a sequence:
    the new edit is computed on the edited model (``edit.parents``).

    Args:
        model: a TransformerLens model (either API).
        requests: one request or many (no two with the same subject).
        layers: the edited blocks (default: ``hparams.layers`` or the model's default range).
        hparams: :class:`MemitHyperParams` (default :func:`default_memit_hparams`).
        stats: precomputed key second moments ``{layer: C}`` (default: the base model's).
        corpus: statistics corpus when ``stats`` lacks a layer (``None``: model samples).
        loop: forward strategy of the target optimisation (see :func:`rome_lens.compute_rome`).
        cache_targets: reuse and store each request's optimised delta on disk (per base model,
            applied edits, request, hyperparameters and layer).
        progress: show progress bars.

    Returns:
        An :class:`~rome_lens.edits.Edit` with one site per layer.

    Raises:
        InvalidRequestError: no requests, conflicting requests, a shared subject, bad layers.
        SubjectNotFoundError: a subject missing from its prompt.
        NonFiniteError: NaN/inf in statistics, keys, targets or a solve.
    """
    requests = check_requests(requests)
    check_subjects(requests)
    check_loop(loop)
    hp = resolve_hparams(model, layers, hparams, MemitHyperParams)
    chunks = request_chunks(model, requests, hp)  # checks every request before any work
    given = stats or {}
    mom2 = {layer: given[layer] if layer in given else second_moment(model, layer, corpus, hp)
            for layer in hp.layers}
    solver = memit_solver(mom2, hp.mom2_update_weight, hp.mom2_ridge)
    return run_many(model, chunks, hp, "memit", solver, loop=loop,
                    cache_targets=cache_targets, progress=progress, info={})
