"""Reading one YAML file: key paths in every error, `${env.X}`, typed getters, the values
as the user wrote them. The loaders (swapd.config.loader, swapd.config.routing) build on it.
"""

from __future__ import annotations

import datetime
import difflib
import fnmatch
import functools
import glob
import json
import math
import os
import re
from collections.abc import Hashable, Mapping
from typing import Any, NoReturn
from urllib.parse import urlsplit

import yaml

ENV_REF = re.compile(r"\$\{env\.([a-zA-Z_][a-zA-Z0-9_]*)\}")
SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")


class ConfigError(Exception):
    """A config that cannot be used. `str()` is the full user-facing message."""

    def __init__(self, message: str, *, file: str | None = None, key_path: str | None = None):
        self.file = file
        self.key_path = key_path
        self.detail = message
        parts = []
        if file:
            parts.append(f"{file}:")
        if key_path:
            parts.append(f"{key_path}:")
        parts.append(message)
        super().__init__(" ".join(parts))


def is_http_url(text: str) -> bool:
    """An http:// or https:// URL with a host and no port 0 (a model's or a peer's `proxy`)."""
    try:
        url = urlsplit(text)
        return url.scheme in ("http", "https") and bool(url.hostname) and url.port != 0
    except ValueError:
        return False


def show(value: Any) -> str:
    """A value as the user wrote it, for `got …` in messages."""
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "nothing"}[value]
    if isinstance(value, int | float):
        return repr(value)
    return "a list" if isinstance(value, list) else "a mapping" if isinstance(value, dict) \
        else type(value).__name__


def spell(value: Any) -> str:
    """A macro value spliced into a string, spelled as llama-swap (Go's %v) spells it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e21:
        return str(int(value))
    return str(value)




class DuplicateKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys silently; llama-swap (yaml.v3) refuses them,
    and a model id written twice is almost always a copy-paste mistake."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults` may override
                continue
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, Hashable):
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r}", key_node.start_mark
                    )
                seen.add(key)
        return super().construct_mapping(node, deep)




def split_host_port(text: str) -> tuple[str, int]:
    """`HOST:PORT` (`[::1]:28080` for IPv6) as (host, port). An empty host (`:28080`) is
    "" and means every interface, IPv4 and IPv6, as in Go (llama-swap's `-listen :8080`).
    ValueError when it is not one."""
    host, sep, port = text.strip().rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected HOST:PORT or :PORT (e.g. 127.0.0.1:28080), got {text!r}")
    return host.strip("[]"), int(port)


def local_url(listen: str, scheme: str = "http") -> str:
    """The URL a client on this machine reaches a swapd listening on `listen` at: a
    wildcard address (`:PORT`, `0.0.0.0`, `::`) is where it listens, not where to connect."""
    host, port = split_host_port(listen)
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"{scheme}://{'[' + host + ']' if ':' in host else host}:{port}"


def include_pattern(source: str | None, include: str) -> str:
    """The absolute glob an `include` names: relative to the main config's folder."""
    folder = os.path.dirname(os.path.abspath(source)) if source else os.getcwd()
    return os.path.normpath(os.path.join(folder, os.path.expanduser(include)))


# `**` descends this deep at most, and lists this many entries at most: glob's own `**`
# follows symlinked folders, and a folder that links back to its parent (twice) made it
# walk 2^depth paths (issue 21).
MAX_INCLUDE_DEPTH = 32
MAX_INCLUDE_ENTRIES = 100_000


def include_files(source: str | None, include: str) -> list[str]:
    """The files an `include` glob matches now, in the order they load (sorted; `**`
    descends into folders, each folder once however many symlinks lead to it)."""
    pattern = include_pattern(source, include)
    if "**" not in pattern:
        return sorted(glob.glob(pattern))  # one folder level per component: bounded
    parts = pattern.split(os.sep)
    first = next(i for i, part in enumerate(parts) if glob.has_magic(part))
    base = os.sep.join(parts[:first]) or os.sep
    return sorted(_walk(base, parts[first:]))


def _walk(base: str, rest: list[str]) -> list[str]:
    found: list[str] = []
    seen: set[tuple[int, int]] = set()
    entries = 0
    for folder, dirs, files in os.walk(base, followlinks=True):
        try:
            st = os.stat(folder)
        except OSError:
            dirs[:] = []
            continue
        depth = 0 if folder == base else os.path.relpath(folder, base).count(os.sep) + 1
        if (st.st_dev, st.st_ino) in seen or depth > MAX_INCLUDE_DEPTH:
            dirs[:] = []  # a folder met again through a symlink, or too deep
            continue
        seen.add((st.st_dev, st.st_ino))
        entries += len(dirs) + len(files)
        if entries > MAX_INCLUDE_ENTRIES:
            break
        dirs.sort()
        for name in files:
            path = os.path.join(folder, name)
            if _glob_match(rest, os.path.relpath(path, base).split(os.sep)):
                found.append(path)
    return found


def _glob_match(pattern: list[str], names: list[str]) -> bool:
    """glob's rules on path components: `**` any number of folders, `*`/`?`/`[..]` within
    one name, a leading `.` matched only by a pattern that starts with one."""

    @functools.cache
    def match(i: int, j: int) -> bool:
        if i == len(pattern):
            return j == len(names)
        if pattern[i] == "**":
            return match(i + 1, j) or (
                j < len(names) and not names[j].startswith(".") and match(i, j + 1))
        if j == len(names):
            return False
        name = names[j]
        if name.startswith(".") and not pattern[i].startswith("."):
            return False
        return fnmatch.fnmatchcase(name, pattern[i]) and match(i + 1, j + 1)

    return match(0, 0)


def valid_id(model_id: str) -> bool:
    """True for an id that is safe as a recipe's file name and in URLs."""
    return bool(SAFE_ID.fullmatch(model_id)) and ".." not in model_id


class Ctx:
    """One file being read: where errors point, which environment `${env.X}` reads."""

    def __init__(self, file: str | None, environ: Mapping[str, str], warnings: list[str],
                 label: str = ""):
        self.file, self.environ, self.warnings, self.label = file, environ, warnings, label

    def fail(self, path: str, message: str) -> NoReturn:
        raise ConfigError(message, file=self.file, key_path=path or None)

    def warn(self, path: str, message: str) -> None:
        self.warnings.append(f"{self.label}{path}: {message}")

    def mapping(self, value: Any, path: str) -> dict[Any, Any]:
        if value is not None and not isinstance(value, dict):
            self.fail(path, f"must be a mapping, got {show(value)}")
        return value or {}

    def value(self, value: Any, path: str, typed: bool = True) -> Any:
        """Substitute `${env.X}`. Only values swapd reads come through here, so an unset
        variable in a section swapd ignores (peers.*.apiKey) is no error."""
        if not isinstance(value, str) or "${env." not in value:
            return value

        def lookup(m: re.Match[str]) -> str:
            if m[1] not in self.environ:
                self.fail(path, f"environment variable {m[1]} is not set")
            return self.environ[m[1]]

        out = ENV_REF.sub(lookup, value)
        if typed and ENV_REF.fullmatch(value):
            # llama-swap substitutes env text before parsing YAML, so `startPort: ${env.P}`
            # is a number there; but "0755" or "1_000" must not turn into other digits.
            try:
                parsed = yaml.safe_load(out)
            except yaml.YAMLError:
                return out
            if isinstance(parsed, bool | float) or (
                isinstance(parsed, int) and str(parsed) == out.strip()
            ):
                return parsed
        return out

    def tree(self, value: Any, path: str) -> Any:
        """A JSON-able copy of metadata/setParams, `${env.X}` substituted."""
        if isinstance(value, dict):
            return {str(k): self.tree(v, f"{path}.{k}") for k, v in value.items()}
        if isinstance(value, list):
            return [self.tree(v, f"{path}[{i}]") for i, v in enumerate(value)]
        if isinstance(value, datetime.date):  # YAML 1.1 reads `2025-01-31` as a date
            return value.isoformat()
        if value is None or isinstance(value, str | bool | int) or (
            isinstance(value, float) and math.isfinite(value)
        ):
            return self.value(value, path)
        self.fail(path, f"must be a JSON value, got {show(value)}")

    def text(self, value: Any, path: str) -> str | None:
        value = self.value(value, path, typed=False)
        if value is None or isinstance(value, str):
            return value
        # yaml.v3 decodes any scalar into a string field, so llama-swap takes `name: 42`.
        if isinstance(value, int | float):
            return spell(value)
        self.fail(path, f"must be a string, got {show(value)}")

    def texts(self, value: Any, path: str) -> list[str]:
        if isinstance(value, dict):
            self.fail(path, "must be a list of strings, got a mapping")
        items = [] if value is None else value if isinstance(value, list) else [value]
        return [self.text(item, f"{path}[{i}]") or "" for i, item in enumerate(items)]


class Node:
    """A mapping at a key path; typed getters fail with that path. Keys outside `known`
    get their one warning here (known=None: every key is data, e.g. macro names)."""

    def __init__(self, ctx: Ctx, data: Any, path: str, known: frozenset[str] | None):
        self.ctx, self.data, self.path = ctx, ctx.mapping(data, path), path
        for key in self.data:
            if known is not None and key not in known:
                # Neither swapd nor llama-swap knows it (llama-swap's keys that change
                # nothing here get their own warning, saying why): most likely a slip.
                hint = did_you_mean(key, known)
                ctx.warn(self.key(key), f"unknown key, ignored{hint}")

    def key(self, key: Any) -> str:
        return f"{self.path}.{key}" if self.path else str(key)

    def get(self, key: str) -> Any:
        return self.ctx.value(self.data.get(key), self.key(key))

    def child(self, key: str, known: frozenset[str] | None) -> Node | None:
        raw = self.data.get(key)
        return None if raw is None else Node(self.ctx, raw, self.key(key), known)

    def text(self, key: str) -> str | None:
        return self.ctx.text(self.data.get(key), self.key(key))

    def texts(self, key: str) -> list[str]:
        return self.ctx.texts(self.data.get(key), self.key(key))

    def flag(self, key: str, default: bool) -> bool:
        value = self.get(key)
        if value is not None and not isinstance(value, bool):
            self.ctx.fail(self.key(key), f"must be true or false, got {show(value)}")
        return default if value is None else value

    def number(self, key: str, default: float, *, minimum: float = 0, strict: bool = False,
               integer: bool = False, maximum: float | None = None) -> Any:
        value = self.get(key)
        if value is None:
            return default
        if not (
            isinstance(value, int | float) and not isinstance(value, bool)
            and (isinstance(value, int) or not integer) and math.isfinite(value)
            and (value > minimum if strict else value >= minimum)
            and (maximum is None or value <= maximum)
        ):
            # Floats are fine for seconds, yet "integer" is what llama-swap users know.
            want = (f"between {minimum} and {maximum}" if maximum is not None
                    else f"{'>' if strict else '≥'} {minimum}")
            self.ctx.fail(self.key(key), f"must be an integer {want}, got {show(value)}")
        return value


def did_you_mean(key: Any, known: frozenset[str]) -> str:
    """A hint for a key one slip away from a known one (`healthcheckTimeout`, `aliasses`):
    "ignored" alone leaves the user believing the setting took effect."""
    if not isinstance(key, str):
        return ""
    lower = {k.lower(): k for k in known}
    # 0.8 is close enough for a typo or a case slip, yet far from llama-swap's own keys that
    # swapd ignores (logRequests, peers, timeouts), which must not be "corrected".
    found = lower.get(key.lower())
    if found is None:
        close = difflib.get_close_matches(key.lower(), lower, n=1, cutoff=0.8)
        if not close:
            # Short keys: one slip (`tll`, `tl`, `ttls`) is too large a share of the
            # word for the ratio above.
            close = [k for k in lower if one_slip(key.lower(), k)][:1]
        # A known key plus a word (setParamsByID) is another key, not a slip of setParams.
        if close and not (key.lower().startswith(close[0]) and len(key) > len(close[0]) + 1):
            found = lower[close[0]]
    return f"; did you mean {found}?" if found else ""


def one_slip(a: str, b: str) -> bool:
    """`a` and `b` differ by one typing slip: a letter swapped with its neighbour, added,
    dropped or replaced (Damerau-Levenshtein distance 1). Linear in their length."""
    if a == b or abs(len(a) - len(b)) > 1:
        return False
    i = 0
    while i < min(len(a), len(b)) and a[i] == b[i]:
        i += 1
    if len(a) == len(b):
        swapped = a[i + 1:i + 2] + a[i:i + 1] == b[i:i + 2] and a[i + 2:] == b[i + 2:]
        return swapped or a[i + 1:] == b[i + 1:]
    longer, shorter = (a, b) if len(a) > len(b) else (b, a)
    return longer[i + 1:] == shorter[i:]
