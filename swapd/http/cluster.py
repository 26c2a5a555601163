"""The hold routes a head on another node calls (docs/two-sparks.md): an admin route.

    POST   /api/cluster/holds        {"worker", "holder", "ttl"}  hold a worker (waits for it)
    PUT    /api/cluster/holds/{id}   {"ttl"}                      renew
    DELETE /api/cluster/holds/{id}                                release (the worker stops)
    GET    /api/cluster/holds                                     this node's holds

The gate (swapd.http.gate) lets only an admin key (or, with no key set, a loopback client
whose Host and Origin are ours) through, never an inference key: a hold starts a process.
What a hold can make this node do is bounded here: it names a worker recipe of *this*
node's config (`clusterWorker: true`), never a command; its ttl is between 1 s and 10
minutes; its holder is a short printable label; one worker is held by one head at a time.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from swapd.cluster.holds import HoldView
from swapd.config.cluster import MAX_HOLD_TTL, MIN_HOLD_TTL
from swapd.config.nodes import valid_id
from swapd.errors import ApiError
from swapd.http.appstate import config_of
from swapd.http.bodies import parse_json, read_body
from swapd.schedule.runner import Scheduler

HOLDS = "/api/cluster/holds"
MAX_HOLD_BODY = 4096
MAX_HOLDER = 160


def hold_document(view: HoldView, worker_state: str | None = None) -> dict[str, Any]:
    doc: dict[str, Any] = {"id": view.id, "worker": view.worker, "holder": view.holder,
                           "ttl": view.ttl, "state": str(view.state),
                           "expires_in": view.expires_in}
    if worker_state is not None:
        doc["worker_state"] = worker_state  # the worker's engine here: what the head shows
    return doc


class ClusterRoutes:
    def __init__(self, scheduler: Scheduler) -> None:
        self._scheduler = scheduler

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get(HOLDS, self.list_holds),
            web.post(HOLDS, self.take),
            web.put(HOLDS + "/{id}", self.renew),
            web.delete(HOLDS + "/{id}", self.release),
        ]

    async def list_holds(self, request: web.Request) -> web.Response:
        return web.json_response({"holds": [self._document(v) for v in self._scheduler.holds()]})

    def _document(self, view: HoldView) -> dict[str, Any]:
        engine = self._scheduler.view(view.worker)
        return hold_document(view, None if engine is None else engine.state)

    async def take(self, request: web.Request) -> web.Response:
        body = await _body(request)
        worker = body.get("worker")
        if not isinstance(worker, str) or not valid_id(worker):
            raise _bad("worker: must be the id of a worker recipe of this node")
        holder = body.get("holder")
        if not isinstance(holder, str) or not 0 < len(holder) <= MAX_HOLDER or not all(
                c.isprintable() for c in holder):
            raise _bad(f"holder: must be a printable label of at most {MAX_HOLDER} characters")
        ttl = _ttl(body.get("ttl"))
        model = config_of(request).models.get(worker)
        if model is None:
            raise ApiError(f"model {worker!r} is not configured on this node", status=404,
                           code="model_not_found")
        view = await self._scheduler.hold(worker, holder, ttl)
        return web.json_response({"hold": self._document(view)})

    async def renew(self, request: web.Request) -> web.Response:
        body = await _body(request, empty_ok=True)
        ttl = None if body.get("ttl") is None else _ttl(body.get("ttl"))
        view = self._scheduler.renew_hold(_hold_id(request), ttl)
        return web.json_response({"hold": self._document(view)})

    async def release(self, request: web.Request) -> web.Response:
        hold_id = _hold_id(request)
        await self._scheduler.release_hold(hold_id)
        return web.json_response({"released": hold_id})


async def _body(request: web.Request, empty_ok: bool = False) -> dict[str, Any]:
    raw = await read_body(request, MAX_HOLD_BODY, config_of(request).body_timeout)
    if not raw and empty_ok:
        return {}
    data = parse_json(raw, "the hold")
    if not isinstance(data, dict):
        raise _bad("the hold must be a JSON object")
    return data


def _ttl(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not (
            MIN_HOLD_TTL <= value <= MAX_HOLD_TTL):
        raise _bad(f"ttl: must be seconds between {MIN_HOLD_TTL:g} and {MAX_HOLD_TTL:g}")
    return float(value)


def _hold_id(request: web.Request) -> str:
    hold_id = request.match_info["id"]
    if not 0 < len(hold_id) <= 64 or not all(c.isalnum() or c in "-_" for c in hold_id):
        raise ApiError("no such hold", status=404, code="hold_not_found")
    return hold_id


def _bad(message: str) -> ApiError:
    return ApiError(message, status=400, code="invalid_hold")
