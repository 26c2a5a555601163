"""Inference routes: find the model, take a lease, relay bytes.

Handlers never touch a process: they get an upstream URL from a scheduler lease.
The response is relayed chunk by chunk as the engine writes it (an SSE token is
on the wire to the client as soon as it left the engine), and the request body is
only parsed to find `model`; it is re-serialised only when a filter changes it.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp
import structlog
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from swapd.config.types import Config, KeyConfig, ModelConfig, PeerConfig, Timeouts
from swapd.engines.starts import StartTimes
from swapd.errors import ApiError, anthropic_error_body, error_body
from swapd.http import listing, modelnames
from swapd.http.appstate import UPSTREAM, config_of
from swapd.http.bodies import parse_json, read_body
from swapd.http.capacity import GlobalLimit
from swapd.http.clients import Clients
from swapd.http.keys import KEY, allows_model, allows_peer, is_swapds_own
from swapd.http.limits import Limit, Limits, Slot
from swapd.http.modelnames import Chosen, Local, Profiles, Remote, Spillover, Unroutable
from swapd.http.rawclient import RawClient, RawResponse
from swapd.observe.activity import ActivityLog, Record, Tracker, session_of
from swapd.observe.capture import Capture, CaptureBuffer
from swapd.observe.metrics import Metrics
from swapd.observe.streams import UNBUFFERED, stream_headers
from swapd.schedule.runner import NotLoaded, Scheduler, StartFailed

log = structlog.get_logger("swapd.proxy")

INFERENCE_POST_PATHS = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
    "/v1/audio/speech",
    "/v1/audio/transcriptions",
    "/v1/images/generations",
    "/v1/images/edits",
    "/v1/messages",
    "/v1/messages/count_tokens",
    "/v1/rerank",
    "/rerank",
    "/v1/reranking",
    "/reranking",
    "/infill",
    "/completion",
)

# Headers that describe one hop, not the message (RFC 9110 §7.6.1), plus the ones
# aiohttp recomputes for the body it sends.
HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection",
        "Keep-Alive",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "Proxy-Connection",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
        "Host",
        "Content-Length",
    )
)


# What reading an engine's response raises when the engine dies mid-response.
# (A client that goes away surfaces as cancellation or ConnectionResetError instead.)
UPSTREAM_BROKE = (
    TimeoutError,
    aiohttp.ClientPayloadError,
    aiohttp.ServerDisconnectedError,
    aiohttp.ClientOSError,
)

# An engine's answer, from aiohttp's client or the lower path (swapd.http.rawclient).
Answer = aiohttp.ClientResponse | RawResponse


@dataclass(frozen=True)
class Routed:
    """A request after routing: which model, and the bytes to send upstream."""

    model: ModelConfig
    body: bytes
    stream: bool
    chosen: Chosen | None = None  # the selector pick that led here, if one did
    # swapd asked for stream_options.include_usage itself: the client must not get that chunk.
    strip_usage: bool = False


@dataclass(frozen=True)
class PeerRouted:
    """A request for a peer's model: never a local engine."""

    remote: Remote
    body: bytes
    stream: bool
    chosen: Chosen | None = None


@dataclass(slots=True)
class Exchange:
    """One request relayed to an upstream and back: what labels it, what watches it, and
    the status the client was sent (0 until one left: a client gone before it is a 499)."""

    request: web.Request
    model: str  # labels logs and metrics
    who: str  # names the upstream in error messages
    t0: float
    timeouts: Timeouts | None = None
    loading: web.StreamResponse | None = None  # a loading stream: its 200 has left
    tracker: Tracker | None = None
    capture: Capture | None = None
    write_timeout: float = 60.0  # writeTimeout: a client that accepts nothing is cut
    status: int = 0
    # An event stream's `data: [DONE]` went out: a client that closes after it (the openai
    # SDK does, before the engine ends its body) had its whole answer and is no 499.
    done_sent: bool = False


def multipart_field(body: bytes, content_type: str, name: str) -> str | None:
    """A text field of a multipart/form-data body, without consuming the body."""
    boundary = None
    for param in content_type.split(";")[1:]:
        key, _, value = param.strip().partition("=")
        if key.lower() == "boundary":
            boundary = value.strip('"')
    if not boundary:
        return None
    try:
        # aiohttp decodes header bytes as UTF-8 with surrogateescape: this gives them back.
        delimiter = b"--" + boundary.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return None
    for part in body.split(delimiter)[1:]:
        head, sep, content = part.partition(b"\r\n\r\n")
        if not sep:
            continue
        for line in head.split(b"\r\n"):
            lower = line.lower()
            if lower.startswith(b"content-disposition:") and (
                f'name="{name}"'.encode() in lower or f"name={name};".encode() in lower
            ):
                if b"filename=" in lower:
                    return None
                return content.removesuffix(b"\r\n").decode("utf-8", "replace")
    return None


def json_model(body: bytes) -> tuple[dict[str, Any], str]:
    """A JSON request body and the `model` it names."""
    if not body:
        raise ApiError(
            "request body is empty; expected a JSON object with 'model'",
            status=400,
            code="bad_json",
        )
    data = parse_json(body, "request body")
    if not isinstance(data, dict):
        raise ApiError("request body must be a JSON object", status=400, code="bad_json")
    name = data.get("model")
    if not isinstance(name, str) or not name:
        raise ApiError(
            "'model' is missing or not a non-empty string", status=400, code="missing_model"
        )
    return data, name


def rewrite(model: ModelConfig, data: dict[str, Any], requested: str | None,
            resolved: str | None = None) -> bool:
    """Apply aliases, useModelName and filters in place; True if anything changed.

    `requested` is the body's `model` (None: the body names none, and gets none, as on
    /upstream where the path names the model); `resolved` the name it led to after a
    profile pin or a selector (what filters.setParamsByID is looked up by), `requested`
    if none.
    """
    changed = False
    upstream_name = model.use_model_name or model.id
    if requested is not None and requested != upstream_name:
        data["model"] = upstream_name
        changed = True
    by_id = (model.set_params_by_id or {}).get(resolved or requested)
    return _filter(data, model.strip_params, model.set_params, by_id) or changed


def rewrite_peer(peer: PeerConfig, model: str, data: dict[str, Any], resolved: str) -> None:
    """A peer request's body: the peer's own model id, then the peer's filters."""
    data["model"] = model
    by_id = (peer.set_params_by_id or {}).get(resolved)
    _filter(data, peer.strip_params, peer.set_params, by_id)


def _filter(data: dict[str, Any], strip: tuple[str, ...], *sets: Any) -> bool:
    """stripParams, then setParams, then setParamsByID (so it overrides); `model` is
    protected from all three."""
    changed = False
    for key in strip:
        if key != "model" and key in data:
            del data[key]
            changed = True
    for params in sets:
        for key, value in (params or {}).items():
            if key != "model":
                data[key] = value
                changed = True
    return changed


# Where stream_options.include_usage means something (OpenAI's streamed completions).
USAGE_PATHS = ("/v1/chat/completions", "/v1/completions")


def ask_for_usage(data: dict[str, Any]) -> bool:
    """Add stream_options.include_usage to a streamed request that lacks it; True if added."""
    options = data.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage") is True:
        return False
    if options is not None and not isinstance(options, dict):
        return False
    data["stream_options"] = {**(options or {}), "include_usage": True}
    return True


def with_usage_option(body: bytes) -> bytes:
    """A JSON object's bytes (one without `stream_options`) with `"stream_options":
    {"include_usage": true}` added as its last member."""
    end = body.rstrip().rfind(b"}")
    return body[:end] + b', "stream_options": {"include_usage": true}' + body[end:]


# A client's credentials: meant for swapd when swapd has keys, and then not the engine's.
CLIENT_AUTH = frozenset({"authorization", "x-api-key"})


def forward_headers(headers: CIMultiDict[str] | Any, strip_auth: bool = False) -> CIMultiDict[str]:
    """A client's request headers as they go to an engine. Without `Content-Encoding`: the
    body swapd relays is the one it inflated (swapd.http.bodies); without `Expect`."""
    out: CIMultiDict[str] = CIMultiDict()
    for key, value in headers.items():
        lower = key.lower()
        # Expect: swapd read the whole body before choosing the engine; an engine asked for
        # a 100 Continue now would only send one (timeouts.expectContinue, docs/llama-swap.md).
        if lower in HOP_BY_HOP or lower == "content-encoding" or lower == "expect":
            continue
        if not (strip_auth and lower in CLIENT_AUTH):
            out.add(key, value)
    return out


class _HeadersWithBody(web.StreamResponse):
    """A response whose headers leave in one send with its first body bytes (aiohttp ≥ 3.12
    buffers them until then), not in a send of their own: one syscall less per request."""

    _send_headers_immediately = False


class Proxy:
    """The config and the upstream session come from the app (swapd.appstate); the
    active profile from the daemon (`profiles`)."""

    def __init__(
        self,
        scheduler: Scheduler,
        metrics: Metrics,
        profiles: Profiles | None = None,
        *,
        activity: ActivityLog | None = None,
        capture: CaptureBuffer | None = None,
        starts: StartTimes | None = None,
        limits: Limits | None = None,
    ) -> None:
        self._scheduler = scheduler
        self._limits = limits if limits is not None else Limits()
        self._metrics = metrics
        self._clients = Clients()
        self._raw = RawClient()
        self._profiles = profiles or Profiles()
        self._spillover = Spillover()
        self._global = GlobalLimit()
        self._activity = activity if activity is not None and activity.enabled else None
        self._capture = capture if capture is not None and capture.enabled else None
        self._starts = starts if starts is not None else StartTimes(None)

    async def close(self) -> None:
        self._raw.close()
        await self._clients.close()

    def routes(self) -> list[web.RouteDef]:
        routes = [web.post(path, self.handle_inference) for path in INFERENCE_POST_PATHS]
        routes += [
            web.get("/v1/models", self.handle_models),
            web.route("*", "/upstream/{tail:.*}", self.handle_upstream),
        ]
        return routes

    # -- routing ---------------------------------------------------------------------

    def _state(self, model: str) -> str:
        view = self._scheduler.view(model)
        return view.state if view is not None else "stopped"

    def _target(self, config: Config, name: str, selectors: bool = True,
                key: KeyConfig | None = None) -> tuple[Local | Remote, Chosen | None]:
        """Profile pin, selector, local name, peer: where `name` goes (404/400/503). A
        model out of `key`'s scope is 404, as if it did not exist (docs/keys.md)."""
        def pick(selector: Any) -> str:
            return modelnames.choose(config, selector, self._state, self._spillover)

        try:
            target, chosen = modelnames.resolve(config, self._profiles.active, name,
                                                pick if selectors else None)
        except Unroutable as exc:
            raise ApiError(exc.message, status=exc.status, code=exc.code) from None
        if key is not None and not (
            allows_model(key, target.model) if isinstance(target, Local)
            else allows_peer(key, target.peer.id, target.model)
        ):
            if chosen is not None:
                self._spillover.release(chosen)
            raise ApiError(f"model {name[:200]!r} is not configured", status=404,
                           code="model_not_found")
        return target, chosen

    async def _route(self, request: web.Request, config: Config,
                     key: KeyConfig | None) -> Routed | PeerRouted:
        data: dict[str, Any] | None = None
        body = await read_body(request, config.max_body_bytes, config.body_timeout)
        ctype = request.headers.get("Content-Type", "")
        if ctype.lower().startswith("multipart/form-data"):
            found = multipart_field(body, ctype, "model")
            if not found:
                raise ApiError(
                    "multipart form field 'model' is required", status=400, code="missing_model"
                )
            name = found
        else:
            data, name = json_model(body)
        target, chosen = self._target(config, name, key=key)
        return self._routed(config, request.path, target, body, data, name, chosen)

    def _routed(
        self, config: Config, path: str, target: Local | Remote, body: bytes,
        data: dict[str, Any] | None, name: str | None, chosen: Chosen | None = None,
    ) -> Routed | PeerRouted:
        """An inference request's body as its upstream gets it: the name it knows the
        model by (when the body names one: `name`), then the filters (peers': the peer's)."""
        stream = data is not None and data.get("stream") is True
        if isinstance(target, Remote):
            if data is not None:
                rewrite_peer(target.peer, target.model, data, target.requested)
                body = json.dumps(data).encode()
            return PeerRouted(target, body, stream, chosen)
        changed = data is not None and rewrite(target.model, data, name, target.requested)
        strip_usage = False
        if (
            stream
            and data is not None
            and config.activity_inject_usage
            and self._activity is not None
            and path in USAGE_PATHS
        ):
            if not changed and "stream_options" not in data:
                # The only change: appended to the body as it came, not re-serialised
                # (a third of the cost of activity records on a stream, docs/benchmarks.md).
                return Routed(target.model, with_usage_option(body), stream, chosen, True)
            strip_usage = ask_for_usage(data)
            changed = changed or strip_usage
        if changed:
            body = json.dumps(data).encode()
        return Routed(target.model, body, stream, chosen, strip_usage)

    # -- handlers --------------------------------------------------------------------

    async def handle_inference(self, request: web.Request) -> web.StreamResponse:
        t0 = time.monotonic()
        config = config_of(request)  # the config in force when the request arrived
        key = request.get(KEY)
        slot = self._admit(key) if key is not None and key.limited else None
        try:
            try:
                routed = await self._route(request, config, key)
            except ApiError as exc:
                self._metrics.unrouted(exc.status)
                self._metrics.key_answered(key, "", exc.status)
                raise
            path = upstream_path(request.path_qs)
            label = routed.remote.label if isinstance(routed, PeerRouted) else routed.model.id
            try:
                self._limit(config, label, t0, key)
                with self._global.slot():
                    if isinstance(routed, PeerRouted):
                        return await self._serve_peer(request, config, routed, path, t0, key)
                    return await self._serve(request, config, routed, path, t0, record=True,
                                             key=key)
            finally:
                if routed.chosen is not None:
                    self._spillover.release(routed.chosen)
        finally:
            if slot is not None:
                self._limits.release(slot)

    def _admit(self, key: KeyConfig) -> Slot:
        """A slot for a request of a key with limits, or its 429 with the honest wait."""
        got = self._limits.admit(key)
        if isinstance(got, Slot):
            return got
        self._metrics.unrouted(429)
        self._metrics.key_answered(key, "", 429)
        headers: dict[str, str] = {}
        if got.limit == Limit.QUOTA:
            assert got.reset_at is not None
            reset = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(got.reset_at))
            message = (f"key {key.name!r} used its {key.tokens_per_day} tokens of today "
                       f"(tokensPerDay); the count restarts at {reset}")
            headers["X-RateLimit-Reset"] = str(round(got.reset_at))
        elif got.limit == Limit.CONCURRENCY:
            message = (f"key {key.name!r} has {key.max_concurrent} requests in flight "
                       "(maxConcurrent); retry when one ends")
        else:
            message = (f"key {key.name!r} made {key.requests_per_minute} requests in the last "
                       "minute (requestsPerMinute)")
        raise ApiError(message, status=429, code="key_limit", retry_after=got.wait,
                       headers=headers)

    def _limit(self, config: Config, label: str, t0: float,
               key: KeyConfig | None = None) -> None:
        """globalConcurrencyLimit: 429 at once, counted under the model asked for."""
        try:
            self._global.check(config.global_concurrency_limit)
        except ApiError:
            self._count(label, 429, t0, key)
            raise

    async def handle_by_query(self, request: web.Request) -> web.StreamResponse:
        """A GET routed by its `?model=` (llama.cpp's router and llama-swap: `/props`,
        `/v1/audio/voices`, `/sdapi/v1/loras`), relayed with its query as it came.
        `?autoload=false` (llama.cpp's) relays only to an engine ready now, else 409."""
        t0 = time.monotonic()
        config = config_of(request)
        name = request.query.get("model", "")
        if not name:
            self._metrics.unrouted(400)
            raise ApiError("query parameter 'model' is required", status=400,
                           code="missing_model")
        key = request.get(KEY)
        try:
            target, chosen = self._target(config, name, key=key)
        except ApiError as exc:
            self._metrics.unrouted(exc.status)
            raise
        try:
            self._limit(config, target.label if isinstance(target, Remote) else target.model.id,
                        t0, key)
            with self._global.slot():
                if isinstance(target, Remote):
                    return await self._serve_peer(
                        request, config, PeerRouted(target, b"", False, chosen),
                        request.path_qs, t0, key)
                ready_only = request.query.get("autoload", "").lower() in ("false", "0")
                return await self._serve(
                    request, config, Routed(target.model, b"", False, chosen),
                    request.path_qs, t0, ready_only=ready_only, key=key)
        finally:
            if chosen is not None:
                self._spillover.release(chosen)

    async def handle_upstream(self, request: web.Request) -> web.StreamResponse:
        """`/upstream/{model}/{path}`: raw passthrough; the model id may contain '/'.

        A profile pin applies; a selector is refused (which target would a browser tab's
        next asset go to?). A path matching `upstream.ignorePaths` is relayed only to an
        engine that is ready now: it never starts or swaps one (llama-swap answers 409).
        An inference path (POST, one of INFERENCE_POST_PATHS) gets what it gets on /v1:
        the model's filters and an activity record. Through a peer, only inference paths
        are relayed: a peer is another trust zone (docs/security.md), and its operations
        and admin routes are not the client's to reach with swapd's key for it.
        """
        t0 = time.monotonic()
        config = config_of(request)
        key = request.get(KEY)
        slot = self._admit(key) if key is not None and key.limited else None
        try:
            return await self._upstream(request, config, key, t0)
        finally:
            if slot is not None:
                self._limits.release(slot)

    async def _upstream(self, request: web.Request, config: Config, key: KeyConfig | None,
                        t0: float) -> web.StreamResponse:
        try:
            target, rest = self._upstream_target(config, request.match_info["tail"], key)
        except ApiError as exc:
            self._metrics.unrouted(exc.status)
            raise
        # The path named the model: what is refused from here on (a bad path, a body that
        # is no JSON object) counts under it, as the same answer from its engine would.
        label = target.label if isinstance(target, Remote) else target.model.id
        try:
            if not rest and not request.path.endswith("/"):
                # An engine's web UI at /upstream/{model} would resolve its relative links
                # against /upstream/: send the browser to the folder (llama-swap: 301 for
                # GET and HEAD, 308 otherwise, so a POST keeps its method and body).
                location = request.rel_url.raw_path + "/"
                if request.query_string:
                    location += "?" + request.query_string
                if request.method in ("GET", "HEAD"):
                    raise web.HTTPMovedPermanently(location)
                raise web.HTTPPermanentRedirect(location)
            path = under_root(rest)
            if path is None:
                raise ApiError(f"path {rest[:200]!r} climbs above the model's root",
                               status=400, code="bad_path")
            # "v1//chat/completions/" is an inference path too (engines read it as one):
            # it gets the filters, and goes out as the path it is.
            canonical = "/" + "/".join(filter(None, path.split("/")))
            inference = request.method == "POST" and canonical in INFERENCE_POST_PATHS
            if inference:
                path = canonical
            if isinstance(target, Remote) and not inference:
                raise ApiError(
                    f"/upstream relays only inference requests to peer {target.peer.id!r} "
                    f"(POST /v1/chat/completions, /v1/embeddings, …), not {request.method} "
                    f"{path[:200]!r}", status=403, code="peer_path_forbidden")
            body = await read_body(request, config.max_body_bytes, config.body_timeout)
            data = _json_body(request, body) if inference else None
        except ApiError as exc:
            self._count(label, exc.status, t0, key)
            raise
        query = "?" + request.query_string if request.query_string else ""
        url_path = quote(path, safe=PATH_SAFE) + query
        if inference:
            name = data.get("model") if data is not None else None
            routed = self._routed(config, path, target, body, data,
                                  name if isinstance(name, str) and name else None)
            if isinstance(routed, PeerRouted):
                return await self._serve_peer(request, config, routed, url_path, t0, key)
            return await self._serve(request, config, routed, url_path, t0,
                                     ready_only=_ignored(config, path), record=True, key=key)
        assert isinstance(target, Local)
        return await self._serve(request, config, Routed(target.model, body, False), url_path,
                                 t0, ready_only=_ignored(config, path), key=key)

    def _upstream_target(self, config: Config, tail: str,
                         key: KeyConfig | None = None) -> tuple[Local | Remote, str]:
        """The model an /upstream path names (its longest prefix that is a name: "org/model/
        v1/x" may name model "org/model"), and the rest of the path; 404 when none does."""
        parts = tail.split("/")
        profile = config.profiles.get(self._profiles.active or "")
        for i in range(len(parts), 0, -1):
            name = "/".join(parts[:i])
            try:
                target, _ = self._target(config, name, selectors=False, key=key)
            except ApiError as exc:
                if exc.status == 404 and not (profile and profile.pin(name)[0]):
                    continue  # a shorter prefix may name it
                raise
            return target, "/".join(parts[i:])
        raise ApiError(f"model {parts[0][:200]!r} is not configured", status=404,
                       code="model_not_found")

    async def handle_models(self, request: web.Request) -> web.Response:
        """llama-swap's /v1/models, plus swapd's `state` (swapd.http.listing); of a key
        with a scope, only what it may use."""
        listed = listing.models(config_of(request), self._scheduler.view, self._starts,
                                self._profiles.active, request.get(KEY))
        return web.json_response({"object": "list", "data": listed})

    # -- relay -----------------------------------------------------------------------

    async def _serve(
        self, request: web.Request, config: Config, routed: Routed, path: str, t0: float,
        ready_only: bool = False, *, record: bool = False, key: KeyConfig | None = None,
    ) -> web.StreamResponse:
        """Relay to a local engine, with a lease from the scheduler (waiting for a start
        or swap; with `ready_only`, only an engine ready now, else 409). A key with
        `swap: false` gets only an engine ready now too: it never starts one, nor evicts
        the tenant."""
        model = routed.model.id
        no_swap = key is not None and not key.swap and not ready_only
        ready_only = ready_only or no_swap
        tracker = (
            Tracker(t0, routed.stream, strip_usage=routed.strip_usage)
            if record and self._activity is not None
            else None
        )
        capture = (
            self._capture.start(request.headers, routed.body)
            if tracker is not None and self._capture is not None
            else None
        )
        ex = Exchange(request, model, f"engine for model {model!r}", t0, routed.model.timeouts,
                      tracker=tracker, capture=capture, write_timeout=config.write_timeout)
        progress = None
        if (
            not ready_only
            and routed.stream
            and routed.model.send_loading_state
            and request.path == "/v1/chat/completions"
            and not self._scheduler.is_ready(model)
        ):
            # A cold model: tell a chat UI that it is loading while it waits (#366).
            ex.loading = web.StreamResponse(headers=stream_headers())
            await ex.loading.prepare(request)
            progress = functools.partial(self._loading_progress, ex)
        held = False
        try:
            async with self._scheduler.lease(model, progress, ready_only=ready_only) as lease:
                held = True
                if ex.loading is not None:
                    await write_within(ex, ex.loading, _loading_chunk(model, f"{model} is ready\n"))
                base = lease.upstream
                headers = engine_headers(request.headers, base,
                                         _strip_auth(config, routed.model), config)
                return await self._relay(ex, base, path, headers, routed.body, local=True)
        except ClientStalled:
            # Only a loading stream is written before the relay: its client stopped reading
            # while it waited (the scheduler gave back what it was granted, if anything).
            assert ex.loading is not None
            ex.status = 499
            return ex.loading
        except ApiError as exc:
            ex.status = exc.status
            if no_swap and isinstance(exc, NotLoaded) and key is not None:
                raise ApiError(
                    f"model {model!r} is not running, and key {key.name!r} may not start it "
                    "(swap: false)", status=409, code="model_not_loaded") from None
            if ex.loading is not None and not held:  # the lease was refused
                # The loading stream's 200 went out first: a stream that broke off.
                await self._break_off(ex, ex.loading, exc.message, exc.code)
                return ex.loading
            if exc.status in (503, 504) and not isinstance(exc, StartFailed):
                # While the model loads, its ETA is when to come back (SDKs obey Retry-After);
                # a failed start is no wait (StartFailed).
                eta = self._starts.loading_eta(self._scheduler.view(model))
                if eta is not None:
                    exc.retry_after = eta
            raise
        finally:
            self._count(model, ex.status or 499, t0, key)
            if tracker is not None:
                self._record(request, config, model, tracker, ex.status or 499, capture, key,
                             len(routed.body))

    async def _loading_progress(self, ex: Exchange, waited: float) -> None:
        model = ex.model
        text = f"loading {model}… {waited:.0f}s"
        eta = self._starts.wait_eta(model, self._scheduler.view(model))
        if eta is not None:
            text += f", about {eta:.0f} s left"
        assert ex.loading is not None
        await write_within(ex, ex.loading, _loading_chunk(model, text + "\n"))

    def _record(
        self,
        request: web.Request,
        config: Config,
        model: str,
        tracker: Tracker,
        status: int,
        capture: Capture | None,
        key: KeyConfig | None = None,
        body_size: int = 0,
    ) -> None:
        """Keep a finished request's activity record (and its capture), count its tokens
        (for a key, also against the key's day)."""
        activity = self._activity
        assert activity is not None
        record = tracker.record(
            activity.next_id(), model=model, path=request.path, status=status,
            session=session_of(request.headers, config.session_headers),
        )
        if capture is not None and self._capture is not None:
            self._capture.keep(record.id, capture)
            record.captured = True
        if key is not None:
            record.key = key.name
            if status < 400:
                self._count_key_tokens(key, record, body_size)
        activity.add(record)
        if status < 400:
            self._metrics.series(model).tokens(
                record.prompt_tokens,
                record.completion_tokens,
                record.cached_tokens,
                record.ttft,
                record.prefill_tps,
                record.decode_tps,
            )

    def _count_key_tokens(self, key: KeyConfig, record: Record, body_size: int) -> None:
        """A key's request's tokens: in its metrics and, with a quota, against its day."""
        if record.prompt_tokens is None:
            # The engine reported none: about four bytes a token, marked estimated (as a
            # completion counted from its events is), so that the key's count after a
            # restart (from the store) is the count before it.
            record.prompt_tokens = body_size // 4
            record.estimated = True
        prompt, completion = record.prompt_tokens, record.completion_tokens or 0
        self._metrics.key_tokens(key, prompt, completion)
        if key.tokens_per_day:
            self._limits.add_tokens(key.name, prompt + completion, record.time)

    async def _serve_peer(
        self, request: web.Request, config: Config, routed: PeerRouted, path: str, t0: float,
        key: KeyConfig | None = None,
    ) -> web.StreamResponse:
        """Relay to a peer: its base URL plus the request's path, its key injected. No
        local engine is involved, so no lease, no queue, no swap."""
        remote = routed.remote
        label = remote.label
        peer = remote.peer
        if peer.api_key_unset:
            self._count(label, 503, t0, key)
            raise ApiError(
                f"peer {peer.id!r} needs environment variable {peer.api_key_unset} for its "
                "apiKey; set it and reload the config", status=503, code="peer_unavailable")
        # The client's credentials are swapd's, not the peer's: never passed on.
        headers = forward_headers(request.headers, strip_auth=True)
        if peer.api_key:
            headers["Authorization"] = f"Bearer {peer.api_key}"
            headers["x-api-key"] = peer.api_key
        ex = Exchange(request, label, f"peer {peer.id!r} (model {remote.model!r})", t0,
                      peer.timeouts, write_timeout=config.write_timeout)
        try:
            return await self._relay(ex, peer.proxy, path, headers, routed.body)
        except ApiError as exc:
            ex.status = exc.status
            raise
        finally:
            self._count(label, ex.status or 499, t0, key)

    # -- relay -----------------------------------------------------------------------
    # _relay = _send (the request, up to the engine's status line) + _response (its
    # headers, for the client) + _copy (the body, chunk by chunk). The status the client
    # was sent is kept in `Exchange.status` as it happens: the handler's count needs it
    # even when the client leaves mid-body (cancellation).

    async def _relay(
        self, ex: Exchange, base: str, path: str, headers: CIMultiDict[str], body: bytes,
        local: bool = False,
    ) -> web.StreamResponse:
        """Send the request to `base` + `path` and relay the answer to the client. A local
        engine's takes the lower path where it can (swapd.http.rawclient)."""
        try:
            upstream = await self._send(ex, base, path, headers, body, local)
        except ApiError as exc:
            if ex.loading is None:
                raise
            # The loading stream's 200 is out: the client sees a stream break off.
            await self._break_off(ex, ex.loading, exc.message, exc.code)
            return ex.loading
        complete = False
        try:
            sse = ex.loading is not None or _is_sse(upstream.headers)
            if ex.loading is not None:
                resp = ex.loading
                ex.status = resp.status
            else:
                resp = _response(upstream, sse)
            complete = await self._copy(ex, upstream, resp, sse)
            return resp
        finally:
            if complete:
                upstream.release()
            else:
                # Client gone or engine failed: drop the upstream connection so the
                # engine sees the disconnect and stops generating.
                upstream.close()

    async def _send(
        self, ex: Exchange, base: str, path: str, headers: CIMultiDict[str], body: bytes,
        local: bool,
    ) -> Answer:
        """The upstream's response, once its status line and headers came; else the
        502 (or 504 past a configured timeout) that says why."""
        request, timeouts = ex.request, ex.timeouts
        try:
            if local and timeouts is None and (target := self._raw.target(base)) is not None:
                return await self._raw.request(request.method, target, path, headers.items(),
                                               body)
            url = base + path
            session, timeout = self._clients.for_request(timeouts, url, request.app[UPSTREAM])
            call = session.request(
                request.method,
                url,
                headers=headers,
                data=body if body else None,
                allow_redirects=False,
                timeout=timeout,
            )
            if timeouts is not None and timeouts.response_header > 0:
                async with asyncio.timeout(timeouts.response_header):
                    return await call
            return await call
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            # A limit the config set (timeouts) is a gateway timeout: 504, not a failure.
            status = 504 if timeouts is not None and isinstance(
                exc, TimeoutError | aiohttp.ServerTimeoutError) else 502
            code = "upstream_timeout" if status == 504 else "engine_error"
            detail = _describe(exc)
            if isinstance(exc, TimeoutError) and not str(exc) and timeouts is not None:
                detail = (f"no response headers within {timeouts.response_header:g}s "
                          "(timeouts.responseHeader)")
            if (cause := self._scheduler.crash_cause(ex.model)) is not None:
                detail += f"; {cause}"  # swapd stopped it for a reason (a lost cluster worker)
            log.warning("upstream failed", model=ex.model, error=detail, status=status)
            raise ApiError(f"{ex.who} failed before answering: {detail}",
                           status=status, code=code) from None

    async def _copy(
        self, ex: Exchange, upstream: Answer, resp: web.StreamResponse, sse: bool,
    ) -> bool:
        """Relay the upstream's body into `resp`; True when it reached its end."""
        request = ex.request
        # An event stream's headers go out at once (clients show progress); anything
        # else waits for its first byte, so that an engine dying before it still gets
        # the client a proper 502 error.
        if sse and not resp.prepared:
            await resp.prepare(request)
            ex.status = resp.status
        capture = ex.capture
        if capture is not None and self._capture is not None:
            self._capture.respond(capture, upstream.headers)
        tracker = ex.tracker
        transport = request.transport
        content = upstream.content
        first = True
        last = b""  # the body's last bytes: written with its end, in one send
        try:
            async for chunk in content.iter_any():
                if first:
                    self._metrics.series(ex.model).ttfb.observe(time.monotonic() - ex.t0)
                    first = False
                    if not resp.prepared:
                        await resp.prepare(request)
                        ex.status = resp.status
                if tracker is not None:
                    chunk = tracker.feed(chunk)
                    if capture is not None and self._capture is not None:
                        self._capture.feed(capture, chunk)
                    if not chunk:
                        continue
                if sse:
                    ex.done_sent = b"[DONE]" in chunk[-16:]
                if content.at_eof():
                    last = chunk
                    break
                if transport is not None and (
                        transport.get_write_buffer_size() + len(chunk) <= NEVER_BLOCKS):
                    await resp.write(chunk)  # write_within's fast path, without its call
                else:
                    await write_within(ex, resp, chunk)
        except ClientStalled:
            ex.status = 499
            return False
        except UPSTREAM_BROKE as exc:
            message = f"{ex.who} failed mid-response: {_describe(exc)}"
            log.warning("upstream died mid-response", model=ex.model, error=_describe(exc))
            if not resp.prepared:
                raise ApiError(message, status=502, code="engine_error") from None
            # The status line is gone already: an event stream gets an error event,
            # anything else a cut connection (never a silent truncation). Counted under
            # the status the client got, plus a stream error.
            if sse:
                await self._break_off(ex, resp, message, "engine_error")
            else:
                self._metrics.series(ex.model).stream_errors.inc()
                ex.status = resp.status
                if request.transport is not None:
                    request.transport.close()
            return False
        except (ConnectionError, asyncio.CancelledError):
            # The client left mid-response: counted 499 (client closed request), not the
            # status its headers carried; unless it left after the stream's last event.
            ex.status = upstream.status if ex.done_sent else 499
            raise
        if not resp.prepared:
            await resp.prepare(request)
        ex.status = resp.status
        try:
            await write_within(ex, resp, last, eof=True)
        except ClientStalled:
            ex.status = 499
            return False
        except (ConnectionError, asyncio.CancelledError):
            if last:  # the client left before the body's last bytes reached it
                ex.status = upstream.status if ex.done_sent else 499
            raise
        ex.status = upstream.status
        return True

    async def _break_off(
        self, ex: Exchange, resp: web.StreamResponse, message: str, code: str
    ) -> None:
        """End an event stream whose 200 already left with an error event."""
        self._metrics.series(ex.model).stream_errors.inc()
        ex.status = resp.status
        try:
            await write_within(ex, resp, _sse_error(message, code, ex.request.path), eof=True)
        except ClientStalled:
            ex.status = 499
        except (ConnectionError, RuntimeError):
            pass

    def _count(self, model: str, code: int, t0: float, key: KeyConfig | None = None) -> None:
        self._metrics.series(model).answered(code, time.monotonic() - t0)
        if key is not None:
            self._metrics.key_answered(key, model, code)


# What stays unescaped in a relayed path: RFC 3986's pchar and "/". A "%" is escaped, so a
# client's "%252e" reaches the engine as the "%2e" it decoded to, never as a dot.
PATH_SAFE = "/:@!$&'()*+,;=-._~"


def under_root(rest: str) -> str | None:
    """`rest` (already percent-decoded: "%2e%2e" is "..") as an absolute path with its dot
    segments resolved (RFC 3986 §5.2.4); None when it climbs above its root, so that a
    relayed path stays under the upstream URL's own path."""
    out: list[str] = []
    segments = rest.split("/")
    last = len(segments) - 1
    for i, segment in enumerate(segments):
        if segment == "..":
            if not out:
                return None
            out.pop()
        elif segment != ".":
            out.append(segment)
            continue
        if i == last:
            out.append("")  # "a/b/.." is "a/", not "a"
    return "/" + "/".join(out)


def _ignored(config: Config, path: str) -> bool:
    """`upstream.ignorePaths`: relayed only to an engine that is ready now."""
    return any(p.search(path) for p in config.ignore_paths)


def _json_body(request: web.Request, body: bytes) -> dict[str, Any] | None:
    """An /upstream inference body as an object to filter (None for a multipart form,
    which filters leave alone on /v1 too); 400 for JSON that is broken or no object."""
    if request.headers.get("Content-Type", "").lower().startswith("multipart/form-data"):
        return None
    data = parse_json(body, "request body")
    if not isinstance(data, dict):
        raise ApiError("request body must be a JSON object", status=400, code="bad_json")
    return data


# llama-swap's prefixes that stand for nothing upstream: `/v/chat/completions` is
# `/chat/completions` (version-less routes, its #728), `/audioapi/v1/tasks/run` is
# audio.cpp's `/v1/tasks/run`.
_STRIPPED_PREFIXES = ("/v/", "/audioapi/")


def upstream_path(path_qs: str) -> str:
    """The path (and query) a request is relayed to: its own, less a llama-swap prefix."""
    for prefix in _STRIPPED_PREFIXES:
        if path_qs.startswith(prefix):
            return path_qs[len(prefix) - 1:]
    return path_qs


def _strip_auth(config: Config, model: ModelConfig) -> bool:
    return bool(config.keys) and not model.forward_client_auth


def engine_headers(headers: CIMultiDict[str] | Any, url: str, strip_auth: bool,
                   config: Config | None = None) -> CIMultiDict[str]:
    """The client's headers as an engine gets them (without the client's credentials
    with `strip_auth`; never with an operator's or admin's key, which is swapd's alone,
    not even with forwardClientAuth: the status page's chat once sent it)."""
    out = forward_headers(headers, strip_auth)
    if not strip_auth and config is not None and config.keys:
        for name in CLIENT_AUTH:
            for value in out.getall(name, ()):
                # The value itself (x-api-key), or what follows a scheme (Bearer, Token…).
                if is_swapds_own(config, value.strip()) or is_swapds_own(
                        config, value.partition(" ")[2].strip()):
                    out.popall(name)
                    break
    if "@" in url and URL(url).user is not None:
        # The proxy URL carries the engine's own credentials: they are what the engine
        # reads, and a client's Authorization cannot go along with them.
        out.popall("Authorization", None)
    return out


def _response(upstream: Answer, sse: bool) -> web.StreamResponse:
    """The client's response, with the upstream's status and end-to-end headers.

    Its headers leave with its first body bytes, except an event stream's whose first
    event has not come yet: those leave at once (a client shows progress while the engine
    reads the prompt). An event that came with the engine's headers goes in the same send
    (a syscall less per stream)."""
    with_body = not sse or upstream.content.total_bytes > 0
    resp = (_HeadersWithBody if with_body else web.StreamResponse)(
        status=upstream.status, reason=upstream.reason)
    for key, value in upstream.headers.items():
        lower = key.lower()
        # An engine's own CORS answer (llama.cpp sends `*`) must not override swapd's
        # `cors.allowOrigins`.
        if lower not in HOP_BY_HOP and not lower.startswith("access-control-"):
            resp.headers.add(key, value)
    if sse:
        resp.headers.update(UNBUFFERED)
    elif upstream.content_length is not None:
        resp.content_length = upstream.content_length
    return resp


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _is_sse(headers: Any) -> bool:
    return str(headers.get("Content-Type", "")).startswith("text/event-stream")


def _loading_chunk(model: str, text: str) -> bytes:
    chunk = {
        "id": "swapd-loading",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": {"reasoning_content": text}, "finish_reason": None}],
    }
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


def _sse_error(message: str, code: str, path: str) -> bytes:
    """The event that ends a stream broken off by an error."""
    if path.startswith("/v1/messages"):
        # Anthropic's SDKs read an `event: error` with their own error shape; a bare
        # data line would look like a stream that simply ended.
        return b"event: error\ndata: " + anthropic_error_body(message, type="api_error") + b"\n\n"
    return b"data: " + error_body(message, type="server_error", code=code) + b"\n\n"


class ClientStalled(Exception):
    """The client accepted no byte of its answer for writeTimeout seconds; its connection
    is cut (counted as 499)."""


# Bytes a transport can hold without pausing its writer: below the low-water mark of
# asyncio's and uvloop's transports (16 KiB), so a write that leaves at most this much
# buffered returns at once and needs no timer (the common case: a client that reads).
NEVER_BLOCKS = 8 * 1024


async def write_within(
    ex: Exchange, resp: web.StreamResponse, data: bytes, *, eof: bool = False
) -> None:
    """Write `data` (and end the answer with `eof`) to the client, or raise ClientStalled,
    its connection cut, when it accepts nothing for `ex.write_timeout` seconds: a client
    that never reads must not hold its engine (the lease, the tenant) forever."""
    transport = ex.request.transport
    if transport is not None and transport.get_write_buffer_size() + len(data) <= NEVER_BLOCKS:
        await (resp.write_eof(data) if eof else resp.write(data))
        return
    try:
        async with asyncio.timeout(ex.write_timeout):
            await (resp.write_eof(data) if eof else resp.write(data))
    except TimeoutError:
        log.warning("client stopped reading; connection cut", model=ex.model,
                    write_timeout=ex.write_timeout)
        if transport is not None:
            transport.abort()
        raise ClientStalled from None
