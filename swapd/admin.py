"""Operations routes (llama-swap's and swapd's own) and recipe management.

Handlers ask the scheduler to act; they never hold an engine themselves.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import structlog
import yaml
from aiohttp import web

from swapd import __version__
from swapd.config import Config, ConfigError, load_model_entry
from swapd.errors import error_response
from swapd.files import write_atomic
from swapd.redact import redact_argv
from swapd.scheduler import Scheduler, SchedulerError

log = structlog.get_logger("swapd.admin")

Reload = Callable[[str], Awaitable[dict[str, list[str]]]]


def status_document(scheduler: Scheduler, config: Config) -> dict[str, Any]:
    """What `GET /status` answers: enough to see what swapd is doing right now."""
    now = time.time()
    models: dict[str, Any] = {}
    for engine in scheduler.engines():
        exit_info = engine.last_exit
        models[engine.id] = {
            "state": str(engine.state),
            "pid": engine.pid if engine.running else None,
            "uptime": round(now - engine.started_at, 3)
            if engine.running and engine.started_at
            else None,
            "inflight": scheduler.inflight(engine.id),
            "queued": scheduler.queued(engine.id),
            "upstream": engine.upstream,
            "gpu": engine.cfg.gpu,
            "ttl": engine.cfg.ttl,
            "last_exit": None
            if exit_info is None
            else {
                "code": exit_info.code,
                "at": exit_info.at,
                "last_lines": list(exit_info.tail[-5:]),
            },
        }
    return {
        "version": __version__,
        "listen": config.listen,
        "tenant": scheduler.tenant(),
        "queue": scheduler.queued(),
        "models": models,
    }


class Admin:
    def __init__(self, scheduler: Scheduler, config: Callable[[], Config], reload: Reload) -> None:
        self._scheduler = scheduler
        self._config = config
        self._reload = reload

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/health", self.health),
            web.get("/running", self.running),
            web.post("/unload", self.unload_all),
            web.get("/unload", self.unload_all),  # llama-swap answers GET too
            web.get("/status", self.status),
            web.post("/models/{id}/load", self.load),
            web.post("/models/{id}/unload", self.unload_one),
            web.get("/admin/recipes/{id}", self.get_recipe),
            web.put("/admin/recipes/{id}", self.put_recipe),
            web.delete("/admin/recipes/{id}", self.delete_recipe),
        ]

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(text="OK")

    async def running(self, request: web.Request) -> web.Response:
        out = []
        for engine in self._scheduler.engines():
            if not engine.running:
                continue
            out.append(
                {
                    "model": engine.id,
                    "state": str(engine.state),
                    "cmd": " ".join(redact_argv(engine.cfg.cmd)),
                    "proxy": engine.upstream,
                    "ttl": engine.cfg.ttl,
                    "name": engine.cfg.name or "",
                    "description": engine.cfg.description or "",
                    "pid": engine.pid,
                }
            )
        return web.json_response({"running": out})

    async def status(self, request: web.Request) -> web.Response:
        return web.json_response(status_document(self._scheduler, self._config()))

    async def unload_all(self, request: web.Request) -> web.Response:
        stopped = await self._scheduler.unload(None)
        return web.json_response({"unloaded": stopped, "msg": "OK"})

    async def unload_one(self, request: web.Request) -> web.Response:
        model = self._model(request)
        if isinstance(model, web.Response):
            return model
        stopped = await self._scheduler.unload(model)
        return web.json_response({"unloaded": stopped})

    async def load(self, request: web.Request) -> web.Response:
        model = self._model(request)
        if isinstance(model, web.Response):
            return model
        t0 = time.monotonic()
        try:
            engine = await self._scheduler.load(model)
        except SchedulerError as exc:
            return error_response(
                exc.status, exc.message, code=exc.code, type=exc.type, retry_after=exc.retry_after
            )
        return web.json_response(
            {
                "model": model,
                "state": str(engine.state),
                "upstream": engine.upstream,
                "seconds": round(time.monotonic() - t0, 3),
            }
        )

    def _model(self, request: web.Request) -> str | web.Response:
        name = request.match_info["id"]
        model = self._config().resolve(name)
        if model is None:
            return error_response(404, f"model {name!r} is not configured", code="model_not_found")
        return model.id

    # -- recipes ---------------------------------------------------------------------

    def _recipe_dir(self) -> Path | None:
        config = self._config()
        if not config.include:
            return None
        pattern = Path(config.include)
        if not pattern.is_absolute() and config.source:
            pattern = Path(config.source).parent / pattern
        return pattern.parent

    def _recipe_path(self, recipe_id: str) -> Path | web.Response:
        folder = self._recipe_dir()
        if folder is None:
            return error_response(
                409,
                "recipes need an `include` glob in the config (e.g. include: recipes/*.yaml)",
                code="no_include",
            )
        if "/" in recipe_id or recipe_id.startswith(".") or not recipe_id:
            return error_response(400, f"invalid recipe id {recipe_id!r}", code="invalid_id")
        return folder / f"{recipe_id}.yaml"

    async def get_recipe(self, request: web.Request) -> web.Response:
        recipe_id = request.match_info["id"]
        path = self._recipe_path(recipe_id)
        if isinstance(path, web.Response):
            return path
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return error_response(404, f"no recipe {recipe_id!r}", code="recipe_not_found")
        data = yaml.safe_load(text) or {}
        entry = (data.get("models") or {}).get(recipe_id, {})
        if "json" in request.headers.get("Accept", ""):
            return web.json_response(entry)
        return web.Response(
            text=yaml.safe_dump(entry, sort_keys=False), content_type="application/yaml"
        )

    async def put_recipe(self, request: web.Request) -> web.Response:
        recipe_id = request.match_info["id"]
        path = self._recipe_path(recipe_id)
        if isinstance(path, web.Response):
            return path
        raw = await request.read()
        try:
            if request.content_type == "application/json":
                entry = json.loads(raw)
            else:
                entry = yaml.safe_load(raw)
        except (ValueError, yaml.YAMLError) as exc:
            return error_response(400, f"recipe body does not parse: {exc}", code="bad_recipe")
        try:
            load_model_entry(recipe_id, entry, self._config())
        except ConfigError as exc:
            return error_response(400, str(exc), code="invalid_recipe")
        text = yaml.safe_dump({"models": {recipe_id: entry}}, sort_keys=False)
        try:
            previous = path.read_bytes() if path.exists() else None
            write_atomic(path, text.encode())
        except OSError as exc:
            log.error("recipe write failed", recipe=recipe_id, error=str(exc))
            return error_response(
                507 if exc.errno == 28 else 500,
                f"could not write recipe {recipe_id!r}: {exc.strerror or exc}",
                code="recipe_write_failed",
            )
        try:
            changes = await self._reload(f"recipe {recipe_id} written")
        except ConfigError as exc:
            self._restore(path, previous)
            return error_response(400, str(exc), code="invalid_recipe")
        log.info("recipe written", recipe=recipe_id, path=str(path))
        return web.json_response(
            {"id": recipe_id, "path": str(path), "changes": changes},
            status=201 if previous is None else 200,
        )

    async def delete_recipe(self, request: web.Request) -> web.Response:
        recipe_id = request.match_info["id"]
        path = self._recipe_path(recipe_id)
        if isinstance(path, web.Response):
            return path
        if not path.exists():
            return error_response(404, f"no recipe {recipe_id!r}", code="recipe_not_found")
        try:
            previous = path.read_bytes()
            path.unlink()
        except OSError as exc:
            return error_response(
                500, f"could not delete recipe: {exc}", code="recipe_write_failed"
            )
        try:
            changes = await self._reload(f"recipe {recipe_id} deleted")
        except ConfigError as exc:
            self._restore(path, previous)
            return error_response(400, str(exc), code="invalid_recipe")
        return web.json_response({"id": recipe_id, "deleted": True, "changes": changes})

    @staticmethod
    def _restore(path: Path, previous: bytes | None) -> None:
        with contextlib.suppress(OSError):
            if previous is None:
                path.unlink()
            else:
                write_atomic(path, previous)
