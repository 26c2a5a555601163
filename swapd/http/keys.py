"""The keys a client presents: where a request carries one, who it is, and what that key
may reach (docs/keys.md). The gate checks them; the proxy keeps an operator's or admin's
key from ever reaching an engine.

A presented key is hashed (SHA-256) and looked up by its digest in the config's table, then
compared with `hmac.compare_digest`: one hash and one dict lookup whatever the number of
keys, and no comparison whose time says how close a guess came. Scopes are globs over model
ids and aliases (`models`) and over peer ids and `peer/model` names (`peers`); a model out
of a key's scope is, to that key, a model that does not exist (404, not listed).
"""

from __future__ import annotations

import functools
import hmac
from collections.abc import Mapping
from fnmatch import fnmatchcase

from aiohttp import web

from swapd.config.keys import digest
from swapd.config.types import Config, KeyConfig, KeyRole, ModelConfig

# The key a request was let in with (None: no key was needed), for the handlers.
KEY = web.RequestKey("swapd_key", KeyConfig)

RANK = {KeyRole.INFERENCE: 0, KeyRole.OPERATOR: 1, KeyRole.ADMIN: 2}


def presented_key(headers: Mapping[str, str]) -> str | None:
    """`Authorization: Bearer KEY`, else `x-api-key: KEY`."""
    auth = headers.get("Authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    return headers.get("x-api-key")


def identify(config: Config, presented: str | None) -> KeyConfig | None:
    """The key `presented` is, or None (none presented, or not a key of this config)."""
    if presented is None or not config.keys:
        return None
    # aiohttp decodes header bytes that are not UTF-8 as lone surrogates: give the bytes
    # back (such a key matches none, and is refused like any wrong key).
    sha = digest(presented.encode("utf-8", "surrogateescape"))
    found = config.keys.get(sha)
    if found is None or not hmac.compare_digest(found.sha256, sha):
        return None
    return found


def is_swapds_own(config: Config, text: str) -> bool:
    """Whether `text` is a key that opens more than inference (operator or admin): swapd's
    alone, never passed to an engine."""
    key = identify(config, text)
    return key is not None and RANK[key.role] >= 1


def may(key: KeyConfig, role: KeyRole) -> bool:
    """Whether `key`'s role includes `role` (admin ⊃ operator ⊃ inference)."""
    return RANK[key.role] >= RANK[role]


def allows_model(key: KeyConfig | None, model: ModelConfig) -> bool:
    """Whether `key` may use `model` (by its id or one of its aliases)."""
    globs = None if key is None else key.models
    if globs is None:
        return True
    return _matches(globs, (model.id, *model.aliases))


def allows_peer(key: KeyConfig | None, peer: str, model: str) -> bool:
    """Whether `key` may reach `model` on peer `peer` (globs match the peer's id, or
    `peer/model`)."""
    globs = None if key is None else key.peers
    if globs is None:
        return True
    return _matches(globs, (peer, f"{peer}/{model}"))


@functools.lru_cache(maxsize=4096)
def _matches(globs: tuple[str, ...], names: tuple[str, ...]) -> bool:
    """Whether a glob matches a name; remembered, since the same key asks for the same
    model on every request (globs and names come from the config: bounded)."""
    return any(fnmatchcase(name, glob) for glob in globs for name in names)


def locks(config: Config) -> tuple[bool, bool]:
    """(inference needs a key, operations and recipes need one): inference once `apiKeys`
    or any named key is set (`adminKeys` alone leave it open, as before named keys);
    operations and recipes once any key may reach them (`adminKeys`, an operator or admin
    key)."""
    inference = bool(config.api_keys) or any(k.named for k in config.keys.values())
    admin = any(RANK[k.role] >= 1 for k in config.keys.values())
    return inference, admin
