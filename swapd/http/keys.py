"""The keys a client presents: where a request carries one, and whether it is one of a set.

The gate checks them; the proxy keeps an admin key from ever reaching an engine.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping


def presented_key(headers: Mapping[str, str]) -> str | None:
    """`Authorization: Bearer KEY`, else `x-api-key: KEY`."""
    auth = headers.get("Authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    return headers.get("x-api-key")


def key_in(key: str | None, keys: tuple[str, ...]) -> bool:
    if key is None:
        return False
    # aiohttp decodes header bytes that are not UTF-8 as lone surrogates: give the bytes
    # back (such a key matches none, and is refused like any wrong key).
    presented = key.encode("utf-8", "surrogateescape")
    found = False
    for candidate in keys:
        # No early exit: the time taken must not say which key came close.
        found |= hmac.compare_digest(presented, candidate.encode())
    return found
