"""One engine: a child process in its own session, its output, readiness and stop.

The scheduler decides *when* an engine starts and stops; this module decides *how*. The
scheduler's runner (swapd/schedule/runner.py) is its only caller, through `start()`,
`stop()`, `sleep()`, `wake()`, `kill_now()` and `wait_exit()`, one task per engine at a time
(the decision core never starts and stops one model at once); there is no lock. The process
tree's pids and signals belong to swapd/engines/procgroup.py, which this module asks; nothing
outside swapd/engines touches a pid.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ipaddress
import os
import re
import signal
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol
from urllib.parse import urlsplit

import aiohttp
import psutil
import structlog

from swapd.config.presets import Call
from swapd.config.types import ModelConfig
from swapd.engines import procgroup
from swapd.engines.launch import engine_environment
from swapd.redact import clean_line, redact_argv

log = structlog.get_logger("swapd.engine")
# Engine stdout/stderr, echoed into swapd's own structured log (journald), one
# event per line. Already in the LogHub through the sink, hence _hub=False.
output_log = structlog.get_logger("swapd.engine.output")

# Readiness is polled this often: a ready engine is noticed within ~25 ms
# (llama-swap waits 250 ms and then polls every second).
PROBE_INTERVAL = 0.025
# A single probe may not hang longer than this (a wedged /health must not outlive
# the start deadline, nor delay noticing an exit).
PROBE_TIMEOUT = 2.0
# Lines of output kept per engine for error messages.
TAIL_LINES = 20
# The most a preset's unload request (Ollama's keep_alive: 0) may delay the SIGTERM.
UNLOAD_REQUEST_TIMEOUT = 5.0
# Container CLIs: the server listening on the port runs in the container runtime's tree,
# not in ours, so only the port's being free before the start is checked for them.
CONTAINER_CLIS = frozenset({"docker", "podman", "nerdctl"})


class Probe(StrEnum):
    """What one readiness probe found on the engine's port."""

    SILENT = "silent"  # nothing answered (not listening yet, or no answer in time)
    NOT_READY = "not_ready"  # an answer other than 200 (llama-server's 503 while loading)
    READY = "ready"


class EngineState(StrEnum):
    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    # Warm swaps (docs/sleep.md): the process is kept while its memory is given back.
    SLEEPING = "sleeping"  # the sleep calls were sent (and answered): it serves nothing
    WAKING = "waking"  # the wake calls, then the readiness check


class LineSink(Protocol):
    def append(self, source: str, line: str) -> None: ...


class GroupRecord(Protocol):
    def add(self, model: str, tree: procgroup.Tree) -> None: ...

    def remove(self, pid: int) -> None: ...


# How much of an engine's last line a failed start's message quotes.
MAX_LAST_LINE = 300


class StartError(Exception):
    """An engine that could not be made ready. The message is what clients see."""

    def __init__(self, model: str, reason: str, exit_code: int | None, tail: list[str]):
        self.model = model
        self.reason = reason
        self.exit_code = exit_code
        self.tail = tail
        # The engine's last line says why it failed (a crash's message has its lines too),
        # masked and bounded like every line swapd serves; the rest is in /logs (admin).
        message = f"model {model!r} failed to start: {reason}"
        last = next((clean_line(line).strip() for line in reversed(tail) if line.strip()), "")
        if last:
            message += f"; last output: {last[:MAX_LAST_LINE]}"
        if tail:
            message += f"; its output is in GET /logs/stream/{model}"
        super().__init__(message)


class SleepError(Exception):
    """A sleep or wake call that failed (refused, not 2xx, timed out, engine gone)."""


class WakeError(StartError):
    """A wake that failed; by then the engine's whole tree is gone (the caller cold-starts)."""


# Why an engine ended when swapd did not ask it to: it exited while serving, or it exited
# (or was stopped for not getting ready in time) while starting.
CRASH = "crash"
START_FAILED = "start_failed"


@dataclass(frozen=True)
class ExitInfo:
    code: int | None  # negative: ended by that signal (asyncio's convention)
    at: float  # wall-clock time
    tail: tuple[str, ...]
    # The reason swapd stopped it for (swap, idle, unload, reload, shutdown, guard…), or
    # CRASH / START_FAILED when it ended without being asked to.
    reason: str = CRASH

    @property
    def signal(self) -> str | None:
        """The signal that ended the process, by name ("SIGTERM"); None for an exit code."""
        if self.code is None or self.code >= 0:
            return None
        try:
            return signal.Signals(-self.code).name
        except ValueError:
            return f"signal {-self.code}"


def local_port(proxy: str) -> int | None:
    """The port of `proxy` when it is on this machine (where swapd can see who listens)."""
    parts = urlsplit(proxy)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return None
    host = parts.hostname or "127.0.0.1"
    if host == "localhost":
        return port
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return None  # a name: not resolved here, the start path does no DNS
    if addr.is_loopback or addr.is_unspecified:
        return port
    own = {a.address.split("%")[0] for addrs in psutil.net_if_addrs().values() for a in addrs}
    return port if str(addr) in own else None


def engine_port(cmd: Sequence[str], env: Iterable[tuple[str, str]], proxy: str) -> int | None:
    """The port this engine is told to listen on: `proxy`'s, when it is on this machine and
    the engine's argv or environment names it (`--port ${PORT}`, `PORT=…`). A recipe that
    never names it fronts a server something else runs (a placeholder `cmd` before an
    always-on server, as some llama-swap configs do): that port is not the engine's, so
    neither its being free nor who answers on it is checked."""
    port = local_port(proxy)
    if port is None:
        return None
    number = re.compile(rf"(?<![0-9]){port}(?![0-9])")
    if any(number.search(text) for text in (*cmd, *(value for _, value in env))):
        return port
    return None


class Engine:
    """A supervised engine process. Not thread-safe; lives on the event loop."""

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        sink: LineSink | None = None,
        record: GroupRecord | None = None,
        on_state: Callable[[Engine], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.state = EngineState.STOPPED
        self.pid: int | None = None
        self.tree: procgroup.Tree | None = None
        self.started_at: float | None = None  # wall clock, for /status uptime
        self.ready_at: float | None = None
        self.last_exit: ExitInfo | None = None
        self._sink = sink
        self._record = record
        self._on_state = on_state
        self._session: aiohttp.ClientSession | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self._pumps: list[asyncio.Task[None]] = []
        self._exited = asyncio.Event()
        self._exited.set()
        self._stopping = False
        self._stop_reason = CRASH
        # Who answered on the engine's port when it was not the engine (for the error).
        self._squatter: str | None = None

    # -- observers -------------------------------------------------------------------

    @property
    def id(self) -> str:
        return self.cfg.id

    @property
    def pgid(self) -> int | None:
        # start_new_session=True makes the child a session and group leader.
        return self.pid

    @property
    def running(self) -> bool:
        """True from spawn until the last process of the group is gone."""
        return self.state in (EngineState.STARTING, EngineState.READY, EngineState.STOPPING,
                              EngineState.SLEEPING, EngineState.WAKING)

    @property
    def upstream(self) -> str:
        return self.cfg.proxy.rstrip("/")

    def tail(self) -> list[str]:
        return list(self._tail)

    def _set_state(self, state: EngineState) -> None:
        if state == self.state:
            return
        self.state = state
        log.debug("engine state", model=self.id, state=str(state))
        if self._on_state is not None:
            self._on_state(self)

    # -- start -----------------------------------------------------------------------

    async def start(self, timeout: float | None = None) -> float:
        """Spawn the engine and wait until it is ready; returns seconds taken.

        Raises StartError when the engine exits or outlives its health timeout; by
        then its whole process group is gone.
        """
        assert not self.running, f"{self.id} is already running"
        timeout = self.cfg.health_check_timeout if timeout is None else timeout
        t0 = time.monotonic()
        self._tail.clear()
        self._stopping = False
        self._stop_reason = CRASH
        self._squatter = None
        self._set_state(EngineState.STARTING)
        port = engine_port(self.cfg.cmd, self.cfg.env, self.cfg.proxy)
        holder = None if port is None else await asyncio.to_thread(procgroup.port_holder, port)
        if holder is not None:
            # The engine could not bind it, and the holder would answer the readiness probe
            # and be sent the users' prompts. ${PORT} is not renumbered: it is in cmd, env
            # and proxy already, and the operator should know what squats it.
            self._set_state(EngineState.STOPPED)
            reason = f"port {port} is already in use by {holder}"
            log.error("engine port taken", model=self.id, port=port, holder=holder)
            raise StartError(self.id, reason, None, [])
        try:
            await self._spawn()
        except OSError as exc:
            self._set_state(EngineState.STOPPED)
            raise StartError(self.id, f"cannot exec {self.cfg.cmd[0]!r}: {exc}", None, []) from exc
        try:
            await self._wait_ready(t0 + timeout, timeout)
        except StartError:
            await self._cleanup_group(grace=min(self.cfg.unload_timeout, 5.0))
            self._set_state(EngineState.STOPPED)
            raise
        except asyncio.CancelledError:
            # Shutdown while loading: never leave a half-started group behind.
            await asyncio.shield(self._cleanup_group(grace=self.cfg.unload_timeout))
            self._set_state(EngineState.STOPPED)
            raise
        return self._now_ready(t0, "engine ready")

    async def _spawn(self) -> None:
        marker = procgroup.new_marker(self.id)
        env = engine_environment(self.cfg)
        # Every descendant inherits it, whatever group or session it moves to.
        env[procgroup.MARKER_VAR] = marker
        before = procgroup.ticks_now()
        cgroup = procgroup.engine_cgroup(self.id, marker)
        enter = procgroup.cgroup_entry(cgroup)
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.cfg.cmd,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=env,
                start_new_session=True,
                close_fds=True,
                preexec_fn=enter.join if enter is not None else None,
            )
        except BaseException:
            if enter is not None:
                enter.close()
            procgroup.remove_cgroup(cgroup)
            raise
        if enter is not None:
            enter.close()
            if not procgroup.in_cgroup(proc.pid, cgroup or ""):
                log.warning("engine did not enter its cgroup", model=self.id, cgroup=cgroup)
                cgroup = None
        start = procgroup.start_ticks(proc.pid)
        self.tree = procgroup.Tree(
            leader=proc.pid, start=before if start is None else start, marker=marker,
            cgroup=cgroup,
        )
        procgroup.track(self.tree)
        self._exited.clear()
        self._proc = proc
        self.pid = proc.pid
        self.started_at = time.time()
        self.ready_at = None
        if self._record is not None:
            self._record.add(self.id, self.tree)
        log.info("engine spawned", model=self.id, pid=proc.pid, argv=redact_argv(self.cfg.cmd),
                 cgroup=cgroup)
        assert proc.stdout is not None and proc.stderr is not None
        pumps = [
            asyncio.create_task(self._pump(proc.stdout), name=f"pump-out-{self.id}"),
            asyncio.create_task(self._pump(proc.stderr), name=f"pump-err-{self.id}"),
        ]
        # The watcher (it sets _exited) is held here too: the loop keeps tasks only weakly.
        watch = asyncio.create_task(self._watch(proc, pumps), name=f"watch-{self.id}")
        self._pumps = [*pumps, watch]

    async def _pump(self, stream: asyncio.StreamReader) -> None:
        # read() rather than readline(): a line longer than the reader's limit
        # (vLLM prints huge config dumps) must not kill the pump.
        pending = b""
        while True:
            try:
                chunk = await stream.read(65536)
            except (ConnectionError, OSError):
                chunk = b""
            if not chunk:
                break
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for raw in lines:
                self._line(raw)
            if len(pending) > 65536:
                self._line(pending)
                pending = b""
        if pending:
            self._line(pending)

    def _line(self, raw: bytes) -> None:
        line = raw.decode("utf-8", "replace").rstrip("\r")
        self._tail.append(line)
        if self._sink is not None:
            self._sink.append(self.id, line)
        output_log.info("engine output", model=self.id, line=line, _hub=False)

    async def _watch(
        self, proc: asyncio.subprocess.Process, pumps: list[asyncio.Task[None]]
    ) -> None:
        code = await proc.wait()
        # Output written just before exit should be in the tail we report.
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.gather(*pumps), 0.5)
        if self._stopping:
            reason = self._stop_reason
        else:
            reason = START_FAILED if self.state == EngineState.STARTING else CRASH
        self.last_exit = ExitInfo(code=code, at=time.time(), tail=tuple(self._tail), reason=reason)
        if not self._stopping:
            log.warning(
                "engine exited",
                model=self.id,
                pid=proc.pid,
                exit_code=code,
                state=str(self.state),
                last_lines=list(self._tail)[-5:],
            )
        self._exited.set()

    async def _wait_ready(self, deadline: float, timeout: float) -> None:
        exited = asyncio.create_task(self._exited.wait())
        probe: asyncio.Future[Probe] | None = None
        # Whether the socket answering on the engine's port is the engine's is checked when
        # the port first answers (while /health still says 503, for engines that answer
        # early), not after the 200: the check reads /proc and would delay every start.
        owned = False
        try:
            while True:
                if self._exited.is_set():
                    code = self.last_exit.code if self.last_exit else None
                    reason = f"exited with code {code}" + self._squatted()
                    raise StartError(self.id, reason, code, self.tail())
                if self.cfg.cluster_worker and self.cfg.check_endpoint is None:
                    # A worker (`ray start --block`) serves no port of its own: with
                    # `checkEndpoint: none`, started means ready (docs/two-sparks.md).
                    return
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    reason = f"not ready after {timeout:g}s (healthCheckTimeout)" + self._squatted()
                    raise StartError(self.id, reason, None, self.tail())
                # A probe hanging on a wedged (or squatted) port must not hide the
                # engine's exit until the probe's own timeout: whichever comes first.
                probe = asyncio.ensure_future(self._probe(min(PROBE_TIMEOUT, remaining)))
                await asyncio.wait({probe, exited}, return_when=asyncio.FIRST_COMPLETED)
                if not probe.done():
                    continue  # it exited: the loop's top reports it, `finally` drops the probe
                answer = probe.result()
                if answer != Probe.SILENT and not owned:
                    owned = await asyncio.to_thread(self._owns_port)
                if answer == Probe.READY and owned:
                    return
                # Sleep until the next probe, but wake at once if the engine dies.
                await asyncio.wait({exited}, timeout=min(PROBE_INTERVAL, max(remaining, 0)))
        finally:
            exited.cancel()
            if probe is not None:
                probe.cancel()

    def _owns_port(self) -> bool:
        """Does the socket that answered belong to this engine's process tree?"""
        port = engine_port(self.cfg.cmd, self.cfg.env, self.cfg.proxy)
        if port is None or self.tree is None:
            return True
        if os.path.basename(self.cfg.cmd[0]) in CONTAINER_CLIS:
            return True
        owned, holder = procgroup.port_owned_by(port, self.tree)
        if not owned and holder != self._squatter:
            self._squatter = holder
            log.warning("readiness answer from a socket that is not the engine's: ignored",
                        model=self.id, port=port, holder=holder)
        return owned

    def _squatted(self) -> str:
        if self._squatter is None:
            return ""
        port = local_port(self.cfg.proxy)
        return f"; port {port} is held by {self._squatter}, not by the engine"

    async def _probe(self, timeout: float) -> Probe:
        if self.cfg.check_endpoint is None:
            parts = urlsplit(self.cfg.proxy)
            port = parts.port or (443 if parts.scheme == "https" else 80)
            try:
                _, writer = await asyncio.wait_for(
                    asyncio.open_connection(parts.hostname or "127.0.0.1", port), timeout
                )
            except (TimeoutError, OSError):
                return Probe.SILENT
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            return Probe.READY
        url = self.upstream + "/" + self.cfg.check_endpoint.lstrip("/")
        try:
            async with self._http().get(
                url, timeout=aiohttp.ClientTimeout(total=timeout), allow_redirects=False
            ) as resp:
                await resp.read()
                return Probe.READY if resp.status == 200 else Probe.NOT_READY
        except (TimeoutError, aiohttp.ClientError, OSError):
            return Probe.SILENT

    def _http(self) -> aiohttp.ClientSession:
        """The session for probes and unload requests: one per engine lifetime, not
        one per probe (a probe runs every 50 ms while an engine loads)."""
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
        return self._session

    # -- sleep and wake --------------------------------------------------------------

    async def sleep(self) -> None:
        """Send the recipe's sleep calls (each must answer 2xx) and keep the process: from
        here on the engine serves nothing. Raises SleepError; the engine then still runs (the
        scheduler stops it). Whether memory came back is the scheduler's check, not this."""
        policy = self.cfg.sleep
        assert policy is not None and self.state == EngineState.READY, self.state
        self._set_state(EngineState.SLEEPING)
        await self._calls("sleep", policy.sleep, policy.timeout,
                          time.monotonic() + policy.timeout)

    async def wake(self) -> float:
        """Send the wake calls, then wait for readiness as after a spawn; returns seconds
        taken. On any failure (a call refused or timed out, the engine exiting or not ready
        within healthCheckTimeout: vLLM #50011) the whole tree is killed and WakeError is
        raised: a half-woken engine is never trusted with a request."""
        policy = self.cfg.sleep
        assert policy is not None and self.state == EngineState.SLEEPING, self.state
        t0 = time.monotonic()
        self._set_state(EngineState.WAKING)
        try:
            try:
                # A wake reloads the weights (vLLM's reload_weights: seconds from page cache,
                # minutes from disk): its calls may take until healthCheckTimeout, not the
                # sleepTimeout meant for giving memory back.
                await self._calls("wake", policy.wake, self.cfg.health_check_timeout,
                                  t0 + self.cfg.health_check_timeout)
            except SleepError as exc:
                raise WakeError(self.id, str(exc), None, []) from exc
            timeout = self.cfg.health_check_timeout
            await self._wait_ready(t0 + timeout, timeout)
        except StartError as exc:
            log.error("wake failed: killing the engine's tree", model=self.id, pid=self.pid,
                      error=str(exc))
            await self._cleanup_group(grace=0)
            self._set_state(EngineState.STOPPED)
            if isinstance(exc, WakeError):
                raise
            raise WakeError(self.id, f"wake: {exc.reason}", exc.exit_code, exc.tail) from exc
        except asyncio.CancelledError:
            await asyncio.shield(self._cleanup_group(grace=self.cfg.unload_timeout))
            self._set_state(EngineState.STOPPED)
            raise
        return self._now_ready(t0, "engine woken")

    def _now_ready(self, t0: float, event: str) -> float:
        """READY after a start or a wake that began at `t0` (monotonic); the seconds taken."""
        self.ready_at = time.time()
        self._set_state(EngineState.READY)
        elapsed = time.monotonic() - t0
        log.info(event, model=self.id, pid=self.pid, seconds=round(elapsed, 3))
        return elapsed

    async def _calls(self, what: str, calls: Sequence[Call], default_timeout: float,
                     deadline: float) -> None:
        """Each call in order to the engine's own address; each must answer 2xx in time."""
        for i, call in enumerate(calls, 1):
            if self._exited.is_set():
                raise SleepError(f"{what}: the engine exited")
            left = deadline - time.monotonic()
            timeout = min(call.timeout or default_timeout, left)
            step = f"{what} step {i}/{len(calls)} {call.method} {call.path}"
            if timeout <= 0:
                raise SleepError(f"{step}: no time left")
            url = self.upstream + call.path
            headers = {"Content-Type": "application/json"} if call.body is not None else {}
            try:
                async with self._http().request(
                    call.method, url, data=call.body, headers=headers,
                    timeout=aiohttp.ClientTimeout(total=timeout), allow_redirects=False,
                ) as resp:
                    # Bounded: an engine may answer anything; 300 bytes say enough.
                    answer = (await resp.content.read(300)).decode("utf-8", "replace")
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                raise SleepError(f"{step}: {str(exc) or type(exc).__name__}") from exc
            if not 200 <= resp.status < 300:
                raise SleepError(f"{step} answered {resp.status}")
            log.info(f"engine {what} call", model=self.id, method=call.method, path=call.path,
                     status=resp.status, response=answer)

    # -- exit and stop ---------------------------------------------------------------

    async def wait_exit(self) -> ExitInfo | None:
        """Wait until the engine's main process exits (for whatever reason)."""
        await self._exited.wait()
        return self.last_exit

    async def stop(self, grace: float | None = None, reason: str = "unload") -> bool:
        """Stop the engine and every process of its group. True if SIGKILL was needed.

        Safe to call in any state, also after a crash (it then collects whatever
        the dead leader left behind, e.g. vLLM's EngineCore). `reason` is recorded in
        `last_exit` (an engine that had exited already keeps its own).
        """
        if self.pid is None or self.state == EngineState.STOPPED:
            return False
        grace = self.cfg.unload_timeout if grace is None else grace
        if not self._stopping:
            self._stop_reason = reason
        self._stopping = True
        self._set_state(EngineState.STOPPING)
        # STOPPED is set inside the shield: a caller cancelled meanwhile (shutdown cancels
        # an idle, swap or reload stop under way) must not leave the engine STOPPING forever.
        return await asyncio.shield(self._stop_and_mark(grace))

    def kill_now(self) -> bool:
        """SIGKILL the engine's whole process tree at once: the memory guard's stop, which
        cannot wait for a grace period. The group first (one syscall), then its cgroup and
        the members that left the group. The usual exit handling follows (a start fails with
        StartError, a ready engine's exit is noticed as a crash). False: nothing to kill."""
        if self.pid is None or self.tree is None or not self.running:
            return False
        sent = procgroup.signal_group(self.tree.pgid, signal.SIGKILL)
        sent = procgroup.signal_tree(self.tree, signal.SIGKILL) > 0 or sent
        log.warning("engine killed at once (SIGKILL to its process tree)", model=self.id,
                    pid=self.pid)
        return sent

    async def _stop_and_mark(self, grace: float) -> bool:
        killed = await self._stop_group(grace)
        self._set_state(EngineState.STOPPED)
        return killed

    async def _stop_group(self, grace: float) -> bool:
        """Stop every process of the engine's tree (group, marker, adopted orphans, cgroup);
        returns only once none is left."""
        assert self.pid is not None and self.tree is not None
        tree = self.tree
        # Only an engine that served can unload; grace 0 means "now" (kill_all).
        if (self.cfg.unload_request and grace > 0 and self.ready_at is not None
                and not self._exited.is_set()):
            await self._send_unload_request(min(UNLOAD_REQUEST_TIMEOUT, grace))
        if self.cfg.cmd_stop and not self._exited.is_set():
            await self._run_cmd_stop(grace)
            if not await procgroup.wait_tree_gone(tree, grace):
                log.warning("cmdStop left processes, sending SIGKILL", model=self.id,
                            pids=await asyncio.to_thread(procgroup.engine_tree, tree))
                killed = await procgroup.kill_tree(tree)
                await self._reaped()
                return killed
            await self._reaped()
            return False
        killed = await procgroup.terminate_tree(tree, grace)
        if killed:
            log.warning("engine outlived its grace: SIGKILL", model=self.id, pgid=tree.pgid,
                        grace=grace)
        await self._reaped()
        return killed

    async def _send_unload_request(self, timeout: float) -> None:
        """Ask the engine to release its model before it is signalled (best effort)."""
        assert self.cfg.unload_request is not None
        path, body = self.cfg.unload_request
        url = self.upstream + "/" + path.lstrip("/")
        try:
            async with self._http().post(
                url, data=body, headers={"Content-Type": "application/json"},
                timeout=aiohttp.ClientTimeout(total=timeout), allow_redirects=False,
            ) as resp:
                answer = (await resp.content.read(300)).decode("utf-8", "replace")
                log.info("engine unload request", model=self.id, url=url, status=resp.status,
                         response=answer)
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            log.warning("engine unload request failed", model=self.id, url=url,
                        error=str(exc) or type(exc).__name__)

    async def _cleanup_group(self, grace: float) -> None:
        if not self._stopping:
            self._stop_reason = START_FAILED
        self._stopping = True
        self._set_state(EngineState.STOPPING)
        await asyncio.shield(self._stop_group(grace))

    async def _run_cmd_stop(self, grace: float) -> None:
        assert self.cfg.cmd_stop is not None and self.pid is not None
        argv = [a.replace("${PID}", str(self.pid)) for a in self.cfg.cmd_stop]
        log.info("running cmdStop", model=self.id, argv=redact_argv(argv))
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
                # What cmdStop leaves behind belongs to the engine's tree and dies with it.
                env={**engine_environment(self.cfg), **self._marker_env()},
                start_new_session=True,
            )
        except OSError as exc:
            log.warning("cmdStop failed to run, sending SIGTERM", model=self.id, error=str(exc))
            if self.tree is not None:
                await asyncio.to_thread(procgroup.signal_tree, self.tree, 15)
            return
        procgroup.note_child(proc.pid)
        try:
            await asyncio.wait_for(proc.wait(), grace)
        except TimeoutError:
            await procgroup.kill_group(proc.pid)
            await proc.wait()
        finally:
            procgroup.forget_child(proc.pid)

    def _marker_env(self) -> dict[str, str]:
        if self.tree is None or self.tree.marker is None:
            return {}
        return {procgroup.MARKER_VAR: self.tree.marker}

    async def _reaped(self) -> None:
        # The leader's exit status is collected by asyncio's child watcher; wait for
        # it so that no zombie is left and last_exit is filled in.
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._exited.wait(), 5.0)
        for task in self._pumps:
            if not task.done():
                task.cancel()
        if self._record is not None and self.pid is not None:
            self._record.remove(self.pid)
        if self.tree is not None:
            procgroup.untrack(self.tree)
            procgroup.remove_cgroup(self.tree.cgroup)
        if self._session is not None:
            await self._session.close()
            self._session = None
