"""One error path: raise `ApiError` anywhere under a handler; one middleware answers it.

Every failure a client sees has one shape: OpenAI's ``{"error": {"message", "type", "code"}}``,
or Anthropic's ``{"type": "error", "error": {"type", "message"}}`` on the Anthropic routes
(`/v1/messages`, `/v1/messages/count_tokens`), whose SDKs read only their own. `answer` turns
an exception into that response: an `ApiError` as it says, aiohttp's own 404/405/413 the same
way, anything else into a 500 whose body names no detail of the exception (an exception's
text can carry a key or a path) and whose traceback goes to the log under an error id the
client is given.
"""

from __future__ import annotations

import json
import math
import secrets
from collections.abc import Mapping

import structlog
from aiohttp import web

from swapd.redact import clip, redact_text

log = structlog.get_logger("swapd.errors")

_OPENAI_TYPES = {
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
    422: "invalid_request_error",
    429: "rate_limit_error",
}

# https://docs.anthropic.com/en/api/errors
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}

ANTHROPIC_PATHS = ("/v1/messages",)  # and everything below it (count_tokens)


class ApiError(Exception):
    """A request swapd answers with an error. Raise it from a handler (or anything a handler
    calls); the middleware renders it. Subclasses may fix `status`, `code` and `type` as
    class attributes (see swapd.scheduler.SchedulerError); arguments override them.
    """

    status: int = 500
    code: str = "internal_error"
    # OpenAI's error type; None: the usual one for `status`.
    type: str | None = None

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        type: str | None = None,
        retry_after: float | None = None,
        headers: Mapping[str, str] | None = None,
        close_connection: bool = False,
    ) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        if code is not None:
            self.code = code
        if type is not None:
            self.type = type
        # Seconds; sent rounded up (at least 1) as Retry-After.
        self.retry_after = retry_after
        self.headers = dict(headers or {})
        # Close the connection once the answer is out (a client that cannot be trusted to
        # finish sending what it started, e.g. after a 408).
        self.close_connection = close_connection

    def openai_type(self) -> str:
        if self.type:
            return self.type
        return _OPENAI_TYPES.get(self.status, "server_error" if self.status >= 500 else
                                 "invalid_request_error")

    def anthropic_type(self) -> str:
        return _ANTHROPIC_TYPES.get(
            self.status, "api_error" if self.status >= 500 else "invalid_request_error"
        )


def error_body(message: str, *, type: str, code: str | None) -> bytes:
    """OpenAI's error object (also the `data:` line of an event stream that fails), with
    llama-swap's fields beside it: `param` (OpenAI's, always null here) and `src`, which
    tells a script that swapd answered, not an engine (llama-swap writes "llama-swap")."""
    # Messages quote what failed (a URL, an argv, an exception, a client's model name):
    # bounded, then never a secret in it.
    message = redact_text(clip(message))
    return json.dumps({"error": {"message": message, "type": type, "param": None, "code": code},
                       "src": "swapd"}).encode()


def anthropic_error_body(message: str, *, type: str) -> bytes:
    message = redact_text(clip(message))
    return json.dumps({"type": "error", "error": {"type": type, "message": message}}).encode()


def is_anthropic(path: str) -> bool:
    return path.startswith(ANTHROPIC_PATHS)


def render(exc: ApiError, path: str) -> web.Response:
    """The response for `exc`, in the shape the route's clients read."""
    headers = dict(exc.headers)
    if exc.retry_after is not None:
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
    if is_anthropic(path):
        body = anthropic_error_body(exc.message, type=exc.anthropic_type())
    else:
        body = error_body(exc.message, type=exc.openai_type(), code=exc.code)
    return web.Response(
        status=exc.status, body=body, content_type="application/json", headers=headers
    )


def _from_http(request: web.Request, exc: web.HTTPException) -> ApiError:
    """aiohttp's own errors (no route, wrong method, body over client_max_size)."""
    status = exc.status
    if status == 404:
        return ApiError(f"no route for {request.path}", status=404, code="not_found")
    if status == 405:
        allow = exc.headers.get("Allow")
        return ApiError(
            f"{request.method} is not allowed on {request.path}",
            status=405,
            code="method_not_allowed",
            headers={"Allow": allow} if allow else None,
        )
    if status == 413:
        return ApiError("request body too large", status=413, code="body_too_large")
    return ApiError(exc.reason, status=status, code=f"http_{status}")


async def answer(request: web.Request, exc: Exception) -> web.StreamResponse:
    """The response for an exception a handler raised; re-raises what has no answer."""
    if request.writer is not None and request.writer.output_size > 0:
        # Part of a response is on the wire already: no second status line can follow.
        # aiohttp closes the connection, which the client sees as a cut response.
        raise exc
    if isinstance(exc, ApiError):
        resp = render(exc, request.path)
        if exc.close_connection:
            resp.force_close()
            await resp.prepare(request)
            await resp.write_eof()
            if request.protocol is not None:
                request.protocol.force_close()
        return resp
    if isinstance(exc, web.HTTPException):
        if exc.status < 400:
            raise exc  # a redirect or a 2xx raised on purpose
        return render(_from_http(request, exc), request.path)
    if isinstance(exc, ConnectionResetError):
        raise exc  # the client went away: nobody to answer
    error_id = secrets.token_hex(6)
    log.error(
        "unexpected error answering a request",
        method=request.method,
        path=request.path,
        error_id=error_id,
        error_type=type(exc).__name__,
        exc_info=exc,
    )
    return render(
        ApiError(
            f"internal error in swapd ({type(exc).__name__}); swapd's log has the details "
            f"under error_id {error_id}",
            status=500,
            code="internal_error",
        ),
        request.path,
    )
