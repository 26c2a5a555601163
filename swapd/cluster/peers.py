"""The head side of a cluster: the holds this node takes on its peers for a head model
(docs/two-sparks.md).

Before a head model's engine starts, each peer in its `cluster.nodes` is asked to hold the
worker recipe named there (`POST /api/cluster/holds`, the peer's admin key from `peers:`);
the answer comes once the worker is ready there. While the head runs, every hold is renewed
each `holdTtl`/3 seconds (`PUT /api/cluster/holds/{id}`). A renewal answered "no such hold"
means the worker is gone there (it exited, the memory guard or an admin stopped it, the peer
restarted): the hold is *lost* and the scheduler stops the head. The head learns it by its
own renewals rather than by a call back from the peer: the peer then needs no key for the
head and no route to it, trust stays one-way (head → peer, as for `peers:` requests), and a
head that cannot hear the peer is the case a call back could not cover anyway. The price is
latency: at most holdTtl/3 (5 s by default) between a worker's death and the head's stop.
After the head stops, each hold is released (`DELETE`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import aiohttp

from swapd.config.types import ClusterConfig, PeerConfig
from swapd.redact import clean_line

HOLDS_PATH = "/api/cluster/holds"
MAX_ANSWER = 64 * 1024  # bytes of a peer's answer read
MAX_ECHO = 300  # characters of a peer's message repeated to clients
RELEASE_TIMEOUT = 5.0


class HoldFailure(StrEnum):
    """swapd_cluster_hold_failures_total{reason}."""

    UNREACHABLE = "unreachable"  # no connection, or no renewal answered for holdTtl
    TIMEOUT = "timeout"  # the worker was not ready in time
    REFUSED = "refused"  # 4xx: bad key, not a worker there, held by another head
    WORKER_FAILED = "worker_failed"  # 5xx: the worker failed to start (or is in backoff)
    LOST = "lost"  # a renewal found the hold gone: the worker ended there
    NO_KEY = "no_key"  # peers.X.apiKey names an unset environment variable


FAILURE_REASONS = tuple(str(r) for r in HoldFailure)


class HoldFailed(Exception):
    def __init__(self, peer: str, worker: str, reason: HoldFailure, detail: str) -> None:
        self.peer, self.worker, self.reason, self.detail = peer, worker, reason, detail
        super().__init__(f"cluster hold on peer {peer!r} for worker {worker!r} failed "
                         f"({reason}): {detail}")


class NodeState(StrEnum):
    TAKING = "taking"  # asked; the peer is starting the worker
    HELD = "held"
    FAILED = "failed"  # could not be had
    LOST = "lost"  # a renewal found it gone
    RELEASED = "released"


@dataclass(slots=True)
class _Node:
    peer: str
    worker: str
    state: NodeState = NodeState.TAKING
    hold_id: str | None = None
    error: str | None = None
    renewed_at: float = 0.0
    worker_state: str | None = None  # the worker's engine state, as the peer last said


@dataclass(slots=True)
class _Run:
    model: str
    cluster: ClusterConfig
    nodes: list[_Node]
    lost: asyncio.Future[str]
    renewer: asyncio.Task[None] | None = None
    tasks: set[asyncio.Task[None]] = field(default_factory=set)


class PeerHolds:
    """The holds of every head model on this node. `on_held(peer, model, held)` and
    `on_failure(peer, reason)` feed the metrics; `clock` is injected (monotonic)."""

    def __init__(
        self,
        peers: Callable[[], Mapping[str, PeerConfig]],
        *,
        holder: Callable[[str], str],
        on_held: Callable[[str, str, bool], None] | None = None,
        on_failure: Callable[[str, str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._peers = peers
        self._holder = holder
        self._on_held = on_held or (lambda peer, model, held: None)
        self._on_failure = on_failure or (lambda peer, reason: None)
        self._clock = clock
        self._runs: dict[str, _Run] = {}
        self._last: dict[str, list[_Node]] = {}  # the last run's nodes, for /status
        self._session: aiohttp.ClientSession | None = None

    # -- what the scheduler calls ------------------------------------------------------

    async def take(self, model: str, cluster: ClusterConfig, timeout: float) -> None:
        """Hold every worker of `model`, in parallel; returns once all are ready there.
        Raises HoldFailed (the first failure) after releasing the holds already taken."""
        await self.release(model)
        run = _Run(model, cluster, [_Node(p, w) for p, w in cluster.nodes],
                   asyncio.get_running_loop().create_future())
        self._runs[model] = run
        self._last[model] = run.nodes
        try:
            results = await asyncio.gather(
                *(self._take_one(run, node, timeout) for node in run.nodes),
                return_exceptions=True)
        except asyncio.CancelledError:
            await asyncio.shield(self.release(model))  # a stop overtook the start
            raise
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            await self.release(model)
            first = next((f for f in failed if isinstance(f, HoldFailed)), failed[0])
            raise first
        run.renewer = asyncio.create_task(self._renew(run), name=f"renew-{model}")

    def lost(self, model: str) -> asyncio.Future[str] | None:
        """Resolves with the reason when a hold of the running head is lost."""
        run = self._runs.get(model)
        return None if run is None else run.lost

    async def release(self, model: str) -> None:
        """Release every hold of `model` (best effort: a peer that does not answer lets the
        hold expire after holdTtl)."""
        run = self._runs.pop(model, None)
        if run is None:
            return
        if run.renewer is not None:
            run.renewer.cancel()
            await asyncio.gather(run.renewer, return_exceptions=True)
        if not run.lost.done():
            run.lost.cancel()
        await asyncio.gather(*(self._release_one(run, n) for n in run.nodes),
                             return_exceptions=True)

    def views(self, model: str, cluster: ClusterConfig) -> list[dict[str, Any]]:
        """Each node of a head model: peer, worker, hold state, hold id, the last error."""
        nodes = {(n.peer, n.worker): n for n in self._last.get(model, [])}
        out = []
        for peer, worker in cluster.nodes:
            n = nodes.get((peer, worker))
            out.append({
                "peer": peer, "worker": worker,
                "state": "idle" if n is None else str(n.state),
                "hold": None if n is None else n.hold_id,
                "error": None if n is None else n.error,
                "worker_state": None if n is None or n.state != NodeState.HELD
                else n.worker_state,
            })
        return out

    async def close(self) -> None:
        for model in list(self._runs):
            await self.release(model)
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- one peer --------------------------------------------------------------------

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # Our own session: no cookies kept, no environment proxies (a peer is on the LAN).
            self._session = aiohttp.ClientSession(
                cookie_jar=aiohttp.DummyCookieJar(), trust_env=False)
        return self._session

    def _peer(self, run: _Run, node: _Node) -> tuple[PeerConfig, dict[str, str]]:
        peer = self._peers().get(node.peer)
        if peer is None:
            raise HoldFailed(node.peer, node.worker, HoldFailure.REFUSED,
                             "no such peer in peers: (removed by a reload?)")
        if peer.api_key_unset:
            raise HoldFailed(node.peer, node.worker, HoldFailure.NO_KEY,
                             f"peers.{node.peer}.apiKey: environment variable "
                             f"{peer.api_key_unset} is not set")
        headers = {"User-Agent": "swapd-cluster"}
        if peer.api_key:
            headers["Authorization"] = f"Bearer {peer.api_key}"
        return peer, headers

    async def _take_one(self, run: _Run, node: _Node, timeout: float) -> None:
        try:
            peer, headers = self._peer(run, node)
            body = {"worker": node.worker, "holder": self._holder(run.model),
                    "ttl": run.cluster.hold_ttl}
            status, answer = await self._call(
                "POST", peer.proxy + HOLDS_PATH, headers, body, timeout, node)
            if status not in (200, 201):
                reason = HoldFailure.REFUSED if status < 500 else HoldFailure.WORKER_FAILED
                raise HoldFailed(node.peer, node.worker, reason,
                                 f"the peer answered {status}: {_message(answer)}")
            hold_id = _hold_id(answer)
            if hold_id is None:
                raise HoldFailed(node.peer, node.worker, HoldFailure.REFUSED,
                                 "the peer's answer names no hold")
        except HoldFailed as exc:
            node.state, node.error = NodeState.FAILED, exc.detail
            self._on_failure(node.peer, str(exc.reason))
            raise
        node.hold_id, node.state, node.renewed_at = hold_id, NodeState.HELD, self._clock()
        node.worker_state = _worker_state(answer)
        self._on_held(node.peer, run.model, True)

    async def _renew(self, run: _Run) -> None:
        interval = run.cluster.hold_ttl / 3
        while True:
            await asyncio.sleep(interval)  # the renewal period itself, not a wait for a state
            await asyncio.gather(*(self._renew_one(run, n, interval) for n in run.nodes
                                   if n.state == NodeState.HELD))

    async def _renew_one(self, run: _Run, node: _Node, timeout: float) -> None:
        ttl = run.cluster.hold_ttl
        try:
            peer, headers = self._peer(run, node)
            status, answer = await self._call(
                "PUT", f"{peer.proxy}{HOLDS_PATH}/{node.hold_id}", headers, {"ttl": ttl},
                timeout, node)
        except HoldFailed as exc:
            status, answer = -1, exc.detail
        if status == 200:
            node.renewed_at = self._clock()
            node.worker_state = _worker_state(answer)
            return
        if 400 <= status < 500:
            # The peer knows no such hold (or refuses us now): its worker is gone.
            self._lose(run, node, HoldFailure.LOST, _message(answer))
        elif self._clock() - node.renewed_at >= ttl:
            self._lose(run, node, HoldFailure.UNREACHABLE,
                       f"no renewal answered for {ttl:g}s (holdTtl; last: "
                       f"{_message(answer)}): the peer has stopped the worker by now")

    def _lose(self, run: _Run, node: _Node, reason: HoldFailure, detail: str) -> None:
        node.state, node.error = NodeState.LOST, detail
        self._on_held(node.peer, run.model, False)
        self._on_failure(node.peer, str(reason))
        if not run.lost.done():
            run.lost.set_result(
                f"cluster worker {node.worker!r} on peer {node.peer!r} is gone: {detail}")

    async def _release_one(self, run: _Run, node: _Node) -> None:
        if node.state != NodeState.HELD or node.hold_id is None:
            return
        node.state = NodeState.RELEASED
        self._on_held(node.peer, run.model, False)
        with contextlib.suppress(HoldFailed):
            peer, headers = self._peer(run, node)
            await self._call("DELETE", f"{peer.proxy}{HOLDS_PATH}/{node.hold_id}", headers,
                             None, RELEASE_TIMEOUT, node)

    async def _call(self, method: str, url: str, headers: dict[str, str], body: Any,
                    timeout: float, node: _Node) -> tuple[int, Any]:
        try:
            async with self._http().request(
                method, url, json=body, headers=headers, allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=timeout, connect=min(timeout, 10.0)),
            ) as resp:
                raw = await resp.content.read(MAX_ANSWER)
                try:
                    answer = json.loads(raw) if raw else None
                except ValueError:
                    answer = raw.decode("utf-8", "replace")
                return resp.status, answer
        except TimeoutError:
            raise HoldFailed(node.peer, node.worker, HoldFailure.TIMEOUT,
                             f"no answer within {timeout:g}s") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise HoldFailed(node.peer, node.worker, HoldFailure.UNREACHABLE,
                             f"cannot reach {url.split('/api/')[0]}: "
                             f"{type(exc).__name__}") from None


def _message(answer: Any) -> str:
    """The peer's error message, bounded and cleaned: it reaches clients and logs."""
    text = answer
    if isinstance(answer, dict):
        error = answer.get("error")
        text = error.get("message") if isinstance(error, dict) else error
    return clean_line(str(text if text is not None else "no message"))[:MAX_ECHO]


def _worker_state(answer: Any) -> str | None:
    hold = answer.get("hold") if isinstance(answer, dict) else None
    state = hold.get("worker_state") if isinstance(hold, dict) else None
    return state[:32] if isinstance(state, str) and state.isidentifier() else None


def _hold_id(answer: Any) -> str | None:
    hold = answer.get("hold") if isinstance(answer, dict) else None
    hold_id = hold.get("id") if isinstance(hold, dict) else None
    if isinstance(hold_id, str) and 0 < len(hold_id) <= 64 and hold_id.isascii() \
            and all(c.isalnum() or c in "-_" for c in hold_id):
        return hold_id
    return None
