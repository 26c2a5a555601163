"""The configuration as loaded: frozen dataclasses, immutable once built.

A reload builds a new `Config` and the scheduler compares `ModelConfig`s by equality to
decide which engines keep running. Nothing here reads a file: swapd.config.loader does.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any
from urllib.parse import urlsplit

from swapd.config.presets import Call, EngineKind
from swapd.config.sizes import DEFAULT_FLOOR, Floor, GiB
from swapd.placement.matrix import Program


@dataclass(frozen=True)
class RestartPolicy:
    max_retries: int = 3
    backoff_initial: float = 1.0
    backoff_max: float = 60.0


@dataclass(frozen=True)
class SleepPolicy:
    """`sleepMode: enable` with the calls that put this engine to sleep and wake it (the
    recipe's `sleepEndpoints`/`wakeEndpoints`, else its engine's preset): on a swap or a ttl
    the engine sleeps instead of stopping, verified by memory (docs/sleep.md)."""

    sleep: tuple[Call, ...]
    wake: tuple[Call, ...]
    # What must come back for the sleep to count: bytes, else this percent of the learned
    # footprint (`sleepMinFreed`, default 50 %).
    min_freed: int | None = None
    min_freed_percent: float = 50.0
    timeout: float = 30.0  # sleepTimeout: seconds for the calls and the memory to come back
    ttl: float = 0.0  # sleepTtl: seconds asleep before it is stopped; 0 = while memory allows

    def min_freed_of(self, footprint: int) -> int:
        """The bytes a sleep must free, given the engine's footprint (learned or measured)."""
        if self.min_freed is not None:
            return self.min_freed
        return int(footprint * self.min_freed_percent / 100)


@dataclass(frozen=True)
class ClusterConfig:
    """A head model's `cluster:` (docs/two-sparks.md): before its engine starts, each peer
    named here holds the worker recipe of its own config named beside it; the head renews
    every hold each `hold_ttl`/3 seconds, and a peer stops a worker whose hold went
    `hold_ttl` seconds unrenewed."""

    nodes: tuple[tuple[str, str], ...]  # (peer id in `peers:`, worker model id on that peer)
    hold_ttl: float = 15.0


@dataclass(frozen=True)
class ModelConfig:
    id: str
    # argv after macro expansion; never passed through a shell.
    cmd: tuple[str, ...]
    # argv with "${PID}" still in it: the pid is only known at stop time.
    cmd_stop: tuple[str, ...] | None = None
    proxy: str = "http://127.0.0.1:5800"
    # None means `checkEndpoint: none`: ready once the port accepts connections.
    check_endpoint: str | None = "/health"
    ttl: float = 0.0  # seconds of idleness before eviction; 0 = never
    unload_timeout: float = 10.0  # SIGTERM → SIGKILL grace
    env: tuple[tuple[str, str], ...] = ()
    aliases: tuple[str, ...] = ()
    use_model_name: str | None = None
    unlisted: bool = False
    name: str | None = None
    description: str | None = None
    metadata: Any = None  # JSON-able, passed through in /v1/models
    concurrency_limit: int = 0  # 0 = unlimited
    strip_params: tuple[str, ...] = ()
    set_params: Any = None  # dict of JSON values or None
    send_loading_state: bool = False
    engine: EngineKind | None = None
    gpu: bool = True
    health_check_timeout: float = 120.0
    restart: RestartPolicy = field(default_factory=RestartPolicy)
    memory_release_timeout: float = 30.0
    # llama-swap's `swappable: false` (its #1127): a request for another model never stops
    # this one; unload, its ttl and the memory guard still do.
    swappable: bool = True
    # Environment variables the engine must not inherit from swapd (preset hygiene).
    env_remove: tuple[str, ...] = ()
    # (path, JSON body) POSTed to the engine before it is signalled to stop (best effort):
    # the ollama preset's unload with `keep_alive: 0`. None: nothing is sent.
    unload_request: tuple[str, str] | None = None
    # Forward the client's Authorization / x-api-key to the engine although swapd has keys
    # of its own (they are meant for swapd and removed otherwise): `forwardClientAuth`.
    forward_client_auth: bool = False
    # llama-swap's per-model client `timeouts`; None: swapd's shared client.
    timeouts: Timeouts | None = None
    capabilities: Capabilities | None = None
    # requested id → params set after setParams (filters.setParamsByID); its keys other
    # than the model id are aliases too.
    set_params_by_id: Any = None
    # The engine's footprint in bytes (`memory: "70GiB"`); None: learned (swapd/footprints.py).
    # A placement hint, not how the engine runs: changing it does not restart the engine.
    memory: int | None = field(default=None, compare=False)
    # `sleepMode: enable`: sleep instead of stopping on a swap or ttl; None: stopped as always.
    sleep: SleepPolicy | None = None
    # `clusterWorker: true`: run only while a head on a peer holds it (POST
    # /api/cluster/holds); never started by a request, never listed.
    cluster_worker: bool = False
    # `cluster:` of a head model: the workers peers hold for it.
    cluster: ClusterConfig | None = None

    @property
    def port(self) -> int | None:
        return urlsplit(self.proxy).port


@dataclass(frozen=True)
class GroupConfig:
    name: str
    swap: bool = True
    exclusive: bool = True
    persistent: bool = False
    members: tuple[str, ...] = ()


@dataclass(frozen=True)
class MemoryGuardConfig:
    """`memoryGuard`: kill the engine that pushes MemAvailable below `floor`."""

    enabled: bool = True
    floor: Floor = DEFAULT_FLOOR


class KeyRole(StrEnum):
    """What a key opens (docs/keys.md): each role includes the one before it."""

    INFERENCE = "inference"  # the inference API and /upstream
    OPERATOR = "operator"  # + operations routes and the status page (/running, /status, …)
    ADMIN = "admin"  # + recipes (/admin/recipes: writing one runs a command)


@dataclass(frozen=True)
class KeyConfig:
    """One key of `keys:` (named), or an entry of `apiKeys`/`adminKeys` (unnamed: its name
    is its key path, `apiKeys[0]`). Only the SHA-256 of the secret is kept."""

    name: str
    sha256: bytes  # digest of the key as a client presents it
    role: KeyRole = KeyRole.INFERENCE
    models: tuple[str, ...] | None = None  # globs over model ids and aliases; None: all
    peers: tuple[str, ...] | None = None  # globs over peer ids and "peer/model"; None: all
    max_concurrent: int = 0  # 0: no limit
    requests_per_minute: int = 0
    tokens_per_day: int = 0
    expires: float | None = None  # Unix time from which the key is refused (401)
    swap: bool = True  # False: only models already running (else 409)
    named: bool = True  # False: an entry of apiKeys/adminKeys

    @property
    def limited(self) -> bool:
        return bool(self.max_concurrent or self.requests_per_minute or self.tokens_per_day)


@dataclass(frozen=True)
class Config:
    models: dict[str, ModelConfig]
    groups: tuple[GroupConfig, ...] = ()
    # routing.router.settings.memory.reserve: kept free for the OS by the memory router.
    memory_reserve: int = 8 * GiB
    memory_guard: MemoryGuardConfig = field(default_factory=MemoryGuardConfig)
    listen: str = "127.0.0.1:28080"
    api_keys: tuple[str, ...] = ()
    admin_keys: tuple[str, ...] = ()
    # `keys:` in file order, then apiKeys and adminKeys as unnamed keys: every key swapd
    # accepts, by the SHA-256 of its secret (swapd.http.keys looks a presented key up here).
    keys: Mapping[bytes, KeyConfig] = field(default_factory=dict)
    state_dir: str | None = None
    log_level: str = "info"
    health_check_timeout: float = 120.0
    start_port: int = 5800
    global_ttl: float = 0.0
    unload_timeout: float = 10.0
    include_aliases_in_list: bool = False
    send_loading_state: bool = False
    preload: tuple[str, ...] = ()
    max_queue: int = 256
    queue_timeout: float = 180.0
    shutdown_timeout: float = 30.0
    log_buffer_lines: int = 2000
    max_body_bytes: int = 64 * 1024 * 1024
    include: str | None = None
    # Host names accepted besides IP addresses, loopback names and this machine's names.
    allowed_hosts: tuple[str, ...] = ()
    # Origins whose pages may call the inference routes (CORS); "*" is any.
    cors_allow_origins: tuple[str, ...] = ("*",)
    # llama-swap's globalConcurrencyLimit: inference requests served at once, every model
    # together (429 past it); 0: no limit.
    global_concurrency_limit: int = 0
    # hooks.on_startup.profile: the profile active at startup and after each reload.
    startup_profile: str | None = None
    # metrics.llamaSwapNames: /metrics also carries llama-swap's llamaswap_* series.
    llamaswap_metric_names: bool = False
    # Seconds a request body may take to arrive in full (a trickling client gets 408).
    body_timeout: float = 60.0
    # Seconds a new connection may take to send a complete request header (408 after).
    header_timeout: float = 10.0
    # Seconds a client may accept no byte of its answer before it is cut (499), so that a
    # client that never reads cannot hold its engine (and the tenant) forever.
    write_timeout: float = 60.0
    # Activity records (the /ui activity panel, /api/activity, token metrics): ring size
    # (0 turns them off), whether to ask engines for usage in streams, SQLite under stateDir.
    activity_size: int = 1000
    activity_inject_usage: bool = False
    activity_store: bool = False
    activity_retention_days: float = 7.0
    # llama-swap's captureBuffer (MB of request/response bodies kept); 0 = off.
    capture_buffer_mb: float = 0.0
    # llama-swap's ui.activity.session_id: request headers naming a client's session.
    session_headers: tuple[str, ...] = ("X-Session-ID", "X-Litellm-Session-Id")
    # Where the file came from: `include` globs resolve relative to it.
    source: str | None = None
    # When it was loaded (wall clock): /v1/models' `created`.
    loaded_at: float = 0.0
    # Global macros in file order, ${env.*} already substituted, other references not yet:
    # each model resolves them again with its own MODEL_ID, PORT and overrides.
    macros: tuple[tuple[str, Any], ...] = ()
    # llama-swap's routing keys (swapd/config_routing.py loads them).
    router: RouterKind | str = "group"
    matrix: Program | None = None
    priority: Mapping[str, int] = field(default_factory=dict)  # model id → fifo priority
    selectors: Mapping[str, SelectorConfig] = field(default_factory=dict)
    profiles: Mapping[str, ProfileConfig] = field(default_factory=dict)
    peers: Mapping[str, PeerConfig] = field(default_factory=dict)
    # request name → (peer id, the peer's model id): "<peer>/<model>", and the bare
    # model when exactly one peer has it and no local id or alias is so named.
    peer_routes: Mapping[str, tuple[str, str]] = field(default_factory=dict)
    ignore_paths: tuple[re.Pattern[str], ...] = ()  # upstream.ignorePaths
    log_to_stdout: LogToStdout | str = "both"
    gpu_sampling: bool = True  # performance.disabled: false

    def resolve(self, name: str) -> ModelConfig | None:
        """The model a request's `model` names: an id first, then an alias."""
        found = self.models.get(name)
        if found is not None:
            return found
        for model in self.models.values():
            if name in model.aliases:
                return model
        return None


@dataclass(frozen=True)
class LoadResult:
    config: Config
    warnings: tuple[str, ...] = ()


# -- llama-swap's routing keys (swapd.config.routing loads them) --


@dataclass(frozen=True)
class Timeouts:
    """Upstream client timeouts in seconds, llama-swap's `timeouts`; 0 disables one."""

    connect: float = 30.0
    keepalive: float = 30.0
    response_header: float = 0.0
    tls_handshake: float = 10.0
    idle_conn: float = 90.0


MODEL_TIMEOUTS = Timeouts()
# llama-swap's peer default keeps a 60 s response-header limit (its PR #619).
PEER_TIMEOUTS = Timeouts(response_header=60.0)

MODALITIES = ("text", "audio", "image")


@dataclass(frozen=True)
class Capabilities:
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    tools: bool = False
    reranker: bool = False
    context: int = 0


class Strategy(StrEnum):
    WARM = "warm"
    PIN = "pin"
    SPILLOVER = "spillover"


@dataclass(frozen=True)
class SelectorConfig:
    id: str
    strategy: Strategy
    targets: tuple[str, ...]
    spillover: int = 1
    name: str | None = None
    description: str | None = None
    metadata: Any = None
    unlisted: bool = False


@dataclass(frozen=True)
class ProfileConfig:
    id: str
    # pin name → target; None: the pin answers 404 (`~` or "")
    pins: tuple[tuple[str, str | None], ...]
    description: str | None = None

    def pin(self, name: str) -> tuple[bool, str | None]:
        for pin, target in self.pins:
            if pin == name:
                return True, target
        return False, None


@dataclass(frozen=True)
class PeerConfig:
    id: str
    proxy: str  # base URL; the request's path is appended
    models: tuple[str, ...]
    api_key: str | None = None
    # The environment variable `apiKey` names but that was unset at load: the peer is
    # listed, and its requests are refused with that said rather than sent without a key.
    api_key_unset: str | None = None
    timeouts: Timeouts = PEER_TIMEOUTS
    strip_params: tuple[str, ...] = ()
    set_params: Any = None
    set_params_by_id: Any = None


class RouterKind(StrEnum):
    GROUP = "group"
    MATRIX = "matrix"
    MEMORY = "memory"  # placement by measured memory (docs/memory.md)


class LogToStdout(StrEnum):
    PROXY = "proxy"
    UPSTREAM = "upstream"
    BOTH = "both"
    NONE = "none"


@dataclass(frozen=True)
class Routing:
    """What `load_config` adds to `Config` from the keys above (field name → value)."""

    router: RouterKind = RouterKind.GROUP
    matrix: Program | None = None
    memory_reserve: int = 8 * GiB  # routing.router.settings.memory.reserve
    priority: Mapping[str, int] = field(default_factory=dict)
    selectors: Mapping[str, SelectorConfig] = field(default_factory=dict)
    profiles: Mapping[str, ProfileConfig] = field(default_factory=dict)
    peers: Mapping[str, PeerConfig] = field(default_factory=dict)
    peer_routes: Mapping[str, tuple[str, str]] = field(default_factory=dict)
    ignore_paths: tuple[re.Pattern[str], ...] = ()
    log_to_stdout: LogToStdout = LogToStdout.BOTH
    gpu_sampling: bool = True
