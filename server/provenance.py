"""What made a swapped image (Provenance, carried in every response); the mark written into the files themselves is
the contract's (facetwin.v1.provenance).
"""

from __future__ import annotations

import dataclasses

from facetwin.v1.provenance import DIGITAL_SOURCE_TYPE, mark_synthetic

__all__ = ["DIGITAL_SOURCE_TYPE", "Provenance", "mark_synthetic"]


@dataclasses.dataclass(frozen=True)
class Provenance:
    """What made an image: the bundle, the identity it rendered and the sha256 of the bundle's manifest.json (which
    holds the sha256 of every weight file)."""

    model: str
    target: str
    manifest_sha256: str
