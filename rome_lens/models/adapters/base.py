"""The interface every model adapter implements, and the values adapters hand out.

An adapter is stateless: every method takes the model as its first argument, so one adapter
instance serves every model of its API and caching it per model keeps no model alive.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from jaxtyping import Float, Int
from torch import nn

from rome_lens._typing import Model


class FrozenPrefix:
    """Keys and values of a batch of prefixes, computed once and reused by later passes.

    Only models with a TransformerLens key-value cache support it (see
    :func:`rome_lens.models.access.supports_frozen_prefix`); the object is opaque outside
    :mod:`rome_lens.models`.
    """

    def __init__(self, cache: Any, n_rows: int, width: int) -> None:
        self.cache, self.n_rows, self.width = cache, n_rows, width

    def __repr__(self) -> str:
        return f"FrozenPrefix(rows={self.n_rows}, positions={self.width})"


@dataclass(frozen=True, repr=False)
class KeyValueRecord:
    """Every layer's attention keys and values from one recorded run.

    Attributes:
        keys: per-layer keys ``[rows, pos, kv_heads, d_head]`` (as the key-value cache holds
            them, before any positional rotation).
        values: per-layer values, same shape.
    """

    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]

    @property
    def n_rows(self) -> int:
        """Rows (batch entries) recorded."""
        return int(self.keys[0].shape[0]) if self.keys else 0

    @property
    def width(self) -> int:
        """Positions recorded."""
        return int(self.keys[0].shape[1]) if self.keys else 0

    def __repr__(self) -> str:
        layers = len(self.keys)
        return f"KeyValueRecord(layers={layers}, rows={self.n_rows}, positions={self.width})"


class ModelAdapter(ABC):
    """One model API (HookedTransformer, TransformerBridge): what differs between them.

    :mod:`rome_lens.models.access` is the public facade; it validates arguments and delegates
    here. Capabilities a model API lacks raise ``TypeError`` with a message naming the API.
    """

    #: short API name, as returned by :func:`rome_lens.models.access.api_name`
    name: ClassVar[str]
    #: the API in words, for error messages ("a TransformerBridge")
    description: ClassVar[str]
    #: whether a TransformerLens key-value cache can freeze a prefix (and record keys/values)
    supports_frozen_prefix: ClassVar[bool] = False

    @abstractmethod
    def matches(self, model: object) -> bool:
        """Whether this adapter serves ``model``."""

    @abstractmethod
    def weight_space(self, model: Model) -> str:
        """Name of the weight space an edit computed on ``model`` lives in."""

    @abstractmethod
    def embedding_matrix(self, model: Model) -> Float[torch.Tensor, "d_vocab d_model"]:
        """Token embedding rows as ``hook_embed`` emits them."""

    @abstractmethod
    def mlp_out_parameter(self, model: Model, layer: int) -> tuple[str, nn.Parameter, bool]:
        """``(state-dict name, parameter, transposed)`` of a (checked) layer's MLP output."""

    @abstractmethod
    def mlp_out_bias(self, model: Model, layer: int) -> torch.Tensor | None:
        """Bias of a (checked) layer's MLP output projection, if any."""

    def post_mlp(self, model: Model, layer: int) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """The map from a (checked) layer's raw MLP output to what enters the residual stream.

        ``None`` when the raw output is added as it is (GPT-2, GPT-J, Llama); Gemma 2/3 normalise
        it first (``ln2_post``, an RMSNorm).
        """
        return None

    @abstractmethod
    def residual_before(
        self,
        model: Model,
        tokens: Int[torch.Tensor, "batch pos"],
        layer: int,
        prefix: FrozenPrefix | None,
        attention_mask: Int[torch.Tensor, "batch all_pos"] | None,
    ) -> Float[torch.Tensor, "batch pos d_model"]:
        """Residual entering block ``layer``."""

    @abstractmethod
    def final_residual(
        self, model: Model, tokens: Int[torch.Tensor, "batch pos"], **kwargs: Any
    ) -> Float[torch.Tensor, "batch pos d_model"]:
        """Residual after the last block, without computing logits."""

    @abstractmethod
    def run_with_states(
        self,
        model: Model,
        tokens: Int[torch.Tensor, "batch pos"],
        names: Collection[str],
        stop_at_layer: int | None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One forward pass keeping the activations of the hooks ``names``."""

    @abstractmethod
    def run_blocks_from(
        self,
        model: Model,
        resid: Float[torch.Tensor, "batch pos d_model"],
        layer: int,
        prefix: FrozenPrefix | None,
        attention_mask: Int[torch.Tensor, "batch all_pos"] | None,
    ) -> Float[torch.Tensor, "batch pos d_model"]:
        """Run blocks ``layer..`` on a residual; the last block's output."""

    @abstractmethod
    def decode_residual(
        self, model: Model, resid: Float[torch.Tensor, "... d_model"]
    ) -> Float[torch.Tensor, "... d_vocab"]:
        """Logits of residual vectors."""

    @abstractmethod
    def start_decoding(self, model: Model, batch: int) -> object:
        """The empty cache of an incremental decoder for ``batch`` rows."""

    @abstractmethod
    def decode_step(
        self, model: Model, cache: object, tokens: Int[torch.Tensor, "batch new"]
    ) -> tuple[Float[torch.Tensor, "batch d_vocab"], object]:
        """Feed ``tokens``; ``(next-token logits, updated cache)``."""

    def run_prefix(
        self,
        model: Model,
        tokens: Int[torch.Tensor, "batch pos"],
        attention_mask: Int[torch.Tensor, "batch pos"],
    ) -> FrozenPrefix:
        """Run ``tokens`` through every block and freeze their keys and values."""
        raise self.no_key_value_cache()

    def run_with_keys_values(
        self,
        model: Model,
        tokens: Int[torch.Tensor, "batch pos"],
        names: Collection[str],
        **kwargs: Any,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], KeyValueRecord]:
        """:meth:`run_with_states` over every block that also records keys and values."""
        raise self.no_key_value_cache()

    def prefix_from_keys_values(
        self, model: Model, record: KeyValueRecord, width: int, rows: slice | torch.Tensor
    ) -> FrozenPrefix:
        """A frozen prefix of positions ``[0, width)`` of the ``rows`` of a record."""
        raise self.no_key_value_cache()

    def no_key_value_cache(self) -> TypeError:
        """The error raised by the frozen-prefix methods of an API without them."""
        return TypeError(f"{self.description} has no TransformerLens key-value cache")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
