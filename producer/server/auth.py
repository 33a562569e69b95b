"""API keys for ``aigc serve``: bearer tokens checked against hashes, in constant time.

Settings hold ``NAME:SHA256HEX`` entries, never keys. A key is 32 random bytes, so one round
of SHA-256 is enough (a slow password hash protects guessable secrets, and these are not).
The name is the owner of every file and batch made with the key: another name's ids answer
404. Two entries with one name share what they own, which is how a key is rotated.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from fastapi import Request

from .errors import APIError

KEY_PREFIX = "sk-aigc-"
OPEN_OWNER = "open"  # the owner of everything when the server runs without keys (--open)


def new_key() -> str:
    """A fresh API key (shown once; only its hash is configured)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    """The hex SHA-256 of ``key``, as ``AIGC_API_KEYS`` entries carry it."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


class KeyRing:
    """The configured keys: ``owner(token)`` is the name whose hash matches, or None."""

    def __init__(self, entries: list[str]):
        self.entries = [(name, bytes.fromhex(digest))
                        for name, _, digest in (entry.partition(":") for entry in entries)]

    def __bool__(self) -> bool:
        return bool(self.entries)

    def owner(self, token: str) -> str | None:
        digest = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        found = None
        for name, expected in self.entries:  # no early exit: the time does not tell which matched
            if hmac.compare_digest(digest, expected) and found is None:
                found = name
        return found


def caller(request: Request) -> str:
    """FastAPI dependency: the owner name of the request's bearer token, or 401."""
    state = request.app.state
    if state.open_access:
        return OPEN_OWNER
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise APIError(401, "You didn't provide an API key. You need to provide your API key in an "
                       "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
                       code="missing_api_key")
    owner = state.keys.owner(token)
    if owner is None:
        shown = f"{token[:8]}****{token[-4:]}" if len(token) > 16 else "****"
        raise APIError(401, f"Incorrect API key provided: {shown}.", code="invalid_api_key")
    return owner
