"""Prometheus metrics: the registry and every ``swapd_*`` series (docs/observability.md).

Request and engine metrics are ordinary prometheus-client metrics updated by the proxy and the
scheduler hooks in `swapd.app`. GPU and engine-memory series come from `_SampleCollector`,
which turns the sampler's last sample into metric families at scrape time: a scrape never
calls NVML or psutil (those run in the sampler's thread, see `swapd.gpu`).

Every configured model gets its `swapd_requests_total` series at zero for each code swapd
itself answers with, and its `swapd_stream_errors_total`, from `register_models`: `rate()` and
`increase()` then count the first error too. Everything else of a model (histograms, gauges,
engine lifecycle counters) is created on its first request or engine start, so that a scrape
stays small with a thousand configured recipes (docs/benchmarks.md, "/metrics").
`forget_model` drops a model removed by reload.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Final, Protocol

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from swapd import __version__
from swapd.config.types import KeyConfig
from swapd.memory.gpu import Sample
from swapd.observe.llamaswap_metrics import LlamaSwapCollector
from swapd.placement.by_memory import EVICTION_REASONS

# The `*_created` series double the series count and no dashboard uses them. (A process-wide
# switch of prometheus-client; swapd is the only exporter in its process.)
disable_created_metrics()  # type: ignore[no-untyped-call]

ENGINE_STATES: Final = ("stopped", "starting", "ready", "stopping", "failed", "sleeping",
                        "waking")
START_RESULTS: Final = ("success", "failure")
# swapd_engine_sleeps_total{result} (swapd.schedule.phase.SleepResult) and wakes_total.
SLEEP_RESULTS: Final = ("slept", "no_memory_freed", "failed")
WAKE_RESULTS: Final = ("woken", "failed")
STOP_REASONS: Final = ("idle", "swap", "unload", "crash", "shutdown", "reload", "memory_guard",
                       "release")
# The codes swapd itself answers a routed request with: 200 (relayed), 429 concurrencyLimit,
# 499 client gone, 502 engine failed, 503 start failed / queue full / shutting down, 504 queue
# timeout. Each configured model has these at zero. (An engine's own 4xx/5xx are relayed and
# appear on first use.)
MODEL_CODES: Final = ("200", "429", "499", "502", "503", "504")
# Answers given before a request reaches a model, counted under model="": a malformed body
# (400), no or a wrong API key (401), an unknown model (404), a body over maxBodyBytes (413).
UNROUTED_CODES: Final = ("400", "401", "404", "413")

# fmt: off
# Whole LLM requests: from a 50 ms embedding to a 10-minute reasoning stream.
REQUEST_BUCKETS: Final = (
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0,
)
# Time to first byte: a warm engine answers in tens of ms; a cold start on a Spark (vLLM loading
# 100 GB) takes minutes before the first byte, and TTFB includes it.
TTFB_BUCKETS: Final = (
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
)
# Engine cold starts: llama-server in seconds, vLLM 60 s to 10+ min; healthCheckTimeout can be
# set to 30 min.
START_BUCKETS: Final = (
    1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 90.0, 120.0, 180.0, 300.0, 450.0, 600.0, 900.0,
    1200.0, 1800.0,
)
# A wake: a stand-in's tenth of a second to a Spark's vLLM reloading its weights (seconds).
WAKE_BUCKETS: Final = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
# Time to first token: a warm engine's prefill (tens of ms) to a long prompt on a cold start.
TTFT_BUCKETS: Final = (
    0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
)
# Tokens per second: decode from a few (a 200B model on a Spark) to hundreds; prefill to tens of
# thousands.
DECODE_TPS_BUCKETS: Final = (
    1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 75.0, 100.0, 150.0, 200.0, 300.0, 500.0,
)
PREFILL_TPS_BUCKETS: Final = (
    10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2000.0, 4000.0, 8000.0, 16000.0, 32000.0, 64000.0,
)
# fmt: on
TOKEN_KINDS: Final = ("prompt", "completion", "cached")


class SampleSource(Protocol):
    """What the collector reads: `swapd.gpu.Sampler`, or a stand-in in tests."""

    def latest(self) -> Sample: ...


class MemoryGauges(Protocol):
    """What the memory collector reads: `swapd.memwatch.MemoryWatch`, or a stand-in."""

    def available_bytes(self) -> int | None: ...

    def peaks(self) -> dict[str, int]: ...


class _MemoryCollector(Collector):
    """MemAvailable as the guard last read it, and each engine's peak memory."""

    def __init__(self) -> None:
        self.source: MemoryGauges | None = None

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        source = self.source
        if source is None:
            return []
        out: list[Metric] = []
        available = source.available_bytes()
        if available is not None:
            out.append(GaugeMetricFamily(
                "swapd_memory_available_bytes",
                "MemAvailable from /proc/meminfo (on GB10, what the GPU can still have).",
                value=available,
            ))
        peak = GaugeMetricFamily(
            "swapd_engine_memory_peak_bytes",
            "Peak of an engine run's process-tree RSS plus NVML GPU memory (current or last run).",
            labels=["model"],
        )
        for model, value in sorted(source.peaks().items()):
            peak.add_metric([model], value)
        if peak.samples:
            out.append(peak)
        return out


class _SampleCollector(Collector):
    """Yields the GPU and per-engine memory series of the sampler's last sample."""

    def __init__(self) -> None:
        self.sampler: SampleSource | None = None

    def describe(self) -> Iterable[Metric]:
        # Names vary with what the sampler found; nothing to check at registration.
        return []

    def collect(self) -> Iterable[Metric]:
        sampler = self.sampler
        if sampler is None:
            return []
        return list(sample_families(sampler.latest()))


def sample_families(sample: Sample) -> Iterator[Metric]:
    """Metric families for one sample; a family with no series is not emitted."""
    rss = GaugeMetricFamily(
        "swapd_engine_resident_memory_bytes",
        "Resident memory of an engine's whole process group.",
        labels=["model"],
    )
    for model, value in sorted(sample.group_rss_bytes.items()):
        rss.add_metric([model], value)
    gpu_mem = GaugeMetricFamily(
        "swapd_engine_gpu_memory_bytes",
        "GPU memory NVML attributes to an engine's process group (where NVML reports it).",
        labels=["model"],
    )
    for model, value in sorted(sample.group_gpu_bytes.items()):
        gpu_mem.add_metric([model], value)

    used = GaugeMetricFamily(
        "swapd_gpu_memory_used_bytes",
        "GPU memory in use (GB10: system MemTotal - MemAvailable, see swapd_gpu_info).",
        labels=["gpu"],
    )
    total = GaugeMetricFamily("swapd_gpu_memory_total_bytes", "GPU memory in all.", labels=["gpu"])
    temperature = GaugeMetricFamily(
        "swapd_gpu_temperature_celsius", "GPU temperature.", labels=["gpu"]
    )
    power = GaugeMetricFamily("swapd_gpu_power_watts", "GPU power draw.", labels=["gpu"])
    energy = CounterMetricFamily(
        "swapd_gpu_energy_joules",
        "Energy the GPU used since the driver was loaded.",
        labels=["gpu"],
    )
    utilization = GaugeMetricFamily(
        "swapd_gpu_utilization_ratio",
        "Fraction of the last sample period a kernel ran on the GPU.",
        labels=["gpu"],
    )
    info = GaugeMetricFamily(
        "swapd_gpu_info",
        "GPU identity; memory_source is nvml, or meminfo where memory is unified (GB10).",
        labels=["gpu", "name", "uuid", "driver", "memory_source"],
    )
    for g in sample.gpus:
        gpu = str(g.index)
        used.add_metric([gpu], g.memory_used_bytes)
        total.add_metric([gpu], g.memory_total_bytes)
        if g.temperature_celsius is not None:
            temperature.add_metric([gpu], g.temperature_celsius)
        if g.power_watts is not None:
            power.add_metric([gpu], g.power_watts)
        if g.energy_joules is not None:
            energy.add_metric([gpu], g.energy_joules)
        if g.utilization_ratio is not None:
            utilization.add_metric([gpu], g.utilization_ratio)
        info.add_metric([gpu, g.name, g.uuid, g.driver, g.memory_source], 1)
    for family in (rss, gpu_mem, used, total, temperature, power, energy, utilization, info):
        if family.samples:
            yield family


class ModelSeries:
    """One model's per-request series, resolved once.

    ``labels()`` takes a lock and builds a key on every call, and the proxy updates five
    series on every request: it keeps these children instead (see docs/benchmarks.md).
    """

    __slots__ = (
        "_codes", "_model", "_requests", "cached_tokens", "completion_tokens", "decode_tps",
        "inflight", "prefill_tps", "prompt_tokens", "queued", "request_duration",
        "stream_errors", "ttfb", "ttft",
    )

    def __init__(self, metrics: Metrics, model: str) -> None:
        self._model = model
        self._requests = metrics.requests_total
        self._codes: dict[int, Counter] = {}
        self.request_duration = metrics.request_duration.labels(model)
        self.ttfb = metrics.ttfb.labels(model)
        self.inflight = metrics.inflight.labels(model)
        self.queued = metrics.queued.labels(model)
        self.stream_errors = metrics.stream_errors.labels(model)
        self.prompt_tokens = metrics.tokens_total.labels(model, "prompt")
        self.completion_tokens = metrics.tokens_total.labels(model, "completion")
        self.cached_tokens = metrics.tokens_total.labels(model, "cached")
        self.ttft = metrics.ttft.labels(model)
        self.decode_tps = metrics.decode_tps.labels(model)
        self.prefill_tps = metrics.prefill_tps.labels(model)

    def tokens(
        self,
        prompt: int | None,
        completion: int | None,
        cached: int | None,
        ttft: float | None,
        prefill_tps: float | None,
        decode_tps: float | None,
    ) -> None:
        """Count one request's tokens and observe its speeds (what the engine reported)."""
        if prompt:
            self.prompt_tokens.inc(prompt)
        if completion:
            self.completion_tokens.inc(completion)
        if cached:
            self.cached_tokens.inc(cached)
        if ttft is not None:
            self.ttft.observe(ttft)
        if prefill_tps is not None:
            self.prefill_tps.observe(prefill_tps)
        if decode_tps is not None:
            self.decode_tps.observe(decode_tps)

    def answered(self, code: int, seconds: float) -> None:
        """Count one request answered with `code` after `seconds`."""
        counter = self._codes.get(code)
        if counter is None:
            counter = self._codes[code] = self._requests.labels(self._model, str(code))
        counter.inc()
        self.request_duration.observe(seconds)


class Metrics:
    """Every swapd metric, in a registry of its own (tests make as many as they like)."""

    def __init__(
        self, registry: CollectorRegistry | None = None, *, version: str = __version__
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests_total = Counter(
            "swapd_requests_total",
            "Inference requests answered, by model and HTTP status code.",
            ["model", "code"],
            registry=r,
        )
        self.request_duration = Histogram(
            "swapd_request_duration_seconds",
            "Time from receiving a request to the end of its response (streams included).",
            ["model"],
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self.ttfb = Histogram(
            "swapd_time_to_first_byte_seconds",
            "Time from receiving a request to its first response byte (cold starts included).",
            ["model"],
            buckets=TTFB_BUCKETS,
            registry=r,
        )
        self.stream_errors = Counter(
            "swapd_stream_errors",
            "Responses cut off after their status line was sent (the engine died mid-stream); "
            "swapd_requests_total counts them under the status the client got.",
            ["model"],
            registry=r,
        )
        self.inflight = Gauge(
            "swapd_inflight_requests",
            "Requests being relayed to the model's engine.",
            ["model"],
            registry=r,
        )
        self.queued = Gauge(
            "swapd_queued_requests",
            "Requests waiting for the model's engine to become ready.",
            ["model"],
            registry=r,
        )
        self.engine_state = Gauge(
            "swapd_engine_state",
            "1 for the engine's current state, 0 for the others.",
            ["model", "state"],
            registry=r,
        )
        self.engine_starts = Counter(
            "swapd_engine_starts_total",
            "Engine starts, by result (success, failure).",
            ["model", "result"],
            registry=r,
        )
        self.engine_start_seconds = Histogram(
            "swapd_engine_start_seconds",
            "Time from spawning an engine to its readiness.",
            ["model"],
            buckets=START_BUCKETS,
            registry=r,
        )
        self.engine_sleeps = Counter(
            "swapd_engine_sleeps_total",
            "Engines put to sleep instead of stopped, by result (slept: memory came back; "
            "no_memory_freed: stopped, sleep off for the recipe; failed: a call failed).",
            ["model", "result"],
            registry=r,
        )
        self.engine_wakes = Counter(
            "swapd_engine_wakes_total",
            "Sleeping engines woken, by result (woken; failed: killed and cold-started).",
            ["model", "result"],
            registry=r,
        )
        self.engine_wake_seconds = Histogram(
            "swapd_engine_wake_seconds",
            "Time from the first wake call to the engine's readiness.",
            ["model"],
            buckets=WAKE_BUCKETS,
            registry=r,
        )
        self.engine_stops = Counter(
            "swapd_engine_stops_total",
            "Engine stops, by reason (idle, swap, unload, crash, shutdown, reload).",
            ["model", "reason"],
            registry=r,
        )
        self.engine_kills = Counter(
            "swapd_engine_kills_total",
            "Stops that had to escalate to SIGKILL.",
            ["model"],
            registry=r,
        )
        self.tokens_total = Counter(
            "swapd_tokens",
            "Tokens of inference requests, by kind (prompt, completion, cached prompt).",
            ["model", "kind"],
            registry=r,
        )
        self.ttft = Histogram(
            "swapd_time_to_first_token_seconds",
            "Time from receiving a streamed request to its first content token.",
            ["model"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.decode_tps = Histogram(
            "swapd_decode_tokens_per_second",
            "Generation speed of a request (the engine's timings, else tokens after the first "
            "over the time since it).",
            ["model"],
            buckets=DECODE_TPS_BUCKETS,
            registry=r,
        )
        self.prefill_tps = Histogram(
            "swapd_prefill_tokens_per_second",
            "Prompt processing speed of a request (the engine's timings, else prompt tokens "
            "over the time to first token).",
            ["model"],
            buckets=PREFILL_TPS_BUCKETS,
            registry=r,
        )
        self.placement_evictions = Counter(
            "swapd_placement_evictions_total",
            "Idle engines the memory router stopped to make room, by reason "
            "(make_room: for a known footprint; unknown_footprint: the next one's is unknown).",
            ["model", "reason"],
            registry=r,
        )
        self.memory_guard_kills = Counter(
            "swapd_memory_guard_kills_total",
            "Engines the memory guard killed because MemAvailable fell below its floor.",
            ["model"],
            registry=r,
        )
        # Cluster holds (docs/two-sparks.md): those this node holds on its peers for its
        # heads, and those it could not have or lost.
        self.cluster_holds = Gauge(
            "swapd_cluster_holds",
            "Cluster holds this node holds on a peer for a head model (1 while held).",
            ["peer", "model"],
            registry=r,
        )
        self.cluster_hold_failures = Counter(
            "swapd_cluster_hold_failures_total",
            "Cluster holds that could not be had or were lost, by peer and reason "
            "(unreachable, timeout, refused, worker_failed, lost, no_key).",
            ["peer", "reason"],
            registry=r,
        )
        # Per key (docs/keys.md): names come from the config, so the series are bounded.
        self.key_requests = Counter(
            "swapd_key_requests_total",
            "Inference requests answered, by key name, model and HTTP status code "
            "(model=\"\" for a request refused before routing).",
            ["key", "model", "code"],
            registry=r,
        )
        self.key_tokens_total = Counter(
            "swapd_key_tokens",
            "Tokens of a key's requests, by kind (prompt, completion; estimated where the "
            "engine reported none).",
            ["key", "kind"],
            registry=r,
        )
        self._key_codes: dict[tuple[str, str, int], Counter] = {}
        self._key_tokens: dict[str, tuple[Counter, Counter]] = {}
        self.build_info = Info("swapd_build", "swapd build information.", registry=r)
        self.build_info.info({"version": version})
        self._collector = _SampleCollector()
        r.register(self._collector)
        # process_* (CPU, memory, fds, start time) and python_*: what any Prometheus job
        # expects of a process, here for swapd itself (engines have swapd_engine_*).
        for standard in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            r.register(standard)
        self._unrouted = {code: self.requests_total.labels("", code) for code in UNROUTED_CODES}
        self._memory = _MemoryCollector()
        r.register(self._memory)
        self._llamaswap: LlamaSwapCollector | None = None
        self._models: set[str] = set()
        self._active: set[str] = set()
        self._series: dict[str, ModelSeries] = {}
        self._counts: Callable[[], Mapping[str, tuple[int, int]]] | None = None

    # -- models ------------------------------------------------------------------------

    def register_models(self, ids: Iterable[str]) -> None:
        """Create the request counters of these models at zero (a no-op for models already
        known); the rest of a model's series come with its first request or start."""
        for model in ids:
            if model in self._models:
                continue
            self._models.add(model)
            for code in MODEL_CODES:
                self.requests_total.labels(model, code)
            self.stream_errors.labels(model)

    def register_cluster(self, heads: Mapping[str, Iterable[str]],
                         reasons: Iterable[str]) -> None:
        """A cluster head's series at zero from the moment it is configured (head model ->
        its peers): a first failed hold must show in rate()."""
        reasons = tuple(reasons)
        for model, peers in heads.items():
            for peer in peers:
                self.cluster_holds.labels(peer, model)
                for reason in reasons:
                    self.cluster_hold_failures.labels(peer, reason)

    def _activate(self, model: str) -> None:
        """A model's first request or engine start: its engine counters at zero from here."""
        self._active.add(model)
        for result in START_RESULTS:
            self.engine_starts.labels(model, result)
        for reason in STOP_REASONS:
            self.engine_stops.labels(model, reason)
        for result in SLEEP_RESULTS:
            self.engine_sleeps.labels(model, result)
        for result in WAKE_RESULTS:
            self.engine_wakes.labels(model, result)
        self.engine_wake_seconds.labels(model)
        self.engine_kills.labels(model)
        for reason in EVICTION_REASONS:
            self.placement_evictions.labels(model, reason)
        self.memory_guard_kills.labels(model)
        self.engine_start_seconds.labels(model)
        for kind in TOKEN_KINDS:
            self.tokens_total.labels(model, kind)

    def series(self, model: str) -> ModelSeries:
        """The per-request series of `model` (created at zero on first use)."""
        found = self._series.get(model)
        if found is None:
            found = self._series[model] = ModelSeries(self, model)
            if model not in self._active:
                self._activate(model)
        return found

    def unrouted(self, code: int) -> None:
        """Count an answer given before the request reached a model (model="")."""
        counter = self._unrouted.get(str(code))
        if counter is None:
            counter = self._unrouted[str(code)] = self.requests_total.labels("", str(code))
        counter.inc()

    def forget_model(self, model: str) -> None:
        """Drop every series of a model (removed from the config by a reload)."""
        self._models.discard(model)
        self._active.discard(model)
        self._series.pop(model, None)
        self.key_requests.remove_by_labels({"model": model})
        for found in [k for k in self._key_codes if k[1] == model]:
            del self._key_codes[found]
        for metric in (
            self.requests_total,
            self.stream_errors,
            self.request_duration,
            self.ttfb,
            self.inflight,
            self.queued,
            self.engine_state,
            self.engine_starts,
            self.engine_start_seconds,
            self.engine_sleeps,
            self.engine_wakes,
            self.engine_wake_seconds,
            self.engine_stops,
            self.engine_kills,
            self.tokens_total,
            self.ttft,
            self.decode_tps,
            self.prefill_tps,
            self.placement_evictions,
            self.memory_guard_kills,
        ):
            metric.remove_by_labels({"model": model})

    # -- keys --------------------------------------------------------------------------

    def register_keys(self, names: Iterable[str]) -> None:
        """The token counters of these keys at zero; those of keys no longer configured
        (a reload) go."""
        names = set(names)
        for gone in [n for n in self._key_tokens if n not in names]:
            del self._key_tokens[gone]
            self.key_tokens_total.remove_by_labels({"key": gone})
            self.key_requests.remove_by_labels({"key": gone})
            for k in [k for k in self._key_codes if k[0] == gone]:
                del self._key_codes[k]
        for name in names:
            self._key_token_pair(name)

    def _key_token_pair(self, name: str) -> tuple[Counter, Counter]:
        pair = self._key_tokens.get(name)
        if pair is None:
            pair = self._key_tokens[name] = (
                self.key_tokens_total.labels(name, "prompt"),
                self.key_tokens_total.labels(name, "completion"),
            )
        return pair

    def key_answered(self, key: KeyConfig | None, model: str, code: int) -> None:
        """Count one request of `key` (nothing without a key)."""
        if key is None:
            return
        found = (key.name, model, code)
        counter = self._key_codes.get(found)
        if counter is None:
            counter = self._key_codes[found] = self.key_requests.labels(
                key.name, model, str(code))
        counter.inc()

    def key_tokens(self, key: KeyConfig, prompt: int, completion: int) -> None:
        prompt_counter, completion_counter = self._key_token_pair(key.name)
        if prompt:
            prompt_counter.inc(prompt)
        if completion:
            completion_counter.inc(completion)

    def set_engine_state(self, model: str, state: str) -> None:
        """One-hot: 1 for `state`, 0 for every other engine state. A model that never ran has
        no state series at all (it is stopped): five gauges × every recipe otherwise."""
        if model not in self._active:
            if state == "stopped":
                return
            self._activate(model)
        states = ENGINE_STATES if state in ENGINE_STATES else (*ENGINE_STATES, state)
        for s in states:
            self.engine_state.labels(model, s).set(1 if s == state else 0)

    # -- GPU / memory --------------------------------------------------------------------

    def attach_sampler(self, sampler: SampleSource | None) -> None:
        """Export the GPU and engine-memory series of `sampler.latest()` from now on."""
        self._collector.sampler = sampler

    def llamaswap_names(self, on: bool) -> None:
        """`metrics.llamaSwapNames`: llama-swap's `llamaswap_*` series beside swapd's from
        now on (or no longer); a reload may turn them either way."""
        if on and self._llamaswap is None:
            sampler = self._collector

            def latest() -> Sample | None:
                return sampler.sampler.latest() if sampler.sampler is not None else None

            self._llamaswap = LlamaSwapCollector(latest)
            self.registry.register(self._llamaswap)
        elif not on and self._llamaswap is not None:
            self.registry.unregister(self._llamaswap)
            self._llamaswap = None

    def attach_memory(self, source: MemoryGauges | None) -> None:
        """Export MemAvailable and engine peak memory from `source` from now on."""
        self._memory.source = source

    def attach_counts(self, source: Callable[[], Mapping[str, tuple[int, int]]] | None) -> None:
        """Set the in-flight and queued gauges from `source()` (model -> (in flight, queued),
        the scheduler's own counts) at each scrape, not twice on every request."""
        self._counts = source

    def _refresh_counts(self) -> None:
        if self._counts is None:
            return
        counts = self._counts()
        for model, (inflight, queued) in counts.items():
            if (inflight or queued) and model in self._models:
                self.series(model)  # a model's first request, still waiting or in flight
        for model, series in self._series.items():
            inflight, queued = counts.get(model, (0, 0))
            series.inflight.set(inflight)
            series.queued.set(queued)

    # -- exposition --------------------------------------------------------------------

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition of the registry, and its content type."""
        self._refresh_counts()
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    async def handle(self, request: web.Request) -> web.Response:
        """aiohttp handler for ``GET /metrics``."""
        body, content_type = self.render()
        return web.Response(body=body, headers={"Content-Type": content_type})
