"""Wiring: startup → serve → shutdown, in that order, readable top to bottom.

Signal handlers only set flags or schedule work on the loop; the linear `run()`
does the rest (uvicorn's server.py is the model).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import os
import signal
import ssl
import time
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import Final

import aiohttp
import structlog
from aiohttp import web

from swapd import __version__, files, redact, systemd
from swapd.cluster.peers import FAILURE_REASONS
from swapd.config.loader import config_files, load_config
from swapd.config.nodes import ConfigError, include_files, split_host_port
from swapd.config.types import Config, LoadResult
from swapd.engines import procgroup
from swapd.engines.launch import keep_from_engines
from swapd.engines.orphans import OwnedGroups, reap_leftovers
from swapd.engines.starts import StartTimes
from swapd.engines.trees import EngineTrees
from swapd.http.admin import Admin
from swapd.http.appstate import CONFIG, UPSTREAM, LiveConfig
from swapd.http.cluster import ClusterRoutes
from swapd.http.connections import LoopErrors, Runner, connection_cap, raise_fd_limit
from swapd.http.gate import Gate
from swapd.http.limits import Limits, day_start
from swapd.http.llamaswap_routes import llamaswap_routes
from swapd.http.modelnames import Profiles
from swapd.http.proxy import Proxy
from swapd.http.router_api import router_api_routes
from swapd.memory.gpu import Sampler
from swapd.memory.guard import GuardEvent, Watched
from swapd.memory.watch import MemoryWatch
from swapd.observe.activity import ActivityLog
from swapd.observe.capture import CaptureBuffer
from swapd.observe.events import StateEvents
from swapd.observe.logs import LogHub, configure_logging, log_routes
from swapd.observe.metrics import Metrics
from swapd.schedule.runner import Scheduler
from swapd.ui import api_routes, ui_routes

log = structlog.get_logger("swapd")
# The accept queue. aiohttp's default (128) overflows under a burst of a few hundred
# connections (issue 21's 320 idle ones): the kernel then drops SYNs and an honest client's
# connect waits a 1 s retransmit. Go's listeners (llama-swap's) use somaxconn; the kernel caps
# this at net.core.somaxconn.
LISTEN_BACKLOG: Final = 1024

# How often --watch-config looks at the config files' mtimes.
WATCH_INTERVAL = 1.0

def default_state_dir(listen: str) -> Path:
    """Under systemd, StateDirectory=; otherwise one folder per listen port, so two
    swapd instances on one box never reap each other's engines."""
    if os.environ.get("STATE_DIRECTORY"):
        return Path(os.environ["STATE_DIRECTORY"].split(":")[0])
    base = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    return base / "swapd" / str(split_host_port(listen)[1])


def swapd_keys(config: Config) -> list[str]:
    """The keys swapd itself uses: kept from engines' environments (engines.launch)."""
    return [*config.api_keys, *config.admin_keys,
            *(p.api_key for p in config.peers.values() if p.api_key)]


def key_names(config: Config) -> list[str]:
    """The names of the config's keys, named and unnamed (what labels their metrics)."""
    return [k.name for k in config.keys.values()]


def config_secrets(config: Config) -> list[str]:
    """Values the config itself names as secrets: masked wherever they would be printed."""
    from urllib.parse import urlsplit

    values = swapd_keys(config)
    for model in config.models.values():
        values += [v for k, v in model.env if redact.is_secret_name(k)]
        with contextlib.suppress(ValueError):
            if password := urlsplit(model.proxy).password:
                values.append(password)
    return values


class _Observer:
    """What the scheduler reports: metrics and systemd's status line."""

    def __init__(self, daemon: Daemon) -> None:
        self._daemon = daemon

    def engine_state(self, model: str, state: str) -> None:
        view = self._daemon.scheduler.view(model)
        if view is not None:
            self._daemon.memory.engine_state(view.cfg, state)
        self._daemon.metrics.set_engine_state(model, state)
        self._daemon.events.publish(model, state)
        tenant = ", ".join(self._daemon.scheduler.live_gpu_engines()) or "none"
        systemd.status(f"tenant: {tenant}")

    def engine_started(self, model: str, ok: bool, seconds: float) -> None:
        metrics = self._daemon.metrics
        metrics.engine_starts.labels(model, "success" if ok else "failure").inc()
        if ok:
            metrics.engine_start_seconds.labels(model).observe(seconds)
            self._daemon.starts.record(model, seconds)

    def engine_stopped(self, model: str, reason: str, killed: bool) -> None:
        metrics = self._daemon.metrics
        metrics.engine_stops.labels(model, reason).inc()
        self._daemon.last_stops[model] = (reason, killed, time.time())
        if killed:
            metrics.engine_kills.labels(model).inc()

    def evicted(self, model: str, reason: str) -> None:
        self._daemon.metrics.placement_evictions.labels(model, reason).inc()

    def engine_slept(self, model: str, result: str, seconds: float) -> None:
        self._daemon.metrics.engine_sleeps.labels(model, result).inc()

    def cluster_hold(self, peer: str, model: str, held: bool) -> None:
        self._daemon.metrics.cluster_holds.labels(peer, model).set(1 if held else 0)

    def cluster_hold_failed(self, peer: str, reason: str) -> None:
        self._daemon.metrics.cluster_hold_failures.labels(peer, reason).inc()

    def engine_woken(self, model: str, ok: bool, seconds: float) -> None:
        metrics = self._daemon.metrics
        metrics.engine_wakes.labels(model, "woken" if ok else "failed").inc()
        if ok:
            metrics.engine_wake_seconds.labels(model).observe(seconds)


class Daemon:
    """One running swapd: owns the config reference, the scheduler and the server."""

    def __init__(
        self,
        config_path: str | None,
        loaded: LoadResult,
        *,
        listen: str | None = None,
        watch_config: bool = False,
        config_dir: str | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        # llama-swap's -config and -config-dir (either may be absent): what a reload reads.
        self.config_path = config_path
        self.config_dir = config_dir
        self._tls = tls
        # --listen wins over the file, also across reloads (the socket is bound once).
        self._listen_override = listen
        # The config in force: what handlers read (app[CONFIG]); a reload swaps it.
        self.live = LiveConfig(self._effective(loaded.config))
        self._warnings = loaded.warnings
        redact.remember(config_secrets(self.config))
        keep_from_engines(swapd_keys(self.config))
        self._listen = self.config.listen
        self._watch = watch_config
        self.hub = LogHub(self.config.log_buffer_lines)
        self.events = StateEvents()
        self.metrics = Metrics()
        self.gate = Gate(self.live, self.metrics)
        self.stop_event = asyncio.Event()
        self._force = False
        self._reload_lock = asyncio.Lock()
        self.state_dir = (
            Path(self.config.state_dir)
            if self.config.state_dir
            else default_state_dir(self._listen)
        )
        self.owned = OwnedGroups(self.state_dir)
        self.starts = StartTimes(self.state_dir)
        # model -> (reason, killed, wall time) of its engine's last stop, for /status and /ui.
        self.last_stops: dict[str, tuple[str, bool, float]] = {}
        self.activity = ActivityLog(
            self.config.activity_size,
            db_path=self.state_dir / "activity.sqlite3" if self.config.activity_store else None,
            retention_days=self.config.activity_retention_days,
        )
        self.capture = CaptureBuffer(self.config.capture_buffer_mb)
        # What each key did (in flight, its rate window, today's tokens): kept across
        # reloads by key name, seeded from the activity store at startup.
        self.limits = Limits()
        self._observer = _Observer(self)
        # Built in the order they need each other: the engines' process trees (kept in step
        # with the record under stateDir), the sampler that reads them, the memory watch
        # that reads the sampler, the scheduler that asks the memory watch.
        self.trees = EngineTrees(self.owned)
        self.sampler = Sampler(self.trees.snapshot)
        self.memory = MemoryWatch(lambda: self.config, self.state_dir,
                                  sample=self.sampler.latest)
        self.scheduler = Scheduler(
            self.config, observer=self._observer, sink=self.hub, trees=self.trees,
            memory=self.memory, load_times=self.starts.samples,
        )
        # llama-swap's profiles: hooks.on_startup.profile (or none) at startup and after
        # every reload.
        self.profiles = Profiles()
        self.profiles.active = self.config.startup_profile
        self.memory.bind(self._watched, self._guard_kill)

    @property
    def config(self) -> Config:
        return self.live.config

    @config.setter
    def config(self, config: Config) -> None:
        self.live.config = config

    def _effective(self, config: Config) -> Config:
        if self._listen_override:
            return dataclasses.replace(config, listen=self._listen_override)
        return config

    # -- memory ----------------------------------------------------------------------

    def _watched(self) -> list[Watched]:
        """The running engines' process trees, for the memory guard."""
        out = []
        for model, tree in self.scheduler.process_groups().items():
            view = self.scheduler.view(model)
            if view is not None:
                out.append(Watched(model, tree, view.state == "starting"))
        return out

    def _guard_kill(self, model: str, event: GuardEvent) -> bool:
        killed = self.scheduler.guard_kill(model, event)
        if killed:
            self.metrics.memory_guard_kills.labels(model).inc()
        return killed

    # -- the web app -----------------------------------------------------------------

    def build_app(self) -> web.Application:
        # The body limit is enforced by the proxy itself, with an OpenAI-shaped 413.
        app = web.Application(
            client_max_size=self.config.max_body_bytes + 1024 * 1024,
            middlewares=[self.gate.middleware],
        )
        app[CONFIG] = self.live
        app.cleanup_ctx.append(_upstream_session)
        app.on_response_prepare.append(self.gate.answer_headers)
        proxy = Proxy(
            self.scheduler,
            self.metrics,
            self.profiles,
            activity=self.activity,
            capture=self.capture,
            starts=self.starts,
            limits=self.limits,
        )
        app.on_cleanup.append(lambda _: proxy.close())  # sessions made for `timeouts`
        admin = Admin(self.scheduler, self.reload, self.profiles, details=self._details,
                      memory=self.memory)
        app.add_routes(admin.routes())
        app.add_routes(ClusterRoutes(self.scheduler).routes())
        app.add_routes(llamaswap_routes(proxy, self.scheduler, self.events, self.activity,
                                        self.profiles, self.hub))
        app.add_routes(router_api_routes(proxy, self.scheduler, self.events, self.starts,
                                         self.profiles))
        app.add_routes(proxy.routes())
        app.add_routes(ui_routes())
        app.add_routes(api_routes(self.activity, self.capture, self.sampler))
        app.add_routes(log_routes(self.hub, self._model_ids))
        app.router.add_get("/metrics", self.metrics.handle)
        return app

    def _register_cluster(self) -> None:
        heads = {m.id: [peer for peer, _ in m.cluster.nodes]
                 for m in self.config.models.values() if m.cluster is not None}
        self.metrics.register_cluster(heads, FAILURE_REASONS)

    def _model_ids(self) -> Iterable[str]:
        return self.config.models.keys()

    def _details(self, model: str) -> dict[str, object]:
        """What /status says of a model beyond the scheduler's view: ETA and last stop."""
        expected = self.starts.expected(model)
        eta = self.starts.loading_eta(self.scheduler.view(model))
        stop = self.last_stops.get(model)
        return {
            "start_seconds": None if expected is None else round(expected, 1),
            "eta_seconds": None if eta is None else round(eta, 1),
            "last_stop": None
            if stop is None
            else {"reason": stop[0], "killed": stop[1], "at": stop[2]},
        }

    # -- reload ----------------------------------------------------------------------

    async def reload(self, why: str) -> dict[str, list[str]]:
        """Load the config again and adopt it; raises ConfigError and keeps the old one."""
        async with self._reload_lock:
            ports = {m.id: m.port for m in self.config.models.values() if m.port is not None}
            loaded = await asyncio.to_thread(
                load_config, self.config_path, None, ports, self.config_dir)
            if loaded.config.start_port != self.config.start_port:
                # A new startPort renumbers every ${PORT}: the ports kept would hide it.
                loaded = await asyncio.to_thread(
                    load_config, self.config_path, None, None, self.config_dir)
            redact.remember(config_secrets(loaded.config))
            keep_from_engines(swapd_keys(loaded.config))
            for warning in loaded.warnings:
                log.warning("config warning", warning=warning)
            self.config = self._effective(loaded.config)
            self.gate.forget_hosts()
            self.profiles.active = self.config.startup_profile
            self._apply_log_to_stdout()
            if self.config.listen != self._listen:
                log.warning("listen changed; it takes effect on restart", listen=self._listen)
            changes = self.scheduler.apply_config(self.config)
            self.metrics.register_models(list(self.config.models))
            self._register_cluster()
            self.metrics.llamaswap_names(self.config.llamaswap_metric_names)
            self.metrics.register_keys(key_names(self.config))
            for model in changes["removed"]:
                self.metrics.forget_model(model)
            log.info("config reloaded", why=why, **changes)
            return changes

    async def _reload_logged(self, why: str) -> None:
        try:
            await self.reload(why)
        except ConfigError as exc:
            log.error("config reload refused; keeping the running config", error=str(exc))

    def _config_files(self) -> list[Path]:
        try:
            files = [Path(f) for f in config_files(self.config_path, self.config_dir)]
        except ConfigError:
            files = []  # the folder is gone or empty: the next reload says so
        if self.config_dir is not None:
            files.append(Path(self.config_dir))  # a file added or removed changes its mtime
        if self.config.include:
            files += map(Path, include_files(self.config.source, self.config.include))
        return files

    def _snapshot(self) -> dict[Path, float]:
        out = {}
        for path in self._config_files():
            with contextlib.suppress(OSError):
                out[path] = path.stat().st_mtime
        return out

    async def _watch_config(self) -> None:
        seen = self._snapshot()
        while True:
            await asyncio.sleep(WATCH_INTERVAL)
            now = self._snapshot()
            if now != seen:
                seen = now
                await self._reload_logged("config file changed")

    # -- lifecycle -------------------------------------------------------------------

    def _on_signal(self, sig: signal.Signals) -> None:
        if sig == signal.SIGHUP:
            asyncio.get_running_loop().create_task(self._reload_logged("SIGHUP"))
            return
        if self.stop_event.is_set():
            if sig == signal.SIGINT or sig == signal.SIGTERM:
                log.warning("second stop signal: killing every engine now")
                self._force = True
                self._force_event.set()
            return
        log.info("stop signal", signal=sig.name)
        self.stop_event.set()

    def _apply_log_to_stdout(self) -> None:
        """llama-swap's `logToStdout`: `proxy` and `none` keep engine output off stdout
        (it stays in /logs); swapd's own log always goes there (see config_routing)."""
        quiet = str(self.config.log_to_stdout) in ("proxy", "none")
        logging.getLogger("swapd.engine.output").setLevel(
            logging.CRITICAL + 1 if quiet else logging.NOTSET)

    async def run(self) -> int:
        """startup → serve → shutdown, as uvicorn's server.py. What startup acquires is
        released by the exit stack in reverse order, whatever happens after it."""
        async with contextlib.AsyncExitStack() as resources:
            site = await self.startup(resources)
            if site is None:
                return 1
            await self.serve()
            await self.shutdown(site)
        log.info("swapd stopped")
        return 0

    async def startup(self, resources: contextlib.AsyncExitStack) -> web.TCPSite | None:
        """Everything before the first request; None when the socket cannot be bound or the
        state folder is not swapd's own."""
        loop = asyncio.get_running_loop()
        # Threads (the GPU sampler, engine pumps' fallbacks) hand lines to this loop.
        self.hub.bind(loop)
        configure_logging(self.config.log_level, hub=self.hub)
        self._apply_log_to_stdout()
        problem = await asyncio.to_thread(_own_state_dir, self.state_dir)
        if problem is not None:
            log.error("refusing stateDir: swapd reads engine records back from it and acts on "
                      "them", state_dir=str(self.state_dir), problem=problem)
            return None
        # A swapd killed mid-write left a temp file beside the state file it was replacing.
        stale = await asyncio.to_thread(files.remove_stale_temps, self.state_dir)
        if stale:
            log.info("removed temp files an earlier swapd left in stateDir", files=stale)
        self.activity.load()
        # A restart does not give a key a fresh day: today's tokens come from the store.
        self.limits.seed(self.activity.today_by_key(day_start(time.time())))
        for warning in self._warnings:
            log.warning("config warning", warning=warning)
        # Orphans of an engine become our children, not init's: found by parenthood even
        # when they cleared the environment marker; reaped by `owned.supervise()`.
        subreaper = procgroup.set_subreaper()
        cgroup = procgroup.enable_cgroups()
        log.info("engine containment", subreaper=subreaper, cgroup=cgroup,
                 marker=procgroup.MARKER_VAR)
        reaped = await reap_leftovers(self.state_dir)
        for entry in reaped:
            log.warning("reaped an engine left by an earlier swapd", **entry)
        self._force_event = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, self._on_signal, sig)
            resources.callback(loop.remove_signal_handler, sig)
        # The last resort, first registered so it runs last: whatever ended the daemon, no
        # engine outlives it (after a graceful shutdown there is none left to kill).
        resources.push_async_callback(self.scheduler.kill_all)
        self.metrics.register_models(list(self.config.models))
        self._register_cluster()
        self.metrics.register_keys(key_names(self.config))
        self.metrics.attach_sampler(self.sampler)
        self.metrics.llamaswap_names(self.config.llamaswap_metric_names)
        self.metrics.attach_memory(self.memory)
        self.metrics.attach_counts(self.scheduler.counts)
        if self.config.gpu_sampling:  # performance.disabled: true turns it off
            self.sampler.start()
            resources.callback(self.sampler.stop)
        else:
            log.info("GPU sampling off (performance.disabled)")
        self.memory.start()
        resources.callback(self.memory.stop)
        # Connections are capped below the open-files limit, raised to its hard value
        # first (swapd.http.connections); one kind of loop error is logged once per
        # interval (a failing accept repeats as fast as the loop turns).
        fd_limit = raise_fd_limit()
        loop.set_exception_handler(LoopErrors())
        runner = Runner(
            self.build_app(),
            max_connections=connection_cap(fd_limit),
            header_timeout=self.config.header_timeout,
            handler_cancellation=True,
            access_log=None,
            shutdown_timeout=1.0,
            # aiohttp's default (3630 s) lets a slowloris client hold a socket an hour.
            keepalive_timeout=75,
            # Bodies are inflated by swapd.http.bodies, after the gate and within limits;
            # aiohttp would inflate gzip on the loop as it arrives, before any key check.
            auto_decompress=False,
        )
        await runner.setup()  # the app's cleanup context opens the upstream session
        resources.push_async_callback(runner.cleanup)
        # Before the runner's cleanup (LIFO): open /logs/stream responses end, or the
        # cleanup would wait for them.
        resources.callback(self.hub.close)
        resources.callback(self.events.close)  # /api/events and /models/sse end likewise
        # Likewise /api/activity/stream; the SQLite store gets what is pending.
        resources.push_async_callback(self.activity.close)
        host, port = split_host_port(self._listen)
        # host "" (`:PORT`): every interface, IPv4 and IPv6 (asyncio binds one socket each).
        site = web.TCPSite(runner, host or None, port, reuse_address=True,
                           ssl_context=self._tls, backlog=LISTEN_BACKLOG)
        try:
            await site.start()
        except OSError as exc:
            log.error("cannot listen", listen=self._listen, error=str(exc))
            return None
        urls = listening_urls(site, "https" if self._tls else "http")
        log.info(
            "swapd listening",  # with `urls`: where to reach it (llama-swap prints it too)
            listen=f"{host}:{port}",
            urls=urls,
            version=__version__,
            models=len(self.config.models),
            state_dir=str(self.state_dir),
            open_files=fd_limit,
            max_connections=connection_cap(fd_limit),
            loop=type(loop).__module__.split(".")[0],
        )
        if host in ("", "0.0.0.0", "::") and not self.config.keys:
            # llama-swap says so too: the inference API is open to the network.
            log.warning(
                "reachable by every host on the network without a key: the inference API is "
                "open to them (set apiKeys), the operations routes answer this machine only; "
                f"--listen 127.0.0.1:{port} keeps swapd to this machine")
        # What startup built lives as long as the daemon: keep it out of the cyclic GC's
        # full passes, which otherwise stall every request at that instant (p99 latency).
        gc.freeze()
        systemd.ready(f"listening on {host}:{port}; tenant: none")
        background = [self.owned.supervise()]
        interval = systemd.watchdog_interval()
        if interval:
            background.append(systemd.watchdog_loop(interval))
        if self._watch:
            background.append(self._watch_config())
        for coro in background:
            resources.push_async_callback(_cancelled, asyncio.create_task(coro))
        self.scheduler.preload(self.config.preload)
        return site

    async def serve(self) -> None:
        """Requests are served by the site until a stop signal (SIGHUP reloads meanwhile)."""
        await self.stop_event.wait()

    async def shutdown(self, site: web.TCPSite) -> None:
        """Stop accepting, let requests in flight finish (shutdownTimeout), stop every engine;
        a second stop signal kills them at once."""
        systemd.stopping()
        log.info("shutting down", drain=self.config.shutdown_timeout)
        await site.stop()  # stop accepting; requests in flight go on
        close = asyncio.create_task(self.scheduler.close())
        force = asyncio.create_task(self._force_event.wait())
        await asyncio.wait({close, force}, return_when=asyncio.FIRST_COMPLETED)
        if self._force:
            close.cancel()
            await self.scheduler.kill_all()
        else:
            force.cancel()
            await close


def _own_state_dir(path: Path) -> str | None:
    """Make the state folder (0700) if there is none; why it is not swapd's own, else None."""
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        return f"cannot create it: {exc.strerror or exc}"
    return files.untrusted(path, directory=True)


async def _cancelled(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _upstream_session(app: web.Application) -> AsyncIterator[None]:
    """The app's cleanup context: one client session for every relay, closed with the app."""
    app[UPSTREAM] = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, force_close=False),
        timeout=aiohttp.ClientTimeout(total=None, connect=30, sock_connect=30),
        auto_decompress=False,
    )
    yield
    await app[UPSTREAM].close()


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop when it is installed (the `uvloop` extra), else asyncio's.

    uvloop trims the CPU the relay spends per request (docs/benchmarks.md); it is optional,
    and SWAPD_LOOP=asyncio forces the standard loop.
    """
    if os.environ.get("SWAPD_LOOP", "").strip().lower() == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def listening_urls(site: web.TCPSite, scheme: str) -> list[str]:
    """Where `site` accepts connections, as URLs (`http://[::]:28080` for IPv6)."""
    server = site._server  # aiohttp keeps the asyncio server here; it has no public getter
    urls = []
    for sock in getattr(server, "sockets", None) or ():
        host, port = sock.getsockname()[:2]
        urls.append(f"{scheme}://{'[' + host + ']' if ':' in host else host}:{port}")
    return urls


def tls_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """llama-swap's -tls-cert-file/-tls-key-file: serve HTTPS with this certificate."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert_file, key_file)
    except ssl.SSLError as exc:
        raise ValueError(f"cannot use {cert_file} and {key_file}: {exc.reason or exc}") from None
    return context


def serve(config_path: str | None, loaded: LoadResult, listen: str | None, watch: bool, *,
          tls: ssl.SSLContext | None = None, config_dir: str | None = None) -> int:
    async def main() -> int:
        return await Daemon(config_path, loaded, listen=listen, watch_config=watch,
                            config_dir=config_dir, tls=tls).run()

    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(main())
