"""Request bodies: read whole, bounded in size and in time, and inflated by swapd itself.

aiohttp would inflate a `Content-Encoding: gzip` body on the event loop as it arrives, before
any handler (or the gate's key check) runs: a 300 KB body inflating to 300 MiB cost 690 MB of
memory and stalled `/health` for seconds, keys or no keys (issue 21). The app's server runs
with `auto_decompress=False`; a handler that wants a body reads it here, after the gate let
the request in, and the inflated size counts against the same limit as a plain body, while
it is inflated, a step of INFLATE_STEP at a time with the loop's other work in between.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import zlib
from typing import Any

from aiohttp import web

from swapd.errors import ApiError
from swapd.redact import clip

# zlib's window bits for each encoding a client may send (RFC 9110 §8.4.1).
_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}
# Inflated per step: the size is checked after each.
INFLATE_STEP = 64 * 1024


async def read_body(request: web.Request, limit: int, timeout: float | None = None) -> bytes:
    """The whole request body, inflated if it says `Content-Encoding: gzip` or `deflate`;
    413 past `limit` (before reading when the length says so, and counted while inflating),
    415 for another encoding, 408 when it has not arrived in full within `timeout` seconds
    (`bodyTimeout`: a client that trickles a byte a second must not hold its connection
    forever)."""
    encoding = _encoding(request)
    if request.content_length is not None and request.content_length > limit:
        raise too_large(limit)
    if timeout is None or request.content.is_eof():
        raw = await _read_body(request, limit)  # all there already: no timer to arm
    else:
        try:
            async with asyncio.timeout(timeout):
                raw = await _read_body(request, limit)
        except TimeoutError:
            # The connection is closed after the answer: aiohttp would otherwise linger up
            # to 10 s reading what the slow client still sends.
            raise ApiError(
                f"request body did not arrive within {timeout:g} s (bodyTimeout)",
                status=408,
                code="body_timeout",
                close_connection=True,
            ) from None
    if encoding is None or not raw:
        return raw
    return await inflate(raw, encoding, limit)


def _encoding(request: web.Request) -> str | None:
    """The body's content coding: None for none (or `identity`), else one of _WBITS."""
    value = request.headers.get("Content-Encoding", "").strip().lower()
    if value in ("", "identity"):
        return None
    if value not in _WBITS:
        raise ApiError(
            f"Content-Encoding {clip(value, 64)!r} is not supported; send the body plain, "
            "gzip or deflate",
            status=415,
            code="unsupported_content_encoding",
        )
    return value


async def _read_body(request: web.Request, limit: int) -> bytes:
    if request.content_length is not None:
        # Known and within the limit: one read (half the CPU of the loop below).
        return await request.read()
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


async def inflate(data: bytes, encoding: str, limit: int) -> bytes:
    """`data` inflated, INFLATE_STEP at a time with the loop's other work between steps;
    413 as soon as it passes `limit`, 400 when it is not what its encoding says.
    Concatenated gzip members are one body (RFC 1952); a `deflate` body without the zlib
    header (some clients send that) is taken raw."""
    try:
        return await _inflate(data, _WBITS[encoding], limit)
    except zlib.error:
        if encoding == "deflate":
            with contextlib.suppress(zlib.error):
                return await _inflate(data, -zlib.MAX_WBITS, limit)
        raise ApiError(f"request body is not valid {encoding} data", status=400,
                       code="bad_content_encoding") from None


async def _inflate(data: bytes, wbits: int, limit: int) -> bytes:
    out: list[bytes] = []
    size = 0
    pending = data
    while pending:
        inflater = zlib.decompressobj(wbits)
        while True:
            chunk = inflater.decompress(pending, INFLATE_STEP)
            size += len(chunk)
            if size > limit:
                raise too_large(limit)
            out.append(chunk)
            pending = inflater.unconsumed_tail
            if inflater.eof or (not pending and not chunk):
                break
            # On the loop, a step at a time: worker threads inflating at once took the GIL
            # from the loop often enough to delay /health by 100 ms on a loaded runner.
            await asyncio.sleep(0)
        if not inflater.eof:
            raise zlib.error("truncated")
        pending = inflater.unused_data if wbits > zlib.MAX_WBITS else b""
    return b"".join(out)


def too_large(limit: int) -> ApiError:
    return ApiError(
        f"request body exceeds {limit} bytes (maxBodyBytes)", status=413, code="body_too_large"
    )


def parse_json(body: bytes, what: str) -> Any:
    """JSON from a client, or a 400 that says why (nesting deep enough to exhaust Python's
    recursion limit included: that is the client's input, not swapd failing)."""
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(f"{what} is not valid JSON: {exc}", status=400, code="bad_json") from None
    except RecursionError:
        raise ApiError(
            f"{what} is nested too deeply to parse", status=400, code="bad_json"
        ) from None
