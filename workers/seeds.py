"""Seeds for items that did not set one: stable, so any result can be regenerated exactly."""

from __future__ import annotations

import hashlib


def derive_seed(job_id: str, custom_id: str) -> int:
    """A stable seed for an item that did not set one: same job and id, same seed."""
    digest = hashlib.sha256(f"{job_id}/{custom_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1
