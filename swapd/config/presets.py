"""Engine presets: what `engine: vllm` (or llama.cpp, sglang, trtllm, ollama) means.

A preset only supplies defaults. The config loader applies one to a recipe that names its
engine, and only for keys the recipe leaves out: a recipe's own `checkEndpoint`,
`healthCheckTimeout`, `unloadTimeout`, `env` and `cmdStop` always win. A preset is more
specific than the file-wide `healthCheckTimeout` / `unloadTimeout` (it is written on the
model), so for the models that name an engine it stands in for those globals.

The values are sized for a DGX Spark (GB10, 128 GB unified memory): a cold start reads tens of
gigabytes from disk, compiles kernels and captures CUDA graphs, which takes minutes, and an
engine that holds most of the machine's memory needs seconds to give it back cleanly.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum


@dataclass(frozen=True)
class Call:
    """One HTTP call to the engine's own port: an item of llmsnap's `sleepEndpoints` /
    `wakeEndpoints` (`{endpoint, method, body, timeout}`). It must answer 2xx."""

    path: str  # `endpoint`: a path on the engine's own address, never another host
    method: str = "POST"
    body: str | None = None  # sent as application/json when given
    timeout: float = 0.0  # seconds; 0: the model's sleepTimeout


class EngineKind(StrEnum):
    VLLM = "vllm"
    LLAMA_CPP = "llama.cpp"
    SGLANG = "sglang"
    TRTLLM = "trtllm"
    OLLAMA = "ollama"


# `engine:` as people write it: the canonical names and the usual spellings of each.
ENGINE_NAMES: dict[str, EngineKind] = {kind.value: kind for kind in EngineKind} | {
    "llamacpp": EngineKind.LLAMA_CPP,
    "llama-cpp": EngineKind.LLAMA_CPP,
    "llama-server": EngineKind.LLAMA_CPP,
    "trt-llm": EngineKind.TRTLLM,
    "tensorrt-llm": EngineKind.TRTLLM,
}


def engine_kind(name: str) -> EngineKind | None:
    """The engine an `engine:` value names, None when it names none."""
    return ENGINE_NAMES.get(name.strip().lower())

# Python engines write their logs through stdout; piped, that is block-buffered, and lines
# would reach `/logs/stream` in 8 KiB bursts (or never, if the engine is SIGKILLed).
_PY_ENV = (("PYTHONUNBUFFERED", "1"),)
# swapd's own interpreter settings must not leak into an engine that runs another Python
# (its own venv or container): PYTHONHOME breaks the interpreter, PYTHONPATH shadows packages.
_PY_REMOVE = ("PYTHONHOME", "PYTHONPATH")


@dataclass(frozen=True)
class Preset:
    engine: EngineKind
    # GET this path until it answers 200; None: until the port accepts a connection.
    check_endpoint: str | None
    health_check_timeout: float  # seconds: a cold start on a Spark
    unload_timeout: float  # seconds between SIGTERM and SIGKILL to the group
    env: tuple[tuple[str, str], ...] = ()
    # Variables of swapd's environment the engine does not inherit. A trailing `*` matches
    # a prefix. The recipe's `env` may still set any of them.
    env_remove: tuple[str, ...] = ()
    # POSTed to the engine before it is signalled (best effort); the body names the model.
    unload_path: str | None = None
    # `sleepMode: enable` without endpoints of its own: how this engine frees its memory and
    # takes it back (docs/sleep.md). Empty: the engine cannot sleep, it is stopped.
    sleep: tuple[Call, ...] = ()
    wake: tuple[Call, ...] = ()

    def unload_request(self, model_name: str) -> tuple[str, str] | None:
        """(path, JSON body) to send before stopping, or None."""
        if self.unload_path is None:
            return None
        return self.unload_path, json.dumps({"model": model_name, "keep_alive": 0})


# vLLM's level 2 (needs `--enable-sleep-mode` and VLLM_SERVER_DEV_MODE=1): weights and KV
# cache are dropped. Level 1 would "offload" the weights to CPU memory, which on a GB10 is the
# same memory: it frees nothing there. Level 2 wakes in three calls: wake_up allocates again,
# reload_weights reads the weights back, reset_prefix_cache drops what the old cache indexed.
VLLM_SLEEP = (Call("/sleep?level=2"),)
VLLM_WAKE = (
    Call("/wake_up"),
    Call("/collective_rpc", body='{"method": "reload_weights"}'),
    Call("/reset_prefix_cache"),
)
# SGLang: release discards weights and KV cache, resume reloads them.
SGLANG_SLEEP = (Call("/release_memory_occupation", body="{}"),)
SGLANG_WAKE = (Call("/resume_memory_occupation", body="{}"),)

PRESETS: dict[EngineKind, Preset] = {
    EngineKind.VLLM: Preset(
        engine=EngineKind.VLLM,
        check_endpoint="/health",
        health_check_timeout=1200.0,
        unload_timeout=30.0,
        env=_PY_ENV,
        # A VLLM_PORT inherited from elsewhere (a service named `vllm` in Kubernetes sets
        # VLLM_PORT=tcp://...) is read by vLLM as its internal port and breaks start-up.
        env_remove=("VLLM_PORT", *_PY_REMOVE),
        sleep=VLLM_SLEEP,
        wake=VLLM_WAKE,
    ),
    EngineKind.LLAMA_CPP: Preset(
        engine=EngineKind.LLAMA_CPP,
        check_endpoint="/health",
        health_check_timeout=600.0,
        unload_timeout=10.0,
        # llama-server reads LLAMA_ARG_* as defaults for every flag the command line leaves
        # out: a stray LLAMA_ARG_MODEL or LLAMA_ARG_PORT in swapd's environment would change
        # every recipe at once. Put them in the recipe's `env` if they are meant.
        env_remove=("LLAMA_ARG_*",),
    ),
    EngineKind.SGLANG: Preset(
        engine=EngineKind.SGLANG,
        check_endpoint="/health",
        health_check_timeout=1200.0,
        unload_timeout=30.0,
        env=_PY_ENV,
        env_remove=_PY_REMOVE,
        sleep=SGLANG_SLEEP,
        wake=SGLANG_WAKE,
    ),
    # trtllm-serve: release/resume exist only in some versions, under names that changed; a
    # recipe names them in sleepEndpoints/wakeEndpoints, else the engine is stopped.
    EngineKind.TRTLLM: Preset(
        engine=EngineKind.TRTLLM,
        check_endpoint="/health",
        health_check_timeout=1200.0,
        unload_timeout=30.0,
        env=_PY_ENV,
        env_remove=_PY_REMOVE,
    ),
    EngineKind.OLLAMA: Preset(
        engine=EngineKind.OLLAMA,
        # `ollama serve` answers GET / ("Ollama is running") at once and loads a model on
        # its first request: readiness is the server, the first request pays the load.
        check_endpoint="/",
        health_check_timeout=300.0,
        unload_timeout=15.0,
        env=(
            # swapd decides what is resident: one model per Ollama server, kept until
            # swapd stops it (Ollama's own 5-minute expiry would unload it behind
            # swapd's back and make the next request pay a reload).
            ("OLLAMA_MAX_LOADED_MODELS", "1"),
            ("OLLAMA_KEEP_ALIVE", "-1"),
        ),
        # The recipe says where this server listens (env OLLAMA_HOST=127.0.0.1:${PORT});
        # an OLLAMA_HOST meant for the ollama CLI must not move the server elsewhere.
        env_remove=("OLLAMA_HOST",),
        unload_path="/api/generate",
    ),
}


def preset_for(engine: EngineKind | None) -> Preset | None:
    return None if engine is None else PRESETS[engine]


# -- precedence: the recipe, then the preset, then the file-wide value ----------------------


@dataclass(frozen=True)
class Recipe:
    """What a recipe itself says about the keys a preset has defaults for; None: left out."""

    check_endpoint: str | None = None  # as written ("none" included)
    health_check_timeout: float | None = None
    # 0 means "the file-wide value" (llama-swap's meaning), as left out without a preset.
    unload_timeout: float | None = None
    env: Mapping[str, str] | None = None
    has_cmd_stop: bool = False
    model_name: str = ""  # the name the engine knows the model by (useModelName or the id)


@dataclass(frozen=True)
class FileWide:
    """The file's top-level values a preset stands in for."""

    health_check_timeout: float
    unload_timeout: float


@dataclass(frozen=True)
class Settled:
    """A model's values once the recipe, its preset and the file have had their say."""

    check_endpoint: str  # as written; the loader reads "none" and adds a leading '/'
    health_check_timeout: float
    unload_timeout: float
    env: tuple[tuple[str, str], ...]
    env_remove: tuple[str, ...]
    unload_request: tuple[str, str] | None


def settle(engine: EngineKind | None, recipe: Recipe, file: FileWide) -> Settled:
    """The precedence rules (docs/recipes.md): a recipe's own value always wins; a preset
    fills in what it leaves out; the file-wide value comes last, since a preset is written
    on the model and so more specific."""
    preset = preset_for(engine)
    check = recipe.check_endpoint
    if check is None:
        check = (preset.check_endpoint or "none") if preset else "/health"
    hct = recipe.health_check_timeout
    if hct is None:
        hct = preset.health_check_timeout if preset else file.health_check_timeout
    grace = recipe.unload_timeout
    if grace is None and preset is not None:
        grace = preset.unload_timeout
    elif grace is None or grace <= 0:
        grace = file.unload_timeout
    env = dict(recipe.env or {})
    preset_env = tuple((k, v) for k, v in preset.env if k not in env) if preset else ()
    unload = None
    if preset is not None and not recipe.has_cmd_stop:  # cmdStop: the recipe says how to stop
        unload = preset.unload_request(recipe.model_name)
    return Settled(
        check_endpoint=check,
        health_check_timeout=hct,
        unload_timeout=grace,
        env=(*preset_env, *env.items()),
        env_remove=preset.env_remove if preset else (),
        unload_request=unload,
    )
