"""Edit sites: WHERE an edit changes a model and by HOW MUCH, one weight at a time.

A site names one weight of one block (``blocks.L.mlp.W_out``) and holds its change in one of two
forms:

* :class:`LowRankSite`: ``delta W = left @ right`` with ``left`` ``[d_in, rank]`` and ``right``
  ``[rank, d_out]``. ROME is rank one, MEMIT is rank <= the number of requests per layer; the
  factors are what forensics and audits read (key and value directions).
* :class:`DenseSite`: a full ``delta W`` (fine-tuning baselines such as FT-L).

Deltas are in rome_lens's layout of the weight, ``[d_mlp, d_model]`` for an MLP output weight,
whatever the model API stores (see :mod:`rome_lens.models.access`).

Example:
    >>> site = LowRankSite(layer=3, left=torch.ones(8, 1), right=torch.ones(1, 4))
    >>> site
    LowRankSite(blocks.3.mlp.W_out, rank 1, [8, 4])
    >>> site.delta().shape
    torch.Size([8, 4])
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float

from rome_lens.errors import InvalidRequestError

#: Weights a site can name (relative to ``blocks.L``).
SUPPORTED_WEIGHTS = ("mlp.W_out",)


def _check_weight(weight: str, layer: int) -> None:
    if weight not in SUPPORTED_WEIGHTS:
        raise InvalidRequestError(f"unsupported site weight {weight!r}; expected one of "
                                  f"{SUPPORTED_WEIGHTS}")
    if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
        raise InvalidRequestError(f"site layer must be an int >= 0, got {layer!r}")


def _check_finite(name: str, tensor: torch.Tensor) -> None:
    from rome_lens.errors import NonFiniteError

    if not torch.isfinite(tensor).all():
        raise NonFiniteError(f"site tensor {name} contains NaN or infinity")


@dataclass(frozen=True, eq=False, repr=False)
class LowRankSite:
    """A low-rank change ``left @ right`` of one weight.

    Attributes:
        layer: the block.
        left: ``[d_in, rank]`` (for ``mlp.W_out``: key-space directions, d_mlp).
        right: ``[rank, d_out]`` (for ``mlp.W_out``: value-space directions, d_model).
        weight: the weight within the block.
    """

    layer: int
    left: Float[torch.Tensor, "d_in rank"]
    right: Float[torch.Tensor, "rank d_out"]
    weight: str = "mlp.W_out"

    kind = "low_rank"

    def __post_init__(self) -> None:
        _check_weight(self.weight, self.layer)
        if self.left.ndim != 2 or self.right.ndim != 2 or self.left.shape[1] != self.right.shape[0]:
            raise InvalidRequestError(
                f"low-rank factors must be [d_in, r] and [r, d_out], got "
                f"{list(self.left.shape)} and {list(self.right.shape)}"
            )
        _check_finite("left", self.left)
        _check_finite("right", self.right)

    @property
    def name(self) -> str:
        """Full name of the weight, e.g. ``blocks.3.mlp.W_out``."""
        return f"blocks.{self.layer}.{self.weight}"

    @property
    def rank(self) -> int:
        """Number of factor pairs (an upper bound on the rank of the change)."""
        return int(self.left.shape[1])

    @property
    def shape(self) -> tuple[int, int]:
        """Shape of the change."""
        return int(self.left.shape[0]), int(self.right.shape[1])

    def delta(self) -> Float[torch.Tensor, "d_in d_out"]:
        """The change ``left @ right`` (an outer product when the rank is one)."""
        if self.rank == 1:
            return torch.outer(self.left[:, 0], self.right[0])
        return self.left @ self.right

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors that define the site, by role (for files and checksums)."""
        return {"left": self.left, "right": self.right}

    def digest(self) -> str:
        """Content hash of the change."""
        return _digest(self.name, self.kind, self.tensors())

    def describe(self) -> dict[str, Any]:
        """JSON-able description (no tensors)."""
        return {"kind": self.kind, "layer": self.layer, "weight": self.weight, "rank": self.rank,
                "shape": list(self.shape)}

    def __repr__(self) -> str:
        return f"LowRankSite({self.name}, rank {self.rank}, {list(self.shape)})"


@dataclass(frozen=True, eq=False, repr=False)
class DenseSite:
    """A full-matrix change of one weight.

    Attributes:
        layer: the block.
        change: the change ``[d_in, d_out]``.
        weight: the weight within the block.
    """

    layer: int
    change: Float[torch.Tensor, "d_in d_out"]
    weight: str = "mlp.W_out"

    kind = "dense"

    def __post_init__(self) -> None:
        _check_weight(self.weight, self.layer)
        if self.change.ndim != 2:
            raise InvalidRequestError(f"a dense change must be 2-D, got {list(self.change.shape)}")
        _check_finite("change", self.change)

    @property
    def name(self) -> str:
        """Full name of the weight, e.g. ``blocks.3.mlp.W_out``."""
        return f"blocks.{self.layer}.{self.weight}"

    @property
    def rank(self) -> int:
        """Upper bound on the rank (the smaller dimension)."""
        return int(min(self.change.shape))

    @property
    def shape(self) -> tuple[int, int]:
        """Shape of the change."""
        return int(self.change.shape[0]), int(self.change.shape[1])

    def delta(self) -> Float[torch.Tensor, "d_in d_out"]:
        """The change itself."""
        return self.change

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors that define the site, by role."""
        return {"change": self.change}

    def digest(self) -> str:
        """Content hash of the change."""
        return _digest(self.name, self.kind, self.tensors())

    def describe(self) -> dict[str, Any]:
        """JSON-able description (no tensors)."""
        return {"kind": self.kind, "layer": self.layer, "weight": self.weight,
                "shape": list(self.shape)}

    def __repr__(self) -> str:
        return f"DenseSite({self.name}, {list(self.shape)})"


Site = LowRankSite | DenseSite


def site_from_tensors(description: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Site:
    """Rebuild a site from :meth:`describe` and :meth:`tensors` (the file format)."""
    layer, weight = int(description["layer"]), str(description["weight"])
    if description["kind"] == "low_rank":
        return LowRankSite(layer, tensors["left"], tensors["right"], weight)
    if description["kind"] == "dense":
        return DenseSite(layer, tensors["change"], weight)
    raise InvalidRequestError(f"unknown site kind {description['kind']!r}")


def _digest(name: str, kind: str, tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256(f"{name}:{kind}".encode())
    for role, tensor in tensors.items():
        digest.update(f"{role}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        flat = tensor.detach().cpu().contiguous().reshape(-1)  # size-1 dims: any stride
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
