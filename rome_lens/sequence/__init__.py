"""Sequential editing: :class:`EditSequence` (compute, apply, monitor, save, replay, undo).

See :mod:`rome_lens.sequence.session` for the session and :mod:`rome_lens.sequence.manifest`
for the folder a saved sequence lives in; the health checks are
:class:`rome_lens.audit.HealthMonitor`.
"""

from rome_lens.sequence.manifest import Manifest, ManifestEntry, read_manifest
from rome_lens.sequence.session import EditSequence

__all__ = ["EditSequence", "Manifest", "ManifestEntry", "read_manifest"]
