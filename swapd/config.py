"""Configuration: llama-swap's YAML format, loaded into frozen dataclasses.

Everything here is immutable once loaded; a reload builds a new `Config` and the
scheduler compares `ModelConfig`s by equality to decide which engines keep running.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class EngineKind(StrEnum):
    VLLM = "vllm"
    LLAMA_CPP = "llama.cpp"
    SGLANG = "sglang"
    TRTLLM = "trtllm"
    OLLAMA = "ollama"


class ConfigError(Exception):
    """A config that cannot be used. `str()` is the full user-facing message."""

    def __init__(self, message: str, *, file: str | None = None, key_path: str | None = None):
        self.file = file
        self.key_path = key_path
        self.detail = message
        parts = []
        if file:
            parts.append(f"{file}:")
        if key_path:
            parts.append(f"{key_path}:")
        parts.append(message)
        super().__init__(" ".join(parts))


@dataclass(frozen=True)
class RestartPolicy:
    max_retries: int = 3
    backoff_initial: float = 1.0
    backoff_max: float = 60.0


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
    # Environment variables the engine must not inherit from swapd (preset hygiene).
    env_remove: tuple[str, ...] = ()

    @property
    def port(self) -> int | None:
        from urllib.parse import urlsplit

        return urlsplit(self.proxy).port


@dataclass(frozen=True)
class GroupConfig:
    name: str
    swap: bool = True
    exclusive: bool = True
    persistent: bool = False
    members: tuple[str, ...] = ()


@dataclass(frozen=True)
class Config:
    models: dict[str, ModelConfig]
    groups: tuple[GroupConfig, ...] = ()
    listen: str = "127.0.0.1:28080"
    api_keys: tuple[str, ...] = ()
    admin_keys: tuple[str, ...] = ()
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
    # Where the file came from: `include` globs resolve relative to it.
    source: str | None = None

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
