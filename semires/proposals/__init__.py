"""Class-agnostic mask proposals for every train image, and the zarr store that holds them.

Backends (each ``backend(image) -> Proposals``): :mod:`.sam` (segment-anything, the paper's),
:mod:`.sam2` (optional extra), :mod:`.offline` (classical graph-based segmentation, no
weights, not SAM). :mod:`.store` writes and reads the sharded zarr v3 store.
"""

from semires.proposals.base import ATTR_FIELDS, Backend, Proposals, cap, file_sha256
from semires.proposals.store import Layout, ProposalStore, Scratch

__all__ = ["ATTR_FIELDS", "Backend", "Layout", "ProposalStore", "Proposals", "Scratch", "cap", "file_sha256"]
