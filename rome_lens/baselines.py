"""Compatibility module: FT-L moved to :mod:`rome_lens.methods.ft_l`.

``DenseEdit`` is now the general :class:`rome_lens.edits.Edit` (with a dense site).
"""

from rome_lens.edits import Edit as DenseEdit
from rome_lens.methods.ft_l import FTLHyperParams, compute_ft_l

__all__ = ["DenseEdit", "FTLHyperParams", "compute_ft_l"]
