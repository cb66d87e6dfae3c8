"""The trust anchor: which suite refattn published, and whether a loaded one is it.

A suite folder carries the SHA-256 of every case file in its manifest, so
those sums protect the files only as far as the manifest itself can be
trusted: anyone who edits a file can recompute its sum. refattn therefore
carries, in its code, the SHA-256 of the manifest it published
(:data:`PUBLISHED_MANIFEST_SHA256`). A suite whose ``manifest.json`` has
that hash, and whose files match the sums it lists (the loader checks them),
is the **official suite**: byte for byte what refattn exported and tested.
Any other suite is a **custom suite**: possibly correct (a fresh ``refattn
export``, a suite of your own), but vouched for by nobody but its author.
Every report says which on its first line; ``require_official=True``
(``--require-official``) refuses a custom suite.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

#: SHA-256 of the ``conformance/manifest.json`` this version of refattn publishes.
#: Regenerating the vectors changes it: tests/test_trust.py says the new value.
PUBLISHED_MANIFEST_SHA256 = "da90d9ddb885a3c0df6b1caf5045ca1725c6bede5f20683dae79085dc3689379"


@dataclass(frozen=True)
class Origin:
    """Where a suite comes from, judged by its manifest's hash.

    Attributes
    ----------
    manifest_sha256 : str
        SHA-256 of the suite's ``manifest.json`` bytes.
    """

    manifest_sha256: str

    @property
    def official(self) -> bool:
        return self.manifest_sha256 == PUBLISHED_MANIFEST_SHA256

    def describe(self) -> str:
        """``official suite (refattn 0.1.0)`` or ``custom suite: manifest hash ..., not the published one``."""
        if self.official:
            return f"official suite (refattn {_installed_version()})"
        return f"custom suite: manifest hash {self.manifest_sha256[:16]}..., not the published one"

    def to_dict(self) -> dict:
        return {"official": self.official, "manifest_sha256": self.manifest_sha256, "description": self.describe()}


def origin(manifest_bytes: bytes) -> Origin:
    """The :class:`Origin` of a suite whose ``manifest.json`` holds ``manifest_bytes``."""
    return Origin(hashlib.sha256(manifest_bytes).hexdigest())


def _installed_version() -> str:
    from .. import __version__

    return __version__
