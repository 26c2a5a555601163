"""The gate every request passes before its handler: `Host`, `Origin`, keys (docs/security.md).

One middleware, `Gate.middleware`: a `Host` that is not ours (DNS rebinding) gets 421, a
page of another origin on a route that changes state 403, a request without the key its
route needs 401/403; every error raised on the way or by the handler becomes the one error
response (swapd.errors). The rules on headers are pure functions in swapd.http.origins; this
module applies them to routes and keys.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from swapd.config.types import Config, KeyConfig, KeyRole
from swapd.errors import ApiError, answer
from swapd.http import llamaswap_routes, origins
from swapd.http.appstate import LiveConfig
from swapd.http.keys import KEY, identify, locks, may, presented_key
from swapd.http.proxy import INFERENCE_POST_PATHS
from swapd.observe.metrics import Metrics

OPEN_PATHS = ("/health", "/metrics", *llamaswap_routes.OPEN_PATHS)
# The page itself holds no data (everything it shows comes from the routes below), and a
# browser cannot put a key on a navigation: it is open like /health.
OPEN_PREFIXES = ("/ui/",)
# /api/: profiles, and the page's activity, captures and GPU sample.
ADMIN_PREFIXES = ("/running", "/unload", "/logs", "/status", "/models/", "/admin/", "/api/")
# Of those, recipes (files written, commands to run) and cluster holds (a process started
# for a head on another node): an admin key or loopback, never an API key nor an operator
# key.
RECIPE_PREFIX = ("/admin/", "/api/cluster/")
# What a client of another machine is told when no key of any kind is set; the status page
# shows it as its one line.
OPERATIONS_LOOPBACK_ONLY = (
    "no key is set, so this swapd answers /status, /running, /logs, /unload and /api/ only on "
    "its own machine: set adminKeys (or apiKeys) in its config to use them from here, with "
    "that key"
)
# Where browsers of other origins are served (CORS): the inference API, nothing else.
CORS_PATHS = frozenset({*INFERENCE_POST_PATHS, "/v1/models", *llamaswap_routes.POST_PATHS,
                        *llamaswap_routes.GET_PATHS, "/models", "/props"})

# What HTML relayed from /upstream is sent with: scripts run, but in an opaque origin.
UPSTREAM_HTML_CSP = "sandbox allow-scripts allow-forms allow-popups allow-downloads"
# What a browser renders as a page that may run scripts.
DOCUMENT_TYPES = frozenset({"text/html", "application/xhtml+xml", "image/svg+xml", "text/xml",
                            "application/xml"})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def is_loopback(request: web.Request) -> bool:
    peer = request.remote
    if not peer:
        return False
    try:
        address = ipaddress.ip_address(peer.split("%")[0])
    except ValueError:
        return peer == "localhost"
    # A dual-stack listener sees an IPv4 client as ::ffff:127.0.0.1.
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


class Gate:
    """The middleware and the CORS headers of the app; reads the config in force."""

    def __init__(self, live: LiveConfig, metrics: Metrics) -> None:
        self._live = live
        self._metrics = metrics
        # This machine's names: a Host naming them is no rebinding (origins.py).
        self._own_names = origins.own_names()
        self._host_ok: dict[str, bool] = {}
        self._locked: tuple[Config | None, tuple[bool, bool]] = (None, (False, False))

    def forget_hosts(self) -> None:
        """After a reload: `allowedHosts` may have changed."""
        self._host_ok.clear()

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Host/Origin, keys, then the handler; every error raised on the way becomes the one
        error response (swapd.errors). One middleware, not two: each is a layer of calls on
        every request (docs/benchmarks.md)."""
        try:
            config = self._live.config
            preflight = self._refused(request, config)
            if preflight is not None:
                return preflight
            self._authorize(request, config)
            return await handler(request)
        except Exception as exc:
            return await answer(request, exc)

    def _refused(self, request: web.Request, config: Config) -> web.Response | None:
        """Raise the refusal of a request a browser was tricked into sending
        (docs/security.md): a Host that is not ours (DNS rebinding), a page of another origin
        on a route that changes state. A CORS preflight's answer; None for every other
        request."""
        host = request.headers.get("Host")
        if host is not None:
            ok = self._host_ok.get(host)
            if ok is None:
                ok = origins.host_allowed(host, config.allowed_hosts, self._own_names)
                if len(self._host_ok) > 256:
                    self._host_ok.clear()
                self._host_ok[host] = ok
            if not ok:
                raise ApiError(
                    f"Host {host[:200]!r} is not a name of this server; if it is, add it to "
                    "allowedHosts",
                    status=421,
                    code="host_not_allowed",
                )
        if request.method == "OPTIONS":
            return self._preflight(request, config)
        path = request.path
        if path.startswith(ADMIN_PREFIXES):
            why = origins.foreign_origin(request.headers, host)
            if why is not None:
                raise ApiError(why, status=403, code="cross_origin_forbidden")
        elif path in CORS_PATHS:
            # A page outside cors.allowOrigins cannot read the answer, but its request would
            # still start (swap in) a model: refuse it outright.
            origin = request.headers.get("Origin")
            if (
                origin is not None
                and origins.cors_allow(origin, config.cors_allow_origins) is None
                and not origins.same_origin(origin, host)
            ):
                raise ApiError(
                    f"origin {origin[:200]!r} is not in cors.allowOrigins",
                    status=403,
                    code="cors_forbidden",
                )
        elif path.startswith("/upstream/"):
            # Raw passthrough (an engine's own routes and UI): same origin, or an origin
            # listed by name in cors.allowOrigins ("*" does not open it).
            why = origins.foreign_origin(request.headers, host)
            origin = request.headers.get("Origin")
            if why is not None and not (
                origin is not None
                and origins.cors_allow(origin, [o for o in config.cors_allow_origins if o != "*"])
            ):
                raise ApiError(why, status=403, code="cross_origin_forbidden")
        return None

    def _preflight(self, request: web.Request, config: Config) -> web.Response | None:
        origin = request.headers.get("Origin")
        if request.path in CORS_PATHS:
            if origin is None:
                return web.Response(status=204, headers={"Allow": "GET, POST, OPTIONS"})
            allow = origins.cors_allow(origin, config.cors_allow_origins)
            if allow is None:
                raise ApiError(
                    f"origin {origin[:200]!r} is not in cors.allowOrigins",
                    status=403,
                    code="cors_forbidden",
                )
            return web.Response(
                status=204,
                headers=origins.preflight_headers(
                    allow, request.headers.get("Access-Control-Request-Headers")
                ),
            )
        if origin is not None:
            # No CORS outside the inference API, and a preflight must not start an engine
            # through /upstream.
            raise ApiError(
                f"{request.path} is not open to other origins (CORS)",
                status=403,
                code="cors_forbidden",
            )
        return None

    async def answer_headers(self, request: web.BaseRequest,
                             response: web.StreamResponse) -> None:
        """on_response_prepare: CORS headers on the inference API's answers (errors too, so a
        browser client can read them) for the origins in cors.allowOrigins; a sandbox for
        HTML relayed from an engine."""
        if request.path.startswith("/upstream/") and response.content_type in DOCUMENT_TYPES:
            # An engine's page (llama.cpp's web UI, vLLM's /docs) would run in swapd's origin,
            # next to the status page and its key: its scripts run, in an origin of their own.
            response.headers["Content-Security-Policy"] = UPSTREAM_HTML_CSP
        origin = request.headers.get("Origin")
        if origin is None or request.method == "OPTIONS" or request.path not in CORS_PATHS:
            return
        allow = origins.cors_allow(origin, self._live.config.cors_allow_origins)
        if allow is not None:
            response.headers["Access-Control-Allow-Origin"] = allow
            if allow != "*":
                response.headers.add("Vary", "Origin")

    def _locks(self, config: Config) -> tuple[bool, bool]:
        """keys.locks(config), worked out once per config (not per request: it looks at
        every key)."""
        if self._locked[0] is not config:
            self._locked = (config, locks(config))
        return self._locked[1]

    def _operations(self, request: web.Request, config: Config, key: KeyConfig | None) -> None:
        """Raise the 401/403 for an operations or recipe request without the role it needs.

        Once any key may reach these routes (adminKeys, a named operator or admin key), a
        key of the role is needed: an operator key for operations, an admin key for recipes
        (no key, or an apiKeys entry: 401 as before named keys; a named key of a lower role:
        403). Otherwise loopback clients, and llama-swap's rule: an apiKeys entry opens the
        operations routes (never recipes) from any address."""
        path = request.path
        recipe = path.startswith(RECIPE_PREFIX)
        if self._locks(config)[1]:
            role = KeyRole.ADMIN if recipe else KeyRole.OPERATOR
            if key is None or (not key.named and not may(key, role)):
                raise ApiError("admin key required", status=401, code="invalid_admin_key")
            if not may(key, role):
                raise ApiError(
                    f"key {key.name!r} (role {key.role}) may not use {path[:200]}: it needs "
                    f"role {role} or above",
                    status=403,
                    code="forbidden",
                )
            return
        if is_loopback(request):
            return
        if key is not None and key.named:
            raise ApiError(
                f"key {key.name!r} (role {key.role}) may not use {path[:200]}, and no key of "
                "this config may: they answer loopback clients only",
                status=403,
                code="forbidden",
            )
        if config.api_keys and not recipe:
            # llama-swap's rule: without adminKeys, an API key opens the operations
            # routes (/running, /unload, /logs, /api/...) from any address; never the
            # recipes, which write files and commands to run.
            if key is None:
                raise ApiError("invalid or missing API key (apiKeys)", status=401,
                               code="invalid_api_key")
            return
        if config.api_keys:
            raise ApiError("recipes and cluster holds answer only loopback clients when "
                           "adminKeys is empty",
                           status=403, code="forbidden")
        raise ApiError(OPERATIONS_LOOPBACK_ONLY, status=403, code="operations_loopback_only")

    def _authorize(self, request: web.Request, config: Config) -> None:
        """Raise the 401/403 for a request without the key its route needs; keep the key
        a request came with for the handlers (keys.KEY)."""
        path = request.path
        if path in OPEN_PATHS or path == "/ui" or path.startswith(OPEN_PREFIXES):
            return
        if path == "/" and "text/html" in request.headers.get("Accept", ""):
            return  # a browser, redirected to /ui
        key = identify(config, presented_key(request.headers)) if config.keys else None
        if key is not None and key.expires is not None and time.time() >= key.expires:
            when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(key.expires))
            raise ApiError(f"key {key.name!r} expired on {when}", status=401,
                           code="key_expired")
        if path.startswith(ADMIN_PREFIXES):
            self._operations(request, config, key)
            if key is not None:
                request[KEY] = key
            return
        if key is not None:
            request[KEY] = key
        elif self._locks(config)[0]:
            self._metrics.unrouted(401)  # an API request refused before routing
            raise ApiError("invalid or missing API key", status=401, code="invalid_api_key")
