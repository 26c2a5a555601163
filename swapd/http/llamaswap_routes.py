"""llama-swap's routes beyond the OpenAI API, with llama-swap's meaning (issue 22).

What a llama-swap user's scripts, dashboards and container health checks call: its UI's
API (`/api/models/unload`, `/api/events`, `/api/metrics/*`, `/api/version`), its health
check for wake-on-LAN proxies (`/wol-health`), its inference routes beyond OpenAI's
(`/v/*` without the version, stable-diffusion.cpp's `/sdapi/v1/*`, audio.cpp's
`/audioapi/*`, `/v1/audio/voices`) and `GET /upstream`. Inference routes are relayed by
the proxy like every other (same key, same lease); operations routes sit under `/api/`,
behind the admin gate (swapd.http.gate). docs/llama-swap.md lists them.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import math
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from swapd import __version__
from swapd.errors import ApiError
from swapd.http.appstate import config_of
from swapd.http.modelnames import Profiles
from swapd.http.proxy import Proxy
from swapd.observe.activity import ActivityLog, Record
from swapd.observe.events import StateEvents
from swapd.observe.logs import ENGINES, SWAPD, LogHub
from swapd.schedule.runner import Scheduler

# Model-routed POSTs with a JSON body (`model`), as llama-swap's modelPostJSONRoutes beyond
# swapd's own: relayed with `/v` and `/audioapi` taken off the path (proxy.upstream_path).
POST_PATHS = (
    "/v1/audio/voices",
    "/sdapi/v1/txt2img",
    "/sdapi/v1/img2img",
    "/audioapi/v1/tasks/run",
    "/v/chat/completions",
    "/v/responses",
    "/v/completions",
    "/v/messages",
    "/v/messages/count_tokens",
    "/v/embeddings",
    "/v/rerank",
    "/v/reranking",
)
# Model-routed GETs (`?model=`); `/props` is the llama.cpp router API's (swapd.http.router_api).
GET_PATHS = ("/v1/audio/voices", "/sdapi/v1/loras")
# Paths that answer "OK" to anyone, as /health (wake-on-LAN proxies poll it).
OPEN_PATHS = ("/wol-health",)
# llama-swap's log sources in /api/events: its own log and every engine's output.
LOG_SOURCES = {"proxy": SWAPD, "upstream": ENGINES}
# Seconds between SSE comments on an idle /api/events stream (proxies drop silent ones).
KEEPALIVE_SECONDS = 15.0


def llamaswap_routes(proxy: Proxy, scheduler: Scheduler, events: StateEvents,
                     activity: ActivityLog, profiles: Profiles,
                     hub: LogHub) -> list[web.RouteDef]:
    routes = LlamaSwapRoutes(scheduler, events, activity, profiles, hub)
    return [
        *(web.post(path, proxy.handle_inference) for path in POST_PATHS),
        *(web.get(path, proxy.handle_by_query) for path in GET_PATHS),
        web.get("/wol-health", routes.health),
        web.get("/upstream", routes.upstream_list),
        web.post("/api/models/unload", routes.unload_all),
        web.post("/api/models/unload/{model:.+}", routes.unload_one),
        web.get("/api/version", routes.version),
        web.get("/api/events", routes.events),
        web.get("/api/metrics/activity", routes.activity),
        web.get("/api/metrics/stats", routes.stats),
    ]


class LlamaSwapRoutes:
    def __init__(self, scheduler: Scheduler, events: StateEvents, activity: ActivityLog,
                 profiles: Profiles, hub: LogHub) -> None:
        self._hub = hub
        self._scheduler = scheduler
        self._events = events
        self._activity = activity
        self._profiles = profiles

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(text="OK")

    async def upstream_list(self, request: web.Request) -> web.StreamResponse:
        """A browser goes to the status page (llama-swap redirects to its model list);
        a script gets the models whose engine `/upstream/{id}/` reaches, and where."""
        if "text/html" in request.headers.get("Accept", ""):
            raise web.HTTPFound("/ui")
        config = config_of(request)
        data = []
        for model in config.models.values():
            if model.unlisted:
                continue
            view = self._scheduler.view(model.id)
            data.append({"id": model.id, "state": view.state if view else "stopped",
                         "url": f"/upstream/{model.id}/"})
        return web.json_response({"object": "list", "data": data})

    async def unload_all(self, request: web.Request) -> web.Response:
        """llama-swap's UI button: every local engine stops; `{"msg": "ok"}`."""
        await self._scheduler.unload(None)
        return web.json_response({"msg": "ok"})

    async def unload_one(self, request: web.Request) -> web.Response:
        """One model (id or alias; an id may hold '/'), answered `OK` as text as llama-swap
        does; 404 for a name that is not a local model."""
        name = request.match_info["model"]
        model = config_of(request).resolve(name)
        if model is None:
            raise ApiError(f"model {name!r} is not configured", status=404,
                           code="model_not_found")
        await self._scheduler.unload(model.id)
        return web.Response(text="OK")

    async def version(self, request: web.Request) -> web.Response:
        # llama-swap's fields; swapd is installed from a package, not built from a commit.
        return web.json_response({"version": __version__, "commit": "", "build_date": ""})

    # -- /api/events -----------------------------------------------------------------

    def _model_status(self, request: web.Request) -> list[dict[str, Any]]:
        """llama-swap's `modelStatus` payload: every model with its state, then peers'."""
        config = config_of(request)
        out: list[dict[str, Any]] = []
        for model in sorted(config.models.values(), key=lambda m: m.id):
            view = self._scheduler.view(model.id)
            entry: dict[str, Any] = {
                "id": model.id, "name": model.name or "", "description": model.description or "",
                "state": _llamaswap_state(view.state if view else "stopped"),
                "unlisted": model.unlisted, "peerID": "",
            }
            if model.aliases:
                entry["aliases"] = list(model.aliases)
            out.append(entry)
        for peer in config.peers.values():
            for peer_model in peer.models:
                out.append({"id": f"{peer.id}/{peer_model}", "name": "", "description": "",
                            "state": "", "unlisted": False, "peerID": peer.id})
        return out

    async def events(self, request: web.Request) -> web.StreamResponse:
        """llama-swap's event stream: `event:message` frames whose data is
        `{"type": ..., "data": "<JSON text>"}`. Sent: `modelStatus` at once and on every
        engine state change; `logData` (`{"source": "proxy"|"upstream", "data"}`: swapd's
        log and the engines' output, the recent lines first); `profileChanged` at once;
        `activity` (`{"id"}`) for each finished request. (`inflight` and `uiConfig` are
        not sent.)"""
        resp = web.StreamResponse(headers={
            "Content-Type": "text/event-stream", "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no", "X-Content-Type-Options": "nosniff",
        })

        def frame(kind: str, data: Any) -> bytes:
            envelope = {"type": kind, "data": json.dumps(data)}
            return f"event:message\ndata:{json.dumps(envelope)}\n\n".encode()

        def log_data(source: str, lines: list[str]) -> bytes:
            return frame("logData", {"source": source, "data": "".join(f"{ln}\n" for ln in lines)})

        async with contextlib.AsyncExitStack() as stack:
            states = await stack.enter_async_context(self._events.listen())
            records = await stack.enter_async_context(self._activity.subscribe())
            # recent() and subscribe() in one loop iteration: no line lost or repeated.
            history = {name: self._hub.recent(key) for name, key in LOG_SOURCES.items()}
            logs = {name: await stack.enter_async_context(self._hub.subscribe(key))
                    for name, key in LOG_SOURCES.items()}
            await resp.prepare(request)
            await resp.write(frame("modelStatus", self._model_status(request)))
            for name, lines in history.items():
                if lines:
                    await resp.write(log_data(name, lines))
            await resp.write(frame("profileChanged", {"active": self._profiles.active}))
            waits: dict[str, Callable[[], Awaitable[Any]]] = {
                "state": states.get, "record": records.get,
                **{name: functools.partial(anext, sub, None) for name, sub in logs.items()},
            }
            pending = {name: asyncio.ensure_future(wait()) for name, wait in waits.items()}
            try:
                while True:
                    done, _ = await asyncio.wait(pending.values(), timeout=KEEPALIVE_SECONDS,
                                                 return_when=asyncio.FIRST_COMPLETED)
                    if not done:
                        await resp.write(b": keep-alive\n\n")
                        continue
                    ended = False
                    for name, future in list(pending.items()):
                        if future not in done:
                            continue
                        item = future.result()
                        if item is None:
                            ended = True
                            break
                        if name == "state":
                            await resp.write(frame("modelStatus", self._model_status(request)))
                        elif name == "record":
                            await resp.write(frame("activity", {"id": item.id}))
                        else:
                            await resp.write(log_data(name, [item, *logs[name].drain_nowait()]))
                        pending[name] = asyncio.ensure_future(waits[name]())
                    if ended:
                        break
            except ConnectionError:
                pass
            finally:
                for future in pending.values():
                    future.cancel()
        return resp

    # -- /api/metrics ----------------------------------------------------------------

    async def activity(self, request: web.Request) -> web.Response:
        """llama-swap's activity table, a page at a time, newest first: `?model=` (may
        repeat), `?limit=` (1-999, default 25), `?page=` (from 1)."""
        query = request.query
        limit = _int_param(query.get("limit"), 25, "limit", 1, 999)
        page = _int_param(query.get("page"), 1, "page", 1, None)
        models = {m.strip() for m in query.getall("model", []) if m.strip()}
        records = [r for r in reversed(self._activity.since(0))
                   if not models or r.model in models]
        total = len(records)
        rows = records[(page - 1) * limit:page * limit]
        return web.json_response({
            "data": [_row(r) for r in rows], "page": page, "limit": limit, "total": total,
            "total_pages": math.ceil(total / limit) if total else 0,
        })

    async def stats(self, request: web.Request) -> web.Response:
        """llama-swap's totals and speed histograms over the records kept (`?model=`)."""
        model = request.query.get("model", "").strip()
        records = [r for r in self._activity.since(0) if not model or r.model == model]
        return web.json_response({
            "total_requests": len(records),
            "total_input_tokens": sum(r.prompt_tokens or 0 for r in records),
            "total_output_tokens": sum(r.completion_tokens or 0 for r in records),
            "total_cache_tokens": sum(r.cached_tokens or 0 for r in records),
            "prompt_histogram": _histogram([r.prefill_tps for r in records]),
            "gen_histogram": _histogram([r.decode_tps for r in records]),
        })


def _llamaswap_state(state: str) -> str:
    """swapd's engine state in llama-swap's words (its process states)."""
    return {"failed": "stopped"}.get(state, state)


def _int_param(raw: str | None, default: int, name: str, low: int, high: int | None) -> int:
    if raw is None or not raw.strip():
        return default
    try:
        value = int(raw)
    except ValueError:
        value = low - 1
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f">= {low}"
        raise ApiError(f"{name} must be {bound}", status=400, code="bad_query")
    return value


def _row(r: Record) -> dict[str, Any]:
    """One record in llama-swap's activity row shape."""
    return {
        "id": r.id,
        "timestamp": datetime.fromtimestamp(r.time, UTC).isoformat().replace("+00:00", "Z"),
        "model": r.model,
        "req_path": r.path,
        "resp_content_type": "text/event-stream" if r.stream else "application/json",
        "resp_status_code": r.status,
        "tokens": {
            "cache_tokens": r.cached_tokens or 0, "draft_tokens": 0, "draft_acc_tokens": 0,
            "input_tokens": r.prompt_tokens or 0, "output_tokens": r.completion_tokens or 0,
            "prompt_per_second": r.prefill_tps or 0.0, "tokens_per_second": r.decode_tps or 0.0,
        },
        "duration_ms": round(r.duration * 1000),
        "has_capture": r.captured,
    }


HISTOGRAM_BINS = 20


def _histogram(values: list[float | None]) -> dict[str, Any] | None:
    """llama-swap's HistogramData (bins, min, max, binSize, p50/p95/p99); None: no data."""
    data = sorted(v for v in values if v is not None and v > 0)
    if not data:
        return None
    low, high = data[0], data[-1]
    size = (high - low) / HISTOGRAM_BINS or 1.0
    bins = [0] * HISTOGRAM_BINS
    for v in data:
        bins[min(HISTOGRAM_BINS - 1, int((v - low) / size))] += 1

    def pct(p: float) -> float:
        return data[min(len(data) - 1, math.ceil(p * len(data)) - 1)]

    return {"bins": bins, "min": low, "max": high, "binSize": size,
            "p50": pct(0.5), "p95": pct(0.95), "p99": pct(0.99)}

