"""The status page (`/ui`, files in this package) and the JSON/SSE routes it reads (`/api/*`).

The page is plain HTML, CSS and JavaScript shipped with the package: no CDN, no build step, it
works offline. Everything it shows comes from routes that also serve curl and scripts: `/status`,
`/v1/models`, `/logs/stream`, `/api/activity`, `/api/gpu`. Who may read them is the auth
middleware's business (`swapd.http.gate`); the page only sends the key it was given.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import json
import re
import time
from importlib import resources

from aiohttp import web

from swapd.errors import ApiError
from swapd.http.appstate import config_of
from swapd.http.limits import day_start
from swapd.observe.activity import ActivityLog
from swapd.observe.capture import CaptureBuffer
from swapd.observe.metrics import SampleSource
from swapd.observe.streams import history_then_live, stream_headers

_TYPES = {
    ".html": "text/html",
    ".js": "text/javascript",
    ".css": "text/css",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}
# Same-origin only: nothing is fetched from elsewhere, the page cannot be framed.
_PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
# An idle event stream sends a comment this often (proxies close silent connections) and
# notices a client that went away.
KEEPALIVE_SECONDS = 15.0


# The page's files have short plain names: anything else is no file of it, and is not
# handed to the file system (a 4 KB name raised ENAMETOOLONG, a NUL ValueError: 500s).
_ASSET_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}")


def _asset(name: str) -> bytes | None:
    if not _ASSET_NAME.fullmatch(name) or ".." in name:
        return None
    try:
        return resources.files(__package__).joinpath(name).read_bytes()
    except (OSError, ValueError):
        return None


def ui_routes() -> list[web.RouteDef]:
    async def index(request: web.Request) -> web.StreamResponse:
        return _file("index.html")

    async def asset(request: web.Request) -> web.StreamResponse:
        return _file(request.match_info["name"])

    async def root(request: web.Request) -> web.StreamResponse:
        # A browser opening swapd's address lands on the page; API clients of `/` get the
        # same 404 as before the page existed.
        if "text/html" in request.headers.get("Accept", ""):
            return web.Response(status=302, headers={"Location": "/ui"})
        raise ApiError("no route for /", code="not_found", status=404)

    return [
        web.get("/", root),
        web.get("/ui", index),
        web.get("/ui/", index),
        web.get("/ui/{name}", asset),
    ]


def _file(name: str) -> web.Response:
    data = _asset(name)
    suffix = "." + name.rpartition(".")[2]
    if data is None or suffix not in _TYPES:
        raise ApiError(f"no file {name[:100]!r} in the page", code="not_found", status=404)
    return web.Response(body=data, content_type=_TYPES[suffix], headers=_PAGE_HEADERS)


def api_routes(
    activity: ActivityLog, capture: CaptureBuffer, sampler: SampleSource
) -> list[web.RouteDef]:
    async def list_activity(request: web.Request) -> web.Response:
        try:
            since = int(request.query.get("since", "0"))
            limit = int(request.query.get("limit", "0")) or None
        except ValueError:
            raise ApiError(
                "since and limit must be integers", status=400, code="bad_query"
            ) from None
        records = activity.since(since, limit)
        return web.json_response(
            {
                "enabled": activity.enabled,
                "capture": capture.enabled,
                "data": [r.to_json() for r in records],
            }
        )

    async def stream_activity(request: web.Request) -> web.StreamResponse:
        try:
            since = int(request.query.get("since", request.headers.get("Last-Event-ID", "0")))
        except ValueError:
            raise ApiError("since must be an integer", status=400, code="bad_query") from None
        resp = web.StreamResponse(headers=stream_headers())
        async with activity.subscribe() as queue:

            async def live() -> bytes | None:
                record = await queue.get()
                return None if record is None else _event(record.id, record.to_json())

            # History and subscription in one loop iteration: nothing lost or repeated.
            history = b"".join(_event(r.id, r.to_json()) for r in activity.since(since))
            await history_then_live(request, resp, history, live, idle=KEEPALIVE_SECONDS,
                                    keepalive=b": keep-alive\n\n")
        return resp

    async def get_capture(request: web.Request) -> web.Response:
        if not capture.enabled:
            raise ApiError(
                "captures are off (set captureBuffer in the config)", status=404, code="capture_off"
            )
        try:
            record_id = int(request.match_info["id"])
        except ValueError:
            raise ApiError("activity id must be an integer", status=400, code="bad_query") from None
        found = capture.get(record_id)
        if found is None:
            raise ApiError(
                f"no capture for activity {record_id} (not kept or already dropped)",
                status=404,
                code="capture_not_found",
            )
        # Redacting a body of up to captureBuffer MB is a scan of each byte: off the loop.
        document = await asyncio.to_thread(found.to_json)
        return web.json_response({"id": record_id, **document})

    async def usage(request: web.Request) -> web.Response:
        """`GET /api/usage?by=key|model&since=…`: requests and tokens summed (docs/keys.md);
        `since` is Unix time or an ISO date (UTC), today (UTC) by default."""
        by = request.query.get("by", "key")
        if by not in ("key", "model"):
            raise ApiError("by must be key or model", status=400, code="bad_query")
        since = parse_since(request.query.get("since"), time.time())
        rows = await activity.usage(by, since)
        if by == "key":
            # Every configured key, used or not (a key that made no request is news too).
            seen = {row["name"] for row in rows}
            rows += [_zero(k.name) for k in config_of(request).keys.values()
                     if k.name not in seen]
            rows.sort(key=lambda row: row["name"] or "")
        return web.json_response({"by": by, "since": since, "enabled": activity.enabled,
                                  "store": activity.store, "data": rows})

    async def gpu(request: web.Request) -> web.Response:
        sample = sampler.latest()
        return web.json_response(dataclasses.asdict(sample))

    return [
        web.get("/api/activity", list_activity),
        web.get("/api/activity/stream", stream_activity),
        web.get("/api/activity/{id}/capture", get_capture),
        web.get("/api/gpu", gpu),
        web.get("/api/usage", usage),
    ]


def parse_since(text: str | None, now: float) -> float:
    """`since` of /api/usage: Unix seconds, or an ISO date or date and time (UTC unless it
    names its zone); absent: the start of today (UTC). 400 for anything else."""
    if text is None or not text.strip():
        return day_start(now)
    text = text.strip()[:64]
    try:
        return float(text)
    except ValueError:
        pass
    try:
        when = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ApiError("since must be Unix seconds or an ISO date (2026-12-01)", status=400,
                       code="bad_query") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return when.timestamp()


def _zero(name: str) -> dict[str, object]:
    return {"name": name, "requests": 0, "errors": 0, "prompt_tokens": 0,
            "completion_tokens": 0, "tokens": 0}


def _event(event_id: int, data: object) -> bytes:
    return f"id: {event_id}\ndata: {json.dumps(data)}\n\n".encode()
