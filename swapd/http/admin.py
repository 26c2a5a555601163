"""Operations routes (llama-swap's and swapd's own) and recipe management.

Handlers ask the scheduler to act; they never hold an engine themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import structlog
import yaml
from aiohttp import web

from swapd import __version__
from swapd.cluster.holds import HoldView
from swapd.config.loader import load_model_entry
from swapd.config.nodes import ConfigError
from swapd.config.recipes import (
    MAX_RECIPE_BYTES,
    body_kind,
    existing,
    parse_body,
    read_entry,
    recipe_path,
    render,
)
from swapd.config.types import Config, RouterKind
from swapd.errors import ApiError
from swapd.files import write_atomic
from swapd.http.appstate import config_of
from swapd.http.bodies import parse_json, read_body
from swapd.http.cluster import hold_document
from swapd.http.modelnames import Profiles
from swapd.memory.watch import MemoryWatch
from swapd.redact import clean_line, redact_argv, redact_text
from swapd.schedule.runner import EngineView, Scheduler

log = structlog.get_logger("swapd.admin")

Reload = Callable[[str], Awaitable[dict[str, list[str]]]]


def failure_document(view: EngineView, now: float) -> dict[str, Any] | None:
    """Why a model is in backoff or failed, how often, and when it is tried again."""
    if not view.failures:
        return None
    return {
        "reason": None if view.last_error is None else clean_line(view.last_error),
        "count": view.failures,
        "retry_at": view.next_retry_at,
        "retry_in": None
        if view.next_retry_at is None
        else round(max(0.0, view.next_retry_at - now), 3),
    }


Details = Callable[[str], dict[str, Any]]


def memory_document(memory: MemoryWatch, config: Config) -> dict[str, Any]:
    """The `memory` part of /status: MemAvailable, the router, the guard and its last events."""
    info = memory.guard.latest()
    guard = config.memory_guard
    return {
        "available": info.available if info else None,
        "total": info.total if info else None,
        "router": str(config.router),
        "reserve": config.memory_reserve if config.router == RouterKind.MEMORY else None,
        "guard": {
            "enabled": guard.enabled,
            "floor": str(guard.floor),
            "floor_bytes": guard.floor.resolve(info.total) if info else None,
            "events": [
                {"at": e.at, "model": e.model, "available": e.available, "floor": e.floor,
                 "why": e.why, "message": e.message()}
                for e in memory.guard.events()
            ],
        },
    }


def status_document(scheduler: Scheduler, config: Config,
                    profiles: Profiles | None = None,
                    details: Details | None = None,
                    memory: MemoryWatch | None = None) -> dict[str, Any]:
    """What `GET /status` answers: enough to see what swapd is doing right now."""
    now = time.time()
    models: dict[str, Any] = {}
    holds = {h.worker: h for h in scheduler.holds()}
    for view in scheduler.views():
        exit_info = view.last_exit
        models[view.id] = {
            "memory": {
                "used": memory.used(view.id) if memory is not None else None,
                "peak": memory.peak(view.id) if memory is not None else None,
                "footprint": memory.footprint(view.cfg) if memory else view.cfg.memory,
                "footprint_source": memory.footprint_source(view.cfg) if memory else None,
            },
            "state": view.state,
            "phase": str(view.phase),
            "pid": view.pid,
            "uptime": round(now - view.started_at, 3) if view.started_at else None,
            "inflight": view.inflight,
            "queued": view.queued,
            "upstream": redact_text(view.upstream),
            "gpu": view.cfg.gpu,
            "ttl": view.cfg.ttl,
            "last_exit": None
            if exit_info is None
            else {
                # reason: why it ended (swap, idle, unload, reload, shutdown, guard: swapd
                # stopped it; crash, start_failed: it ended by itself); signal: by name.
                "reason": exit_info.reason,
                "code": exit_info.code,
                "signal": exit_info.signal,
                "at": exit_info.at,
                "last_lines": [clean_line(line) for line in exit_info.tail[-5:]],
            },
            "failure": failure_document(view, now),
            # Warm swaps (docs/sleep.md): configured, and why it is off (None: on).
            "sleep": None if view.cfg.sleep is None else {
                "off": None if view.sleep_off is None else clean_line(view.sleep_off),
            },
        }
        if (cluster := cluster_document(scheduler, view, holds)) is not None:
            models[view.id]["cluster"] = cluster
        if details is not None:
            models[view.id].update(details(view.id))
    doc: dict[str, Any] = {
        "version": __version__,
        "listen": config.listen,
        "tenant": scheduler.live_gpu_engines(),
        "queue": scheduler.queued(),
        "models": models,
        # The holds heads on other nodes have on this node's workers (docs/two-sparks.md).
        "cluster_holds": [hold_document(h) for h in holds.values()],
        # llama-swap's profiles: the active one (null: none) and those defined.
        "profile": {
            "active": profiles.active if profiles else None,
            "available": list(config.profiles),
        },
    }
    if memory is not None:
        doc["memory"] = memory_document(memory, config)
    return doc


def cluster_document(scheduler: Scheduler, view: EngineView,
                     holds: Mapping[str, HoldView]) -> dict[str, Any] | None:
    """A cluster head: its nodes and each worker's hold; a worker: its hold and holder."""
    cfg = view.cfg
    if cfg.cluster is not None:
        return {"role": "head", "hold_ttl": cfg.cluster.hold_ttl,
                "nodes": scheduler.cluster_nodes(view.id) or []}
    if cfg.cluster_worker:
        hold = holds.get(view.id)
        return {"role": "worker", "hold": None if hold is None else hold_document(hold)}
    return None


class Admin:
    """The config comes from the app (swapd.appstate); `reload` and `profiles` (the
    active one) are the daemon's."""

    def __init__(self, scheduler: Scheduler, reload: Reload,
                 profiles: Profiles | None = None, *, details: Details | None = None,
                 memory: MemoryWatch | None = None) -> None:
        self._scheduler = scheduler
        self._reload = reload
        self._memory = memory
        # One recipe write at a time: check, write and reload must not interleave.
        self._recipe_lock = asyncio.Lock()
        self._profiles = profiles or Profiles()
        self._details = details

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/health", self.health),
            web.get("/running", self.running),
            web.post("/unload", self.unload_all),
            web.get("/unload", self.unload_all),  # llama-swap answers GET too
            web.get("/status", self.status),
            # `{id:.+}`: a model id may hold '/' (Qwen/Qwen3-8B), written unencoded, as
            # swapd's own messages print it.
            web.post("/models/{id:.+}/load", self.load),
            web.post("/models/{id:.+}/unload", self.unload_one),
            web.post("/models/{id:.+}/sleep", self.sleep_one),
            web.get("/admin/recipes/{id:.+}", self.get_recipe),
            web.put("/admin/recipes/{id:.+}", self.put_recipe),
            web.delete("/admin/recipes/{id:.+}", self.delete_recipe),
            # llama-swap's profile API (its UI and scripts use these paths)
            web.get("/api/profiles", self.get_profiles),
            web.put("/api/profiles/active", self.put_active_profile),
            web.post("/api/profiles/active", self.put_active_profile),
        ]

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(text="OK")

    async def running(self, request: web.Request) -> web.Response:
        out = []
        holds = {h.worker: h for h in self._scheduler.holds()}
        for view in self._scheduler.views():
            if not view.alive:
                continue
            out.append(
                {
                    "model": view.id,
                    "state": view.state,
                    "cmd": " ".join(redact_argv(view.cfg.cmd)),
                    "proxy": redact_text(view.upstream),
                    "ttl": round(view.cfg.ttl),  # llama-swap's is an integer
                    "name": view.cfg.name or "",
                    "description": view.cfg.description or "",
                    "pid": view.pid,
                }
            )
            if (cluster := cluster_document(self._scheduler, view, holds)) is not None:
                out[-1]["cluster"] = cluster
        return web.json_response({"running": out})

    async def status(self, request: web.Request) -> web.Response:
        return web.json_response(
            status_document(self._scheduler, config_of(request), self._profiles,
                            self._details, self._memory))

    # -- profiles --------------------------------------------------------------------

    async def get_profiles(self, request: web.Request) -> web.Response:
        config = config_of(request)
        return web.json_response({
            "active": self._profiles.active,
            "profiles": [
                {"id": p.id, "description": p.description or "",
                 "pins": {pin: target or "" for pin, target in p.pins}}
                for p in config.profiles.values()
            ],
        })

    async def put_active_profile(self, request: web.Request) -> web.StreamResponse:
        """`{"name": "coding"}` selects a profile, `{"name": null}` (or "") none."""
        raw = await read_body(request, 64 * 1024, config_of(request).body_timeout)
        body = parse_json(raw, "request body") if raw else None
        if not isinstance(body, dict) or "name" not in body:
            raise ApiError('expected a JSON object {"name": profile or null}', status=400,
                           code="bad_request")
        name = body["name"]
        if name is not None and not isinstance(name, str):
            raise ApiError("profile name must be a string or null", status=400,
                           code="bad_request")
        try:
            self._profiles.select(config_of(request), name or None)
        except KeyError:
            raise ApiError(f"profile {name!r} is not defined", status=404,
                           code="profile_not_found") from None
        log.info("active profile changed", profile=self._profiles.active)
        return web.json_response({"active": self._profiles.active})

    async def unload_all(self, request: web.Request) -> web.Response:
        """llama-swap answers `OK` as text; a client that asks for JSON gets what stopped."""
        stopped = await self._scheduler.unload(None)
        if wants_json(request):
            return web.json_response({"unloaded": stopped, "msg": "OK"})
        return web.Response(text="OK")

    async def unload_one(self, request: web.Request) -> web.Response:
        model = self._model(request)
        stopped = await self._scheduler.unload(model)
        return web.json_response({"unloaded": stopped})

    async def sleep_one(self, request: web.Request) -> web.Response:
        """Put a ready model to sleep by hand (its recipe must enable sleep)."""
        model = self._model(request)
        t0 = time.monotonic()
        view = await self._scheduler.sleep(model)
        return web.json_response({
            "model": model,
            "state": view.state,
            "sleep_off": None if view.sleep_off is None else clean_line(view.sleep_off),
            "seconds": round(time.monotonic() - t0, 3),
        })

    async def load(self, request: web.Request) -> web.Response:
        model = self._model(request)
        t0 = time.monotonic()
        # An operator's explicit load also clears a failed model's backoff.
        view = await self._scheduler.load(model, clear_failure=True)
        return web.json_response(
            {
                "model": model,
                "state": view.state,
                # A proxy URL may carry the engine's credentials (http://user:pass@…).
                "upstream": redact_text(view.upstream),
                "seconds": round(time.monotonic() - t0, 3),
            }
        )

    def _model(self, request: web.Request) -> str:
        name = request.match_info["id"]
        model = config_of(request).resolve(name)
        if model is None:
            raise ApiError(f"model {name!r} is not configured", status=404, code="model_not_found")
        return model.id

    # -- recipes ---------------------------------------------------------------------

    def _recipe(self, request: web.Request) -> tuple[str, Path]:
        recipe_id = request.match_info["id"]
        return recipe_id, recipe_path(config_of(request), recipe_id)

    async def get_recipe(self, request: web.Request) -> web.Response:
        recipe_id, path = self._recipe(request)
        try:
            entry = await asyncio.to_thread(read_entry, path, recipe_id)
        except FileNotFoundError:
            entry = None
        except (OSError, UnicodeDecodeError) as exc:
            raise ApiError(
                f"recipe file {path.name} cannot be read: {exc}",
                status=500,
                code="bad_recipe_file",
            ) from None
        except (yaml.YAMLError, RecursionError) as exc:
            raise ApiError(
                f"recipe file {path.name} does not parse: {exc}",
                status=422,
                code="bad_recipe_file",
            ) from None
        if entry is None:
            raise ApiError(f"no recipe {recipe_id!r}", status=404, code="recipe_not_found")
        if "json" in request.headers.get("Accept", ""):
            return web.json_response(entry)
        def dump() -> str:
            return str(yaml.safe_dump(entry, sort_keys=False))

        return web.Response(text=await asyncio.to_thread(dump), content_type="application/yaml")

    async def put_recipe(self, request: web.Request) -> web.StreamResponse:
        config = config_of(request)
        recipe_id, path = self._recipe(request)
        kind = body_kind(request.headers.get("Content-Type", ""))
        raw = await read_body(request, MAX_RECIPE_BYTES, config.body_timeout)

        def check() -> bytes:
            # Off the event loop: /health and requests in flight keep their pace meanwhile
            # (dumping a 1 MiB recipe as YAML alone takes PyYAML half a second).
            entry = parse_body(raw, kind)
            load_model_entry(recipe_id, entry, config)
            return render(recipe_id, entry)

        try:
            text = await asyncio.to_thread(check)
        except ConfigError as exc:
            raise _invalid(exc) from None
        async with self._recipe_lock:
            try:
                previous = await asyncio.to_thread(existing, path)
                await asyncio.to_thread(write_atomic, path, text)
            except OSError as exc:
                log.error("recipe write failed", recipe=recipe_id, error=str(exc))
                raise ApiError(
                    f"could not write recipe {recipe_id!r}: {exc.strerror or exc}",
                    status=507 if exc.errno == 28 else 500,
                    code="recipe_write_failed",
                ) from None
            changes = await self._reload_or_restore(path, previous, f"recipe {recipe_id} written")
            if recipe_id not in config_of(request).models:
                # The glob did not load it after all: take the file back rather than leave
                # a recipe that looks written and never runs.
                self._restore(path, previous)
                with contextlib.suppress(ConfigError):
                    await self._reload(f"recipe {recipe_id} taken back")
                raise ApiError(
                    f"{path} was written but the include glob {config.include!r} did not "
                    "load it; nothing was changed",
                    status=409,
                    code="id_not_included",
                )
        log.info("recipe written", recipe=recipe_id, path=str(path))
        return web.json_response(
            {"id": recipe_id, "path": str(path), "changes": changes},
            status=201 if previous is None else 200,
        )

    async def delete_recipe(self, request: web.Request) -> web.Response:
        async with self._recipe_lock:
            recipe_id, path = self._recipe(request)
            try:
                previous = await asyncio.to_thread(existing, path)
            except OSError as exc:
                raise ApiError(
                    f"could not read recipe: {exc.strerror or exc}",
                    status=500,
                    code="recipe_write_failed",
                ) from None
            if previous is None:
                raise ApiError(f"no recipe {recipe_id!r}", status=404, code="recipe_not_found")
            try:
                path.unlink()
            except OSError as exc:
                raise ApiError(
                    f"could not delete recipe: {exc.strerror or exc}",
                    status=500,
                    code="recipe_write_failed",
                ) from None
            changes = await self._reload_or_restore(path, previous, f"recipe {recipe_id} deleted")
        return web.json_response({"id": recipe_id, "deleted": True, "changes": changes})

    async def _reload_or_restore(
        self, path: Path, previous: bytes | None, why: str
    ) -> dict[str, list[str]]:
        """Apply a recipe change; a config the change made invalid puts the file back as it
        was and answers 400, so a bad recipe never outlives its request."""
        try:
            return await self._reload(why)
        except ConfigError as exc:
            self._restore(path, previous)
            raise _invalid(exc) from None

    @staticmethod
    def _restore(path: Path, previous: bytes | None) -> None:
        with contextlib.suppress(OSError):
            if previous is None:
                path.unlink()
            else:
                write_atomic(path, previous)


def wants_json(request: web.Request) -> bool:
    """The client's Accept names JSON (`application/json`, `*/json`, `+json`)."""
    return "json" in request.headers.get("Accept", "").lower()


def _invalid(exc: ConfigError) -> ApiError:
    return ApiError(str(exc), status=400, code="invalid_recipe")
