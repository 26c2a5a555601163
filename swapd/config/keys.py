"""`keys:` (named keys with scopes, limits and roles) and `apiKeys`/`adminKeys` (unnamed
keys) as one table: the SHA-256 of each secret → its `KeyConfig` (docs/keys.md).

Only digests are kept: `keySha256` lets a config hold no secret at all, and a `key:` is
hashed as it is read. A key entry's unknown setting is an error, not a warning: a typo
(`model:` for `models:`) would otherwise open every model to that key.
"""

from __future__ import annotations

import calendar
import datetime
import hashlib
import re
from typing import Any

from swapd.config.nodes import Node, did_you_mean, show
from swapd.config.types import KeyConfig, KeyRole

KEY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")
_ENTRY_KEYS = frozenset(
    "key keySha256 models peers role maxConcurrent requestsPerMinute tokensPerDay expires "
    "swap".split()
)


def digest(secret: str | bytes) -> bytes:
    """The SHA-256 of a key as a client presents it (what the table is indexed by)."""
    return hashlib.sha256(secret.encode() if isinstance(secret, str) else secret).digest()


def load_keys(top: Node, api_keys: tuple[str, ...], admin_keys: tuple[str, ...],
              activity_size: int) -> dict[bytes, KeyConfig]:
    """Every key the config names, by digest: `keys:` first, then `apiKeys` (inference) and
    `adminKeys` (admin) as unnamed keys called by their key path. A secret named twice is an
    error, except in both old lists (llama-swap lets an admin key be listed as an API key
    too: it is an admin key)."""
    out: dict[bytes, KeyConfig] = {}
    where: dict[bytes, str] = {}
    node = top.child("keys", None)
    if node is not None:
        for name, raw in node.data.items():
            path = node.key(name)
            if not isinstance(name, str) or not KEY_NAME.fullmatch(name):
                top.ctx.fail(path, "a key's name must match ^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$ "
                             "(it labels metrics and usage)")
            entry = _entry(Node(top.ctx, raw, path, None), name, activity_size)
            if entry.sha256 in out:
                top.ctx.fail(path, f"the same key as {where[entry.sha256]}")
            out[entry.sha256] = entry
            where[entry.sha256] = path
    for label, keys, role in (("apiKeys", api_keys, KeyRole.INFERENCE),
                              ("adminKeys", admin_keys, KeyRole.ADMIN)):
        for i, secret in enumerate(keys):
            sha = digest(secret)
            if sha in where and where[sha].startswith("keys."):
                top.ctx.fail(f"{label}[{i}]", f"the same key as {where[sha]}")
            if sha in out and label == "apiKeys":
                continue  # listed twice in apiKeys: the first name stays
            out[sha] = KeyConfig(name=f"{label}[{i}]", sha256=sha, role=role, named=False)
            where[sha] = f"{label}[{i}]"
    return out


def _entry(node: Node, name: str, activity_size: int) -> KeyConfig:
    ctx = node.ctx
    for key in node.data:
        if key not in _ENTRY_KEYS:
            ctx.fail(node.key(key), f"not a setting of a key{did_you_mean(key, _ENTRY_KEYS)} "
                     "(refused rather than ignored: a key must not get more than it was meant "
                     "to)")
    secret = node.text("key")
    hashed = node.text("keySha256")
    if (secret is None) == (hashed is None):
        ctx.fail(node.path, "needs exactly one of key (the secret, e.g. ${env.ALICE_KEY}) or "
                 "keySha256 (its SHA-256 in hex: swapd keys new prints one)")
    if secret is not None:
        if not secret or any(c.isspace() for c in secret):
            ctx.fail(node.key("key"), "must be a non-empty string without spaces")
        sha = digest(secret)
    else:
        assert hashed is not None
        if not _HEX64.fullmatch(hashed.strip()):
            ctx.fail(node.key("keySha256"), "must be 64 hexadecimal digits (the SHA-256 of "
                     "the key), got " + show(hashed[:80]))
        sha = bytes.fromhex(hashed.strip())
    role_text = (node.text("role") or "inference").strip().lower()
    try:
        role = KeyRole(role_text)
    except ValueError:
        ctx.fail(node.key("role"), "must be inference, operator or admin, got "
                 + show(role_text[:80]))
    tokens = node.number("tokensPerDay", 0, integer=True)
    if tokens and activity_size <= 0:
        ctx.fail(node.key("tokensPerDay"), "counts tokens from the activity records, which "
                 "activity.size: 0 turns off")
    return KeyConfig(
        name=name,
        sha256=sha,
        role=role,
        models=_globs(node, "models"),
        peers=_globs(node, "peers"),
        max_concurrent=node.number("maxConcurrent", 0, integer=True),
        requests_per_minute=node.number("requestsPerMinute", 0, integer=True),
        tokens_per_day=tokens,
        expires=_expires(node),
        swap=node.flag("swap", True),
    )


def _globs(node: Node, key: str) -> tuple[str, ...] | None:
    if node.data.get(key) is None:
        return None  # absent: every model (peer)
    globs = node.texts(key)
    for i, glob in enumerate(globs):
        if not glob.strip() or len(glob) > 256:
            node.ctx.fail(f"{node.key(key)}[{i}]", "must be a model id, alias or glob "
                          "(qwen*), at most 256 characters")
    return tuple(g.strip() for g in globs)


def _expires(node: Node) -> float | None:
    """`expires`: a date (the key is refused from 00:00 UTC that day) or a date and time
    (UTC unless it names its zone), as Unix time."""
    value: Any = node.data.get("expires")
    if value is None:
        return None
    if isinstance(value, str):
        value = node.text("expires")
        try:
            value = datetime.datetime.fromisoformat(value.strip().replace("Z", "+00:00")) \
                if "T" in value or " " in value.strip() else datetime.date.fromisoformat(
                    value.strip())
        except ValueError:
            node.ctx.fail(node.key("expires"), "must be a date (2027-01-01) or a date and time "
                          f"(2027-01-01T12:00:00Z), got {show(node.data.get('expires'))}")
    if isinstance(value, datetime.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=datetime.UTC)
        return float(value.timestamp())
    if isinstance(value, datetime.date):
        return float(calendar.timegm(value.timetuple()))
    node.ctx.fail(node.key("expires"), f"must be a date (2027-01-01), got {show(value)}")
