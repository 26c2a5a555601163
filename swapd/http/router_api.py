"""llama.cpp's router API (`llama-server --models-dir`), so its tools work against swapd
unchanged (issue 22): `GET /models`, `POST /models/load`, `POST /models/unload`,
`GET /models/sse`, `GET /props[?model=]`.

`GET /models` is also llama-swap's (the same listing as its `/v1/models`): it answers
swapd's `/v1/models` listing, whose llama-swap fields are kept, with each local model's
`status` in llama.cpp's words (`unloaded`, `loading`, `loaded`; `failed` and `exit_code`
after a failure; `args`, the command line with secrets masked) and llama.cpp's
`aliases`, `tags`, `architecture`, `source` and `can_remove`. A llama-swap client reads
`status.value` as `loaded` or `unloaded` and finds both; a loading model is `loading`
here, as llama.cpp says it. Not sent: `status.preset` (llama.cpp's INI of a preset: a
recipe is its command line, `args`) and, once loaded, the engine's own `/v1/models`
fields (`meta`) that llama.cpp merges in.

Answers and errors follow llama.cpp's (`{"success": true}`; 400 for a model that is
already running or not running, 404 for an unknown one on load). `/models/load` and
`/models/unload` sit under `/models/`, so behind the operations gate; `/models` and
`/props` are read like `/v1/models` and inference.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web

from swapd import __version__
from swapd.config.types import Config, ModelConfig
from swapd.engines.starts import StartTimes
from swapd.errors import ApiError
from swapd.http import listing
from swapd.http.appstate import config_of
from swapd.http.bodies import parse_json, read_body
from swapd.http.keys import KEY
from swapd.http.modelnames import Profiles
from swapd.http.proxy import Proxy
from swapd.observe.events import StateEvents
from swapd.redact import redact_argv
from swapd.schedule.runner import EngineView, Scheduler

# Seconds between SSE comments on an idle /models/sse stream.
KEEPALIVE_SECONDS = 15.0
# The largest `{"model": id}` body read.
MAX_BODY = 64 * 1024


def llamacpp_status(view: EngineView | None, cfg: ModelConfig) -> dict[str, Any]:
    """A model's `status` object as llama.cpp's router writes it."""
    state = view.state if view is not None else "stopped"
    value = {"starting": "loading", "ready": "loaded", "stopping": "loaded"}.get(state,
                                                                                 "unloaded")
    status: dict[str, Any] = {"value": value, "args": redact_argv(cfg.cmd)}
    if view is not None and value == "unloaded" and view.failures:
        code = view.last_exit.code if view.last_exit is not None else None
        status["exit_code"] = code if code is not None else 1
        status["failed"] = True
    return status


def router_api_routes(proxy: Proxy, scheduler: Scheduler, events: StateEvents,
                      starts: StartTimes, profiles: Profiles) -> list[web.RouteDef]:
    api = RouterApi(proxy, scheduler, events, starts, profiles)
    return [
        web.get("/models", api.models),
        web.post("/models/load", api.load),
        web.post("/models/unload", api.unload),
        web.get("/models/sse", api.sse),
        web.get("/props", api.props),
    ]


class RouterApi:
    def __init__(self, proxy: Proxy, scheduler: Scheduler, events: StateEvents,
                 starts: StartTimes, profiles: Profiles) -> None:
        self._proxy = proxy
        self._scheduler = scheduler
        self._events = events
        self._starts = starts
        self._profiles = profiles
        # Loads answered at once and carried on here (llama.cpp's load does not wait).
        self._loads: set[asyncio.Task[None]] = set()

    async def models(self, request: web.Request) -> web.Response:
        config = config_of(request)
        data = listing.models(config, self._scheduler.view, self._starts,
                              self._profiles.active, request.get(KEY))
        for entry in data:
            model = config.models.get(entry["id"])
            if model is None:
                continue  # an alias row, a peer's model, a selector: swapd's fields only
            entry["status"] = llamacpp_status(self._scheduler.view(model.id), model)
            entry["aliases"] = list(model.aliases)
            entry["tags"] = []
            # llama.cpp's router falls back to text in, text out where it cannot tell;
            # `capabilities` in the recipe say more (llama-swap's rendering, kept).
            entry.setdefault("architecture", {"input_modalities": ["text"],
                                              "output_modalities": ["text"]})
            entry["source"] = "preset"  # a recipe: what llama.cpp calls a preset
            entry["can_remove"] = False  # nothing in a download cache to delete
        return web.json_response({"object": "list", "data": data})

    async def _requested(self, request: web.Request, config: Config, *,
                         unknown_status: int) -> ModelConfig:
        raw = await read_body(request, MAX_BODY, config.body_timeout)
        body = parse_json(raw, "request body") if raw else None
        name = body.get("model") if isinstance(body, dict) else None
        if not isinstance(name, str) or not name:
            raise ApiError('expected a JSON object {"model": id}', status=400,
                           code="missing_model", type="invalid_request_error")
        model = config.resolve(name)
        if model is None:
            raise ApiError(f"model {name[:200]!r} is not found", status=unknown_status,
                           code="model_not_found",
                           type="not_found_error" if unknown_status == 404
                           else "invalid_request_error")
        return model

    async def load(self, request: web.Request) -> web.Response:
        """Start a model and answer at once (`/models/sse` and `GET /models` tell when it
        is loaded); an explicit load clears a failed model's backoff, as swapd's own
        `POST /models/{id}/load` does."""
        model = await self._requested(request, config_of(request), unknown_status=404)
        view = self._scheduler.view(model.id)
        if view is not None and view.running:
            raise ApiError("model is already running", status=400, code="already_running",
                           type="invalid_request_error")
        task = asyncio.create_task(self._load(model.id), name=f"router-load-{model.id}")
        self._loads.add(task)
        task.add_done_callback(self._loads.discard)
        return web.json_response({"success": True})

    async def _load(self, model: str) -> None:
        # A failure is the scheduler's to log and /models' to show (failed, exit_code).
        try:
            await self._scheduler.load(model, clear_failure=True)
        except ApiError:
            pass

    async def unload(self, request: web.Request) -> web.Response:
        """Stop a running model (after its requests in flight) and answer once it is."""
        model = await self._requested(request, config_of(request), unknown_status=400)
        view = self._scheduler.view(model.id)
        if view is None or not view.running:
            raise ApiError("model is not running", status=400, code="not_running",
                           type="invalid_request_error")
        await self._scheduler.unload(model.id)
        return web.json_response({"success": True})

    async def sse(self, request: web.Request) -> web.StreamResponse:
        """State changes as llama.cpp's router sends them: `model_status` when a load
        begins, `status_change` when it is loaded or unloaded (with the exit code)."""
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})
        async with self._events.listen() as queue:
            await resp.prepare(request)
            try:
                while True:
                    try:
                        async with asyncio.timeout(KEEPALIVE_SECONDS):
                            event = await queue.get()
                    except TimeoutError:
                        await resp.write(b": keep-alive\n\n")
                        continue
                    if event is None:
                        break
                    data = self._event(event.model, event.state)
                    if data is not None:
                        await resp.write(b"data: " + json.dumps(data).encode() + b"\n\n")
            except ConnectionError:
                pass
        return resp

    def _event(self, model: str, state: str) -> dict[str, Any] | None:
        if state == "starting":
            return {"model": model, "event": "model_status", "data": {"status": "loading"}}
        if state == "ready":
            return {"model": model, "event": "status_change", "data": {"status": "loaded"}}
        if state in ("stopped", "failed"):
            view = self._scheduler.view(model)
            code = view.last_exit.code if view is not None and view.last_exit else None
            return {"model": model, "event": "status_change",
                    "data": {"status": "unloaded", "exit_code": code or 0}}
        return None  # draining, stopping: still loaded until the engine is gone

    async def props(self, request: web.Request) -> web.StreamResponse:
        """With `?model=`, that model's engine answers (started if needed, unless
        `?autoload=false`); without, the router's own props as llama.cpp writes them."""
        if request.query.get("model"):
            return await self._proxy.handle_by_query(request)
        return web.json_response({
            "role": "router",
            "max_instances": 0,  # placement decides (groups, matrix or memory), not a count
            "models_autoload": True,
            "model_alias": "llama-server",
            "model_path": "none",
            "default_generation_settings": {"params": None, "n_ctx": 0},
            "ui_settings": {},
            "build_info": f"swapd {__version__}",
            "cors_proxy_enabled": False,
        })
