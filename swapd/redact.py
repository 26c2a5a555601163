"""Keep secrets out of what swapd prints: logs, `/logs*`, `/running`, `/status`, error
bodies, `swapd check` and `swapd status`. One module, so that every exit applies the same
rules (docs/security.md).

A recipe may carry a secret on the command line (`--api-key sk-...`, `--hf-token hf_...`,
`env HF_TOKEN=hf_... vllm serve`, `docker run -e HF_TOKEN=...`, `curl -H 'Authorization:
Bearer ...'`, `https://user:pass@host`), and an engine may print one. The process still gets
the real argv; only the copies that reach logs and HTTP answers are masked.

A name looks secret when one of its words (split at `-`, `_`, `.`) is a secret word
(`--api-key`, `--hf_token`, `HF_TOKEN`, `--jwt-secret`), or a word ends in one
(`PGPASSWORD`, `SECRETKEY`, `DB_PASS`), unless its last word says it names something else
(`--key-file`, `--token-delay`). `--max-num-batched-tokens`, `--tokenizer` and
`--ssl-keyfile` are no secrets (their words are `tokens`, `tokenizer`, `keyfile`).

Every pattern here is linear in its input (issue 21: a backtracking pattern took 11 s over a
20 KB model name, on the event loop): a name or token starts only where no name character
precedes it, and runs are possessive, so no position is scanned twice by one pattern.

`redact_argv` masks an argv (a flag's value is the next argument); `redact_text` masks free
text (a log line, an error message, a proxy URL). Both also mask every value registered with
`remember` (the config's keys and secret env values), wherever it appears.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable, Mapping

MASK = "***"

_SECRET_WORDS = frozenset(
    {
        "key",
        "keys",
        "apikey",
        "apikeys",
        "token",
        "secret",
        "secrets",
        "password",
        "passwd",
        "credential",
        "credentials",
        "auth",
        "authorization",
        "bearer",
        "privatekey",
        "cookie",
    }
)
# A word that ends in one of these names a secret too: PGPASSWORD, SECRETKEY, DB_PASS.
_SECRET_ENDINGS = ("password", "passwd", "secret", "secretkey", "apikey", "token", "pass")
# A last word that says the name is about a secret, not the secret itself.
_NOT_SECRET_LAST = frozenset(
    {"file", "files", "path", "dir", "delay", "size", "length", "len", "type", "types",
     "count", "limit", "timeout", "format", "mode", "prefix", "env", "var", "id", "ids",
     "name", "header"}
)
# Short flags that take a key as their value (`-k VALUE`: a client's or engine's key option).
_SECRET_SHORT_FLAGS = frozenset({"-k"})
# Flags whose value is `user:password` (curl's `-u`/`--user`): the part after `:` is masked.
_USER_FLAGS = frozenset({"-u", "--user", "--proxy-user"})
# What a flag looks like, as opposed to a secret that starts with `-` (token_urlsafe gives
# one in 64): `-ngl`, `-O3`, `--port`, `--no-mmap`.
_FLAG = re.compile(r"(?:-[A-Za-z0-9][A-Za-z0-9-]{0,6}|--[a-z0-9][a-z0-9-]*+)(?:=.*)?", re.DOTALL)
# Flags whose value is an HTTP header line (`-H 'Authorization: Bearer x'`).
_HEADER_FLAGS = frozenset({"-H", "--header", "--headers"})
_WORD_SPLIT = re.compile(r"[-_.]+")
# NAME=value as an argument (`env HF_TOKEN=x cmd`, `-e HF_TOKEN=x`): an env-var-like name
# (no dots: llama.cpp's `--override-kv tokenizer.ggml.add_bos_token=bool:false` is no secret).
_ASSIGNMENT = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$", re.DOTALL)

# -- free text ------------------------------------------------------------------------------
# URL userinfo: scheme://user:PASSWORD@host, also user-only (a token as user name). Found
# from its `://` (a literal: fast to search for), whatever the scheme before it.
_USERINFO = re.compile(r"://([^/\s@:'\"]*+)(?::([^/\s@'\"]*+))?@")
# An authorization scheme and its credentials: `Bearer x`, `Basic x`.
_BEARER = re.compile(r"(?i)\b(bearer\s++)[A-Za-z0-9._~+/=:-]{3,}+")
_BASIC = re.compile(r"(?i)\b(basic\s++)[A-Za-z0-9+/=]{8,}+")
# `Authorization: Token x`, `Authorization: ApiKey x`: any scheme; scheme kept, credential
# masked (the generic rule below would mask only the scheme word).
_AUTH_HEADER = re.compile(
    r"(?i)(?<![A-Za-z0-9_.-])((?:proxy-)?authorization[\"']?\s*+[:=]\s*+[\"']?"
    r"[A-Za-z][A-Za-z0-9_-]*+[ \t]++)(?!\*\*\*)[^\s\"',;]++"
)
# `name: value`, `name=value`, `--name value`, `"name": "value"`, where the name holds a
# secret-looking word (is_secret_name decides). Matched only at the start of a name that
# holds a hint word (_mask_named finds them), and possessive: no backtracking. Only a flag
# takes its value after a space (`token abc` in prose is no assignment).
_NAMED = re.compile(
    r"(?P<name>(?P<dash>--?)?[A-Za-z_][A-Za-z0-9_.-]*+)(?P<q1>[\"']?)"
    r"(?P<sep>\s*+[:=]\s*+|(?(dash)\s++|(?!)))(?P<q2>[\"']?)(?P<value>[^\s\"',;&}]++)"
)
# A template, expanded in C: hostile text with a match every few bytes stays fast.
_MASKED_GROUP = rf"\1{MASK}"
# The part of text[lo:i] up to its last character that cannot be in a name.
_BEFORE_NAME = re.compile(r"(?s:.*)[^A-Za-z0-9_.-]")
_NAME_CHARS = re.compile(r"[A-Za-z0-9_.-]*+")
# The patterns below start with a literal (fast to search for) and say nothing of what
# precedes a match; `_sub_where` keeps only matches that start a word or a token.
# `-k VALUE`: the short key flag of many clients and servers (argv joined into text).
_SHORT = re.compile(r"-k(\s++|=)([\"']?)([^\s\"']++)")
# `-u user:PASSWORD` (curl).
_USER = re.compile(r"(-u|--user|--proxy-user)(\s++|=)([\"']?)([^\s\"':]*+):([^\s\"']++)")
# Well-known token shapes, whatever names them: OpenAI/Anthropic, Hugging Face, GitHub,
# Slack, AWS access key ids.
_SHAPES = re.compile(
    r"sk-[A-Za-z0-9_-]{16,}+|hf_[A-Za-z0-9]{16,}+|gh[pousr]_[A-Za-z0-9]{20,}+"
    r"|github_pat_[A-Za-z0-9_]{20,}+|xox[abpr]-[A-Za-z0-9-]{10,}+|AKIA[A-Z0-9]{16}(?![A-Za-z0-9])"
)
_TOKEN_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
# A line without any of these has no secret name in it (a cheap test before `_NAMED`).
_HINTS = ("key", "token", "secret", "pass", "auth", "bearer", "credential", "cookie")
_WORDS = (*_HINTS, "basic")
# Values the config names as secrets; swapd's daemon registers them at each (re)load.
_known: tuple[str, ...] = ()
# Shorter values would mask ordinary words.
MIN_KNOWN_LENGTH = 6


# The longest string swapd echoes from a request or an engine in one place (an error
# message, a logged value): what is longer is cut before it is scanned or redacted.
MAX_ECHO_CHARS = 2048


def clip(text: str, limit: int = MAX_ECHO_CHARS) -> str:
    """`text` cut to `limit` characters, saying how many more there were. Every string swapd
    echoes is bounded by this before anything else touches it (issue 21)."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit} more characters)"


def remember(values: Iterable[str]) -> None:
    """Mask these exact values wherever they appear from now on (replaces the last set)."""
    global _known
    # Longest first: a key that contains another is masked whole.
    _known = tuple(
        sorted({v for v in values if len(v) >= MIN_KNOWN_LENGTH}, key=len, reverse=True)
    )


def is_secret_name(name: str) -> bool:
    """True for a flag or variable name that names a secret (`--api-key`, `HF_TOKEN`)."""
    if len(name) <= 64:
        return _is_secret_name(name)  # names repeat (an engine's log says `n_tokens` a lot)
    return _secret_words(name)


@functools.lru_cache(maxsize=4096)
def _is_secret_name(name: str) -> bool:
    return _secret_words(name)


def _secret_words(name: str) -> bool:
    words = [w for w in _WORD_SPLIT.split(name.strip("-\"' ").lower()) if w]
    if not words or words[-1] in _NOT_SECRET_LAST:
        return False
    return any(word in _SECRET_WORDS or word.endswith(_SECRET_ENDINGS) for word in words)


def looks_like_flag(arg: str) -> bool:
    """True for `--port`, `-ngl`, `-O3`; False for a secret value that starts with `-`
    (`-Xq3…`, from `secrets.token_urlsafe`)."""
    return _FLAG.fullmatch(arg) is not None


def _named(match: re.Match[str]) -> str:
    name = match["name"]
    if not is_secret_name(name):
        return match[0]
    if not match["dash"] and "." in name and "=" in match["sep"]:
        # llama.cpp's `--override-kv tokenizer.ggml.add_bos_token=bool:false`.
        return match[0]
    value = match["value"]
    if value == MASK or (name.startswith("-") and looks_like_flag(value)):
        return match[0]  # `--api-key --port`: a flag with no value
    return f"{name}{match['q1']}{match['sep']}{match['q2']}{MASK}"


def _mask_named(text: str, lower: str | None = None,
                found: dict[str, int] | None = None) -> str:
    """Mask the values of secret names. Driven by the hint words (a fast search in the
    lower-cased text): each name that holds one is matched once, from its start, so the
    work is linear in the text whatever it holds. `lower` and `found` (each word's first
    position in it), when the caller has them."""
    if lower is None:
        lower = text.lower()
        if len(lower) != len(text):
            lower = text.translate(_ASCII_LOWER)
    out: list[str] = []
    pos = 0  # text[:pos] is in `out`
    lo = 0  # no name starts before lo that is not done with
    hints = _Hints(lower, found)
    while (at := hints.next(lo)) >= 0:
        before = _BEFORE_NAME.match(text, lo, at)
        start = before.end() if before is not None else lo
        match = _NAMED.match(text, start)
        if match is None:
            run = _NAME_CHARS.match(text, start)
            lo = max(run.end() if run is not None else start, at + 1)
            continue
        replaced = _named(match)
        if replaced == match[0]:
            # Not a secret (`-H` in `-H 'x-api-key: v'`): what follows the name is looked
            # at afresh, so a name inside its value is seen too.
            lo = match.end("name")
            continue
        out.append(text[pos:start])
        out.append(replaced)
        pos = lo = match.end()
    out.append(text[pos:])
    return "".join(out)


_ASCII_LOWER = {c: c + 32 for c in range(ord("A"), ord("Z") + 1)}


class _Hints:
    """The next hint word at or after a position, by str.find (a regex alternation of the
    words is tried at every position: 60 ms over 1 MB). Each word's search only moves
    forward, so the whole walk is linear."""

    __slots__ = ("_lower", "_next")

    def __init__(self, lower: str, found: dict[str, int] | None = None) -> None:
        self._lower = lower
        if found is None:
            found = {word: at for word in _HINTS if (at := lower.find(word)) >= 0}
        self._next = {word: at for word, at in found.items() if word in _HINTS}

    def next(self, lo: int) -> int:
        best = -1
        for word, at in list(self._next.items()):
            if at < lo:
                at = self._lower.find(word, lo)
                if at < 0:
                    del self._next[word]
                    continue
                self._next[word] = at
            if best < 0 or at < best:
                best = at
        return best


def _userinfo(match: re.Match[str]) -> str:
    if match[2] is None:
        # `https://TOKEN@host`: a lone user name is often the credential itself (GitHub).
        return f"://{MASK}@" if match[1] else match[0]
    return f"://{match[1]}:{MASK}@"


def redact_text(text: str) -> str:
    """`text` with every secret shape masked: URL userinfo, authorization schemes, secret
    names' values, well-known token shapes and the values registered with `remember`."""
    if not text:
        return text
    for value in _known:
        if value in text:
            text = text.replace(value, MASK)
    # Each pattern only where its literal occurs: a substring search is a fast scan, a
    # pattern tried at every position is not (1 MB of hostile text stays in milliseconds).
    # Each word is searched for once; the positions found drive the named-secret scan.
    if "://" in text:
        text = _USERINFO.sub(_userinfo, text)
    lower = text.lower()
    if len(lower) != len(text):
        lower = text.translate(_ASCII_LOWER)  # `İ` lower-cases to two characters
    found = {word: at for word in _WORDS if (at := lower.find(word)) >= 0}
    masked = 0
    if "bearer" in found:
        text, n = _BEARER.subn(_MASKED_GROUP, text)
        masked += n
    if "basic" in found:
        text, n = _BASIC.subn(_MASKED_GROUP, text)
        masked += n
    if "auth" in found and "authorization" in lower:
        text, n = _AUTH_HEADER.subn(_MASKED_GROUP, text)
        masked += n
    if any(word in found for word in _HINTS):
        if masked:  # the text moved: its positions are found again
            text = _mask_named(text)
        else:
            text = _mask_named(text, lower, found)
    if "-k" in text:
        text = _sub_where(_SHORT, text, _short, str.isspace)
    if "-u" in text:
        text = _sub_where(_USER, text, _user, str.isspace)
    if _may_have_shape(text):
        text = _sub_where(_SHAPES, text, lambda _: MASK, lambda c: c not in _TOKEN_CHARS)
    return text


def _sub_where(pattern: re.Pattern[str], text: str, repl: Callable[[re.Match[str]], str],
               starts_after: Callable[[str], bool]) -> str:
    """`pattern.sub(repl, text)` for the matches at the start of `text` or after a
    character `starts_after` accepts. A match refused for what precedes it is skipped
    whole: a later one inside it is preceded by its characters too (linear)."""
    out: list[str] = []
    pos = at = 0
    while (match := pattern.search(text, at)) is not None:
        start = match.start()
        at = max(match.end(), start + 1)
        if start > 0 and not starts_after(text[start - 1]):
            continue
        out.append(text[pos:start])
        out.append(repl(match))
        pos = at
    if not out:
        return text
    out.append(text[pos:])
    return "".join(out)


def _user(match: re.Match[str]) -> str:
    return f"{match[1]}{match[2]}{match[3]}{match[4]}:{MASK}"


def _may_have_shape(text: str) -> bool:
    """Whether _SHAPES can match at all (a few substring scans instead of the pattern
    tried at every position)."""
    return (
        "sk-" in text
        or "hf_" in text
        or "xox" in text
        or "AKIA" in text
        or ("gh" in text and "_" in text)
    )


def _short(match: re.Match[str]) -> str:
    if looks_like_flag(match[3]):
        return match[0]  # `-k --port`: no value
    return f"-k{match[1]}{match[2]}{MASK}"


def redact_argv(argv: Iterable[str]) -> list[str]:
    """A copy of `argv` with the values of secret-looking flags and assignments masked."""
    out: list[str] = []
    mask_next = False
    header_next = False
    user_next = False
    for arg in argv:
        if header_next:
            header_next = False
            name, colon, _ = arg.partition(":")
            if colon and (is_secret_name(name) or name.strip().lower() == "cookie"):
                out.append(f"{name}: {MASK}")
            else:
                out.append(redact_text(arg))
            continue
        if mask_next:
            mask_next = False
            if not looks_like_flag(arg):
                out.append(MASK)
                continue
            # `--api-key --port 8000`: the flag had no value; look at this one afresh.
        if user_next:
            user_next = False
            name, colon, _ = arg.partition(":")
            if colon:
                out.append(f"{name}:{MASK}")
                continue
        if arg.startswith("-") and len(arg) > 1:
            flag, eq, value = arg.partition("=")
            if flag in _HEADER_FLAGS:
                if eq:
                    out.append(f"{flag}={redact_argv(['-H', value])[1]}")
                else:
                    out.append(arg)
                    header_next = True
            elif flag in _USER_FLAGS:
                if eq:
                    name, colon, _ = value.partition(":")
                    out.append(f"{flag}={name}:{MASK}" if colon else arg)
                else:
                    out.append(arg)
                    user_next = True
            elif is_secret_name(flag) or flag in _SECRET_SHORT_FLAGS:
                if eq:
                    out.append(f"{flag}={MASK}")
                else:
                    out.append(arg)
                    mask_next = True
            elif eq:
                out.append(f"{flag}={_redact_assignment(value)}")  # --env=HF_TOKEN=x
            else:
                out.append(arg)
            continue
        out.append(_redact_assignment(arg))
    return out


def _redact_assignment(arg: str) -> str:
    match = _ASSIGNMENT.match(arg)
    if match and is_secret_name(match.group(1)):
        return f"{match.group(1)}={MASK}"
    return redact_text(arg)


_ANSI = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)?|[@-Z\\-_])")
# Control characters, and the bidirectional overrides and isolates that make a line read
# otherwise than it is (CVE-2021-42574, "Trojan Source").
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def clean_line(line: str) -> str:
    """A log line safe to serve: terminal escape sequences, control characters (ESC, NUL,
    CR, ...) and bidirectional controls removed, tabs and newlines kept, secrets masked."""
    if "\x1b" in line:
        line = _ANSI.sub("", line)
    if not line.isprintable():  # a C scan; most lines are
        line = _CONTROL.sub("", line)
    return redact_text(line)


# Headers whose values are credentials: never kept in a capture or shown on a page.
_SECRET_HEADERS = frozenset(
    {"authorization", "proxy-authorization", "cookie", "set-cookie", "x-api-key", "api-key"}
)
# "api_key": "sk-…" / "password": "…" inside a JSON body (a tool call, a provider key).
_JSON_SECRET = re.compile(r'"([A-Za-z0-9_.\-]*)"(\s*:\s*)"((?:[^"\\]|\\.)*)"')


def redact_headers(headers: Mapping[str, str] | Iterable[tuple[str, str]]) -> dict[str, str]:
    """A copy of HTTP headers with credential values masked (by header name)."""
    items = headers.items() if isinstance(headers, Mapping) else headers
    out: dict[str, str] = {}
    for name, value in items:
        secret = name.lower() in _SECRET_HEADERS or is_secret_name(name)
        out[name] = MASK if secret else value
    return out

