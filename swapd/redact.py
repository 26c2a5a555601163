"""Keep secrets out of what swapd prints: logs, `/logs*`, `/running`, `/status`, error
bodies, `swapd check` and `swapd status`. One module, so that every exit applies the same
rules (docs/security.md).

A recipe may carry a secret on the command line (`--api-key sk-...`, `--hf-token hf_...`,
`env HF_TOKEN=hf_... vllm serve`, `docker run -e HF_TOKEN=...`, `curl -H 'Authorization:
Bearer ...'`, `https://user:pass@host`), and an engine may print one. The process still gets
the real argv; only the copies that reach logs and HTTP answers are masked.

A name looks secret when one of its words (split at `-`, `_`, `.`) is a secret word:
`--api-key`, `--hf_token`, `HF_TOKEN`, `--jwt-secret` do; `--max-num-batched-tokens`,
`--tokenizer` and `--ssl-keyfile` do not (their words are `tokens`, `tokenizer`, `keyfile`).

`redact_argv` masks an argv (a flag's value is the next argument); `redact_text` masks free
text (a log line, an error message, a proxy URL). Both also mask every value registered with
`remember` (the config's keys and secret env values), wherever it appears.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

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
# Short flags that take a key as their value (`-k VALUE`: a client's or engine's key option).
_SECRET_SHORT_FLAGS = frozenset({"-k"})
# Flags whose value is an HTTP header line (`-H 'Authorization: Bearer x'`).
_HEADER_FLAGS = frozenset({"-H", "--header", "--headers"})
_WORD_SPLIT = re.compile(r"[-_.]+")
# NAME=value as an argument (`env HF_TOKEN=x cmd`, `-e HF_TOKEN=x`): an env-var-like name
# (no dots: llama.cpp's `--override-kv tokenizer.ggml.add_bos_token=bool:false` is no secret).
_ASSIGNMENT = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$", re.DOTALL)

# -- free text ------------------------------------------------------------------------------
# URL userinfo: scheme://user:PASSWORD@host, also user-only (a token as user name).
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)([^/\s@:'\"]*)(?::([^/\s@'\"]*))?@")
# An authorization scheme and its credentials: `Bearer x`, `Basic x`, `Token x`.
_SCHEME = re.compile(
    r"(?i)\b(bearer)(\s+)([A-Za-z0-9._~+/=:-]{3,})|\b(basic)(\s+)([A-Za-z0-9+/=]{8,})"
)
# `name: value`, `name=value`, `--name value`, `"name": "value"`, where the name is secret.
_NAMED = re.compile(
    r"(?P<name>(?:--?)?[A-Za-z_][A-Za-z0-9_.-]*)(?P<q1>[\"']?)"
    r"(?P<sep>\s*[:=]\s*|\s+)(?P<q2>[\"']?)(?P<value>[^\s\"',;&}]+)"
)
# `-k VALUE`: the short key flag of many clients and servers (argv joined into text).
_SHORT = re.compile(r"(?<!\S)(-k)(\s+|=)(?!-)([\"']?)[^\s\"']+")
# Well-known token shapes, whatever names them: OpenAI/Anthropic, Hugging Face, GitHub,
# Slack, AWS access key ids.
_SHAPES = re.compile(
    r"\b(?:sk-[A-Za-z0-9_-]{16,}|hf_[A-Za-z0-9]{16,}|gh[pousr]_[A-Za-z0-9]{20,}"
    r"|github_pat_[A-Za-z0-9_]{20,}|xox[abpr]-[A-Za-z0-9-]{10,}|AKIA[A-Z0-9]{16})\b"
)
# A line without any of these has no secret name in it (a cheap test before `_NAMED`).
_HINTS = ("key", "token", "secret", "pass", "auth", "bearer", "credential", "cookie")
# Values the config names as secrets; swapd's daemon registers them at each (re)load.
_known: tuple[str, ...] = ()
# Shorter values would mask ordinary words.
MIN_KNOWN_LENGTH = 6


def remember(values: Iterable[str]) -> None:
    """Mask these exact values wherever they appear from now on (replaces the last set)."""
    global _known
    # Longest first: a key that contains another is masked whole.
    _known = tuple(
        sorted({v for v in values if len(v) >= MIN_KNOWN_LENGTH}, key=len, reverse=True)
    )


def is_secret_name(name: str) -> bool:
    """True for a flag or variable name that names a secret (`--api-key`, `HF_TOKEN`)."""
    words = _WORD_SPLIT.split(name.strip("-\"' ").lower())
    return any(word in _SECRET_WORDS for word in words)


def _named(match: re.Match[str]) -> str:
    name = match["name"]
    if not is_secret_name(name):
        return match[0]
    if not name.startswith("-"):
        if match["sep"].strip() == "":
            # `token abc` in prose is no assignment; only flags take a value after a space.
            return match[0]
        if "." in name and "=" in match["sep"]:
            # llama.cpp's `--override-kv tokenizer.ggml.add_bos_token=bool:false`.
            return match[0]
    value = match["value"]
    if value == MASK or (value.startswith("-") and name.startswith("-")):
        return match[0]  # `--api-key --port`: a flag with no value
    return f"{name}{match['q1']}{match['sep']}{match['q2']}{MASK}"


def _mask_named(text: str) -> str:
    # Not re.sub: after a name that is no secret (`-H` in `-H 'x-api-key: v'`) the search
    # resumes right after that name, so the name inside its value is seen too.
    out: list[str] = []
    pos = 0
    while (match := _NAMED.search(text, pos)) is not None:
        replaced = _named(match)
        if replaced == match[0]:
            out.append(text[pos : match.end("name")])
            pos = match.end("name")
            continue
        out.append(text[pos : match.start()])
        out.append(replaced)
        pos = match.end()
    out.append(text[pos:])
    return "".join(out)


def _scheme(match: re.Match[str]) -> str:
    if match[1]:
        return f"{match[1]}{match[2]}{MASK}"
    return f"{match[4]}{match[5]}{MASK}"


def _userinfo(match: re.Match[str]) -> str:
    if match[3] is None:
        # `https://TOKEN@host`: a lone user name is often the credential itself (GitHub).
        return f"{match[1]}{MASK}@" if match[2] else match[0]
    return f"{match[1]}{match[2]}:{MASK}@"


def redact_text(text: str) -> str:
    """`text` with every secret shape masked: URL userinfo, authorization schemes, secret
    names' values, well-known token shapes and the values registered with `remember`."""
    if not text:
        return text
    for value in _known:
        if value in text:
            text = text.replace(value, MASK)
    if "://" in text:
        text = _USERINFO.sub(_userinfo, text)
    text = _SCHEME.sub(_scheme, text)
    lower = text.lower()
    if any(word in lower for word in _HINTS):
        text = _mask_named(text)
    if "-k" in text:
        text = _SHORT.sub(lambda m: f"{m[1]}{m[2]}{m[3]}{MASK}", text)
    return _SHAPES.sub(MASK, text)


def redact_argv(argv: Iterable[str]) -> list[str]:
    """A copy of `argv` with the values of secret-looking flags and assignments masked."""
    out: list[str] = []
    mask_next = False
    header_next = False
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
            if not arg.startswith("-") or not arg.lstrip("-"):
                out.append(MASK)
                continue
            # `--api-key --port 8000`: the flag had no value; look at this one afresh.
        if arg.startswith("-") and len(arg) > 1:
            flag, eq, value = arg.partition("=")
            if flag in _HEADER_FLAGS:
                if eq:
                    out.append(f"{flag}={redact_argv(['-H', value])[1]}")
                else:
                    out.append(arg)
                    header_next = True
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
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def clean_line(line: str) -> str:
    """A log line safe to serve: terminal escape sequences and control characters (ESC, NUL,
    CR, ...) removed, tabs and newlines kept, secrets masked."""
    if "\x1b" in line:
        line = _ANSI.sub("", line)
    return redact_text(_CONTROL.sub("", line))


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

