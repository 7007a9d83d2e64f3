"""Cluster UUIDs, compared in one canonical form everywhere.

A cluster UUID is the `kube-system` namespace's uid: 8-4-4-4-12 hex digits. Case carries no
meaning, so `AAAA…` and `aaaa…` name the same cluster; every comparison (peers file duplicates and
our own UUID, JWT `sub`/`aud`, federation pinning and conflicts) goes through `canonical`.
Other spellings that `uuid.UUID` would accept (braces, `urn:uuid:`, no hyphens) are not UUIDs here.
"""

from __future__ import annotations

import re

_FORM = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


def canonical(value: object) -> str | None:
    """The lower-case form of a UUID written as 8-4-4-4-12 hex digits; None for anything else."""
    if not isinstance(value, str) or _FORM.fullmatch(value) is None:
        return None
    return value.lower()


def key(value: str) -> str:
    """What to compare `value` by: its canonical form if it is a UUID, else the text itself."""
    return canonical(value) or value
