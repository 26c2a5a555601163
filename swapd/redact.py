"""Keep secrets out of what swapd prints: engine argv in the log, `/running`'s cmd.

A recipe may carry a secret on the command line (`--api-key sk-...`, `--hf-token hf_...`,
`env HF_TOKEN=hf_... vllm serve`, `docker run -e HF_TOKEN=...`). The process still gets the
real argv; only the copies that reach logs and HTTP answers are masked.

A name looks secret when one of its words (split at `-`, `_`, `.`) is a secret word:
`--api-key`, `--hf_token`, `HF_TOKEN`, `--jwt-secret` do; `--max-num-batched-tokens`,
`--tokenizer` and `--ssl-keyfile` do not (their words are `tokens`, `tokenizer`, `keyfile`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

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
    }
)
_WORD_SPLIT = re.compile(r"[-_.]+")
# NAME=value as an argument (`env HF_TOKEN=x cmd`, `-e HF_TOKEN=x`): an env-var-like name
# (no dots: llama.cpp's `--override-kv tokenizer.ggml.add_bos_token=bool:false` is no secret).
_ASSIGNMENT = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$", re.DOTALL)


def is_secret_name(name: str) -> bool:
    """True for a flag or variable name that names a secret (`--api-key`, `HF_TOKEN`)."""
    words = _WORD_SPLIT.split(name.strip("-").lower())
    return any(word in _SECRET_WORDS for word in words)


def redact_argv(argv: Iterable[str]) -> list[str]:
    """A copy of `argv` with the values of secret-looking flags and assignments masked."""
    out: list[str] = []
    mask_next = False
    for arg in argv:
        if mask_next:
            mask_next = False
            if not arg.startswith("-") or not arg.lstrip("-"):
                out.append(MASK)
                continue
            # `--api-key --port 8000`: the flag had no value; look at this one afresh.
        if arg.startswith("-") and len(arg) > 1:
            flag, eq, value = arg.partition("=")
            if is_secret_name(flag):
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
    return arg
