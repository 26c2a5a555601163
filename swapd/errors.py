"""OpenAI-shaped error answers: every failure a client sees has this one shape."""

from __future__ import annotations

import json
import math

from aiohttp import web

from swapd.redact import redact_text

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    421: "invalid_request_error",
    429: "rate_limit_error",
}


def error_body(message: str, *, type: str, code: str | None) -> bytes:
    # Messages quote what failed (a URL, an argv, an exception): never a secret in it.
    message = redact_text(message)
    return json.dumps({"error": {"message": message, "type": type, "code": code}}).encode()


def error_response(
    status: int,
    message: str,
    *,
    code: str | None = None,
    type: str | None = None,
    retry_after: float | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    hdrs = dict(headers or {})
    if retry_after is not None:
        hdrs["Retry-After"] = str(max(1, math.ceil(retry_after)))
    return web.Response(
        status=status,
        body=error_body(
            message, type=type or _TYPES.get(status, "server_error"), code=code or str(status)
        ),
        content_type="application/json",
        headers=hdrs,
    )
