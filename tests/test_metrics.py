"""swapd.metrics: what a Prometheus scrape sees, parsed back with prometheus-client's own parser."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample as PromSample

from swapd import __version__
from swapd.memory.gpu import GpuSample, Sample, Sampler
from swapd.observe.metrics import (
    ENGINE_STATES,
    MODEL_CODES,
    START_RESULTS,
    STOP_REASONS,
    UNROUTED_CODES,
    Metrics,
)
from tests.support import wait_until
from tests.support.nvml import FakeDevice, FakeProcess, gb10_device, make_nvml, meminfo_text, tree
from tests.support.samples import FixedSampler, gb10_sample

GiB = 1 << 30


def scrape(metrics: Metrics) -> dict[str, list[PromSample]]:
    """Family name -> samples, parsed from `render()`."""
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    return {family.name: family.samples for family in text_string_to_metric_families(body.decode())}


def types_of(metrics: Metrics) -> dict[str, str]:
    body, _ = metrics.render()
    return {f.name: f.type for f in text_string_to_metric_families(body.decode())}


def value(
    samples: dict[str, list[PromSample]], family: str, name: str | None = None, **labels: str
) -> float:
    """The one sample of `family` (sample name `name`, default the family's) with `labels`."""
    wanted = name or family
    found = [
        s
        for s in samples[family]
        if s.name == wanted and all(s.labels.get(k) == v for k, v in labels.items())
    ]
    assert len(found) == 1, (family, wanted, labels, samples[family])
    return found[0].value


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


# -- request and engine metrics --------------------------------------------------------------


def test_registered_models_show_their_request_counters_at_zero(metrics: Metrics) -> None:
    metrics.register_models(["qwen", "gemma"])
    s = scrape(metrics)

    for model in ("qwen", "gemma"):
        # Every code swapd itself answers with, so that rate()/increase() see the first 503.
        for code in MODEL_CODES:
            assert value(s, "swapd_requests", "swapd_requests_total", model=model, code=code) == 0
        assert value(s, "swapd_stream_errors", "swapd_stream_errors_total", model=model) == 0
    # Answers given before routing, under model="".
    for code in UNROUTED_CODES:
        assert value(s, "swapd_requests", "swapd_requests_total", model="", code=code) == 0

    # A model that never ran has no histograms, gauges or engine series (a scrape stays
    # small with a thousand recipes): they come with its first request or start.
    per_model = {
        "swapd_request_duration_seconds", "swapd_time_to_first_byte_seconds",
        "swapd_engine_start_seconds", "swapd_inflight_requests", "swapd_queued_requests",
        "swapd_engine_state", "swapd_engine_starts", "swapd_engine_stops", "swapd_engine_kills",
    }
    assert not [x for f in per_model for x in s.get(f, []) if x.labels.get("model")]

    assert value(s, "swapd_build_info", version=__version__) == 1
    assert not [name for name in s if name.endswith("_created")]
    # no sampler attached: no GPU or engine-memory series
    assert not [name for name in s if name.startswith("swapd_gpu_")]


def test_process_and_platform_collectors(metrics: Metrics) -> None:
    s = scrape(metrics)
    assert value(s, "process_resident_memory_bytes") > 0
    assert value(s, "process_start_time_seconds") > 0
    assert value(s, "process_cpu_seconds", "process_cpu_seconds_total") >= 0
    assert value(s, "process_open_fds") > 0
    assert [x.labels["implementation"] for x in s["python_info"]] == ["CPython"]


def test_a_first_request_brings_the_rest_of_a_models_series(metrics: Metrics) -> None:
    metrics.register_models(["qwen", "gemma"])
    metrics.series("qwen").queued.set(1)  # a request waits for qwen's engine
    metrics.set_engine_state("qwen", "starting")
    s = scrape(metrics)
    for family in (
        "swapd_request_duration_seconds",
        "swapd_time_to_first_byte_seconds",
        "swapd_engine_start_seconds",
    ):
        assert value(s, family, f"{family}_count", model="qwen") == 0
        assert value(s, family, f"{family}_bucket", model="qwen", le="+Inf") == 0
    for result in START_RESULTS:
        assert value(s, "swapd_engine_starts", "swapd_engine_starts_total", model="qwen",
                     result=result) == 0
    for reason in STOP_REASONS:
        assert value(s, "swapd_engine_stops", "swapd_engine_stops_total", model="qwen",
                     reason=reason) == 0
    assert value(s, "swapd_engine_kills", "swapd_engine_kills_total", model="qwen") == 0
    assert value(s, "swapd_inflight_requests", model="qwen") == 0
    assert value(s, "swapd_queued_requests", model="qwen") == 1
    assert value(s, "swapd_engine_state", model="qwen", state="starting") == 1
    for state in ENGINE_STATES:
        if state != "starting":
            assert value(s, "swapd_engine_state", model="qwen", state=state) == 0
    # gemma never ran
    assert not [x for x in s["swapd_engine_state"] if x.labels["model"] == "gemma"]
    # a never-run model's "stopped" (startup, reload) adds nothing
    metrics.set_engine_state("gemma", "stopped")
    assert not [x for x in scrape(metrics)["swapd_engine_state"] if x.labels["model"] == "gemma"]


def test_unrouted_answers_count_under_an_empty_model(metrics: Metrics) -> None:
    metrics.unrouted(404)
    metrics.unrouted(404)
    metrics.unrouted(408)  # a code not created ahead still counts
    s = scrape(metrics)
    assert value(s, "swapd_requests", "swapd_requests_total", model="", code="404") == 2
    assert value(s, "swapd_requests", "swapd_requests_total", model="", code="408") == 1
    assert value(s, "swapd_requests", "swapd_requests_total", model="", code="400") == 0


def test_metric_types(metrics: Metrics) -> None:
    metrics.register_models(["qwen"])
    metrics.series("qwen")
    metrics.set_engine_state("qwen", "starting")
    types = types_of(metrics)
    assert types["swapd_requests"] == "counter"
    assert types["swapd_request_duration_seconds"] == "histogram"
    assert types["swapd_time_to_first_byte_seconds"] == "histogram"
    assert types["swapd_engine_start_seconds"] == "histogram"
    assert types["swapd_engine_stops"] == "counter"
    assert types["swapd_inflight_requests"] == "gauge"
    assert types["swapd_engine_state"] == "gauge"
    assert types["swapd_stream_errors"] == "counter"


def test_set_engine_state_is_one_hot(metrics: Metrics) -> None:
    metrics.register_models(["qwen"])
    for current in ("starting", "ready", "stopping", "stopped", "failed"):
        metrics.set_engine_state("qwen", current)
        s = scrape(metrics)
        states = {
            x.labels["state"]: x.value
            for x in s["swapd_engine_state"]
            if x.labels["model"] == "qwen"
        }
        assert states == {st: (1.0 if st == current else 0.0) for st in ENGINE_STATES}


def test_set_engine_state_for_an_unregistered_model(metrics: Metrics) -> None:
    metrics.set_engine_state("adhoc", "ready")
    s = scrape(metrics)
    assert sum(x.value for x in s["swapd_engine_state"] if x.labels["model"] == "adhoc") == 1


def test_requests_and_histograms(metrics: Metrics) -> None:
    metrics.register_models(["qwen"])
    metrics.requests_total.labels("qwen", "200").inc()
    metrics.requests_total.labels("qwen", "200").inc()
    metrics.requests_total.labels("qwen", "502").inc()
    metrics.request_duration.labels("qwen").observe(42.0)
    metrics.request_duration.labels("qwen").observe(0.3)
    metrics.ttfb.labels("qwen").observe(0.04)
    metrics.engine_start_seconds.labels("qwen").observe(95.0)
    metrics.engine_stops.labels("qwen", "swap").inc()
    metrics.engine_kills.labels("qwen").inc()
    metrics.inflight.labels("qwen").set(3)
    metrics.queued.labels("qwen").set(7)
    s = scrape(metrics)

    assert value(s, "swapd_requests", "swapd_requests_total", model="qwen", code="200") == 2
    assert value(s, "swapd_requests", "swapd_requests_total", model="qwen", code="502") == 1
    rd = "swapd_request_duration_seconds"
    assert value(s, rd, f"{rd}_count", model="qwen") == 2
    assert value(s, rd, f"{rd}_sum", model="qwen") == pytest.approx(42.3)
    assert value(s, rd, f"{rd}_bucket", model="qwen", le="0.5") == 1
    assert value(s, rd, f"{rd}_bucket", model="qwen", le="60.0") == 2
    tt = "swapd_time_to_first_byte_seconds"
    assert value(s, tt, f"{tt}_bucket", model="qwen", le="0.05") == 1
    assert value(s, tt, f"{tt}_bucket", model="qwen", le="0.025") == 0
    es = "swapd_engine_start_seconds"
    assert value(s, es, f"{es}_bucket", model="qwen", le="60.0") == 0
    assert value(s, es, f"{es}_bucket", model="qwen", le="120.0") == 1
    assert value(s, "swapd_engine_stops", "swapd_engine_stops_total", model="qwen", reason="swap")
    assert value(s, "swapd_engine_kills", "swapd_engine_kills_total", model="qwen") == 1
    assert value(s, "swapd_inflight_requests", model="qwen") == 3
    assert value(s, "swapd_queued_requests", model="qwen") == 7


def test_inflight_and_queued_are_the_schedulers_counts_at_the_scrape(metrics: Metrics) -> None:
    counts = {"qwen": (2, 0), "gemma": (0, 3), "idle": (0, 0)}
    metrics.register_models(["qwen", "gemma", "idle", "gone"])
    metrics.series("idle").inflight.set(5)  # a stale value: the scrape reads the scheduler's
    metrics.attach_counts(lambda: counts)
    s = scrape(metrics)
    assert value(s, "swapd_inflight_requests", model="qwen") == 2
    # gemma's first request still waits for its engine: its series exist already.
    assert value(s, "swapd_queued_requests", model="gemma") == 3
    assert value(s, "swapd_inflight_requests", model="idle") == 0
    counts["qwen"] = (0, 0)
    assert value(scrape(metrics), "swapd_inflight_requests", model="qwen") == 0


def test_buckets_reach_llm_timescales(metrics: Metrics) -> None:
    metrics.register_models(["qwen"])
    metrics.series("qwen")
    s = scrape(metrics)

    def top(family: str) -> float:
        les = [float(x.labels["le"]) for x in s[family] if x.name == f"{family}_bucket"]
        return max(le for le in les if le != float("inf"))

    assert top("swapd_request_duration_seconds") >= 600
    assert top("swapd_time_to_first_byte_seconds") >= 600
    assert top("swapd_engine_start_seconds") >= 1800


def test_register_models_again_keeps_what_is_there(metrics: Metrics) -> None:
    metrics.register_models(["qwen"])
    metrics.set_engine_state("qwen", "ready")
    metrics.requests_total.labels("qwen", "200").inc()
    metrics.register_models(["qwen", "gemma"])  # a reload that added gemma
    s = scrape(metrics)
    assert value(s, "swapd_engine_state", model="qwen", state="ready") == 1
    assert value(s, "swapd_requests", "swapd_requests_total", model="qwen", code="200") == 1
    assert value(s, "swapd_requests", "swapd_requests_total", model="gemma", code="503") == 0


def test_forget_model_removes_only_its_series(metrics: Metrics) -> None:
    metrics.register_models(["qwen", "gemma"])
    metrics.requests_total.labels("gemma", "404").inc()
    metrics.series("gemma").ttfb.observe(1.0)
    metrics.set_engine_state("gemma", "ready")
    metrics.forget_model("gemma")
    s = scrape(metrics)
    models = {x.labels.get("model") for samples in s.values() for x in samples} - {None}
    assert models == {"qwen", ""}
    # and it can come back with fresh zeros
    metrics.register_models(["gemma"])
    metrics.set_engine_state("gemma", "stopped")
    s = scrape(metrics)
    assert value(s, "swapd_requests", "swapd_requests_total", model="gemma", code="503") == 0
    assert not [x for x in s["swapd_requests"] if x.labels == {"model": "gemma", "code": "404"}]
    assert not [x for x in s["swapd_engine_state"] if x.labels["model"] == "gemma"]
    tt = "swapd_time_to_first_byte_seconds"
    metrics.series("gemma")
    assert value(scrape(metrics), tt, f"{tt}_count", model="gemma") == 0


def test_own_registry_or_a_given_one() -> None:
    a, b = Metrics(), Metrics()  # two instances never collide
    assert a.registry is not b.registry
    registry = CollectorRegistry()
    c = Metrics(registry)
    assert c.registry is registry
    assert Metrics(version="9.9.9").render()[0].count(b'swapd_build_info{version="9.9.9"} 1.0') == 1


# -- GPU and engine memory from the sampler ---------------------------------------------------


def test_gpu_series_from_the_last_sample(metrics: Metrics) -> None:
    metrics.register_models(["qwen"])
    metrics.attach_sampler(FixedSampler(gb10_sample()))
    s = scrape(metrics)
    types = types_of(metrics)

    assert value(s, "swapd_engine_resident_memory_bytes", model="qwen") == 3 * GiB
    assert value(s, "swapd_engine_gpu_memory_bytes", model="qwen") == 60 * GiB
    assert value(s, "swapd_gpu_memory_used_bytes", gpu="0") == 28 * GiB
    assert value(s, "swapd_gpu_memory_total_bytes", gpu="0") == 128 * GiB
    assert value(s, "swapd_gpu_temperature_celsius", gpu="0") == 41.0
    assert value(s, "swapd_gpu_power_watts", gpu="0") == 11.5
    assert value(s, "swapd_gpu_energy_joules", "swapd_gpu_energy_joules_total", gpu="0") == 5000.0
    assert types["swapd_gpu_energy_joules"] == "counter"
    assert value(s, "swapd_gpu_utilization_ratio", gpu="0") == 0.25
    (info,) = s["swapd_gpu_info"]
    assert info.labels == {
        "gpu": "0",
        "name": "NVIDIA GB10",
        "uuid": "GPU-gb10",
        "driver": "580.95.05",
        "memory_source": "meminfo",
    }
    assert info.value == 1


def test_unreadable_fields_have_no_series(metrics: Metrics) -> None:
    sample = gb10_sample()
    gpu = sample.gpus[0]
    bare = GpuSample(
        index=gpu.index,
        name=gpu.name,
        uuid=gpu.uuid,
        driver=gpu.driver,
        memory_used_bytes=gpu.memory_used_bytes,
        memory_total_bytes=gpu.memory_total_bytes,
        memory_source="nvml",
    )
    metrics.attach_sampler(FixedSampler(Sample(gpus=(bare,), group_rss_bytes={"qwen": 1})))
    s = scrape(metrics)
    for family in (
        "swapd_gpu_temperature_celsius",
        "swapd_gpu_power_watts",
        "swapd_gpu_energy_joules",
        "swapd_gpu_utilization_ratio",
        "swapd_engine_gpu_memory_bytes",
    ):
        assert family not in s
    assert value(s, "swapd_gpu_memory_used_bytes", gpu="0") == 28 * GiB
    assert value(s, "swapd_engine_resident_memory_bytes", model="qwen") == 1


def test_no_nvml_means_no_gpu_series(metrics: Metrics) -> None:
    metrics.attach_sampler(FixedSampler(Sample(group_rss_bytes={"qwen": 5})))
    s = scrape(metrics)
    assert not [name for name in s if name.startswith("swapd_gpu_")]
    assert value(s, "swapd_engine_resident_memory_bytes", model="qwen") == 5


@pytest.fixture
def real_sampler(tmp_path: os.PathLike[str]) -> Iterator[tuple[Sampler, FakeDevice, Any]]:
    meminfo = os.path.join(tmp_path, "meminfo")
    with open(meminfo, "w") as f:
        f.write(meminfo_text(128 * 1024 * 1024, 100 * 1024 * 1024))
    device = gb10_device(processes=[FakeProcess(os.getpid(), 2 * GiB)])
    nvml = make_nvml([device])
    sampler = Sampler(
        lambda: {"qwen": tree(os.getpgid(0))}, interval=0.005, nvml=nvml,
        meminfo_path=meminfo,
    )
    yield sampler, device, nvml
    sampler.stop()


def test_a_scrape_never_calls_nvml(
    metrics: Metrics, real_sampler: tuple[Sampler, FakeDevice, Any]
) -> None:
    sampler, _, nvml = real_sampler
    metrics.attach_sampler(sampler)
    sampler.sample_once()
    calls = len(nvml.calls)
    for _ in range(3):
        s = scrape(metrics)
    assert len(nvml.calls) == calls
    assert value(s, "swapd_gpu_memory_used_bytes", gpu="0") == 28 * GiB
    assert value(s, "swapd_engine_gpu_memory_bytes", model="qwen") == 2 * GiB
    assert value(s, "swapd_engine_resident_memory_bytes", model="qwen") > 0
    assert s["swapd_gpu_info"][0].labels["memory_source"] == "meminfo"


def test_a_scrape_does_not_wait_for_a_hung_nvml_call(metrics: Metrics) -> None:
    release = threading.Event()
    device = FakeDevice()
    sampler = Sampler(lambda: {}, interval=0.005, nvml=make_nvml([device]))
    metrics.attach_sampler(sampler)
    sampler.sample_once()
    device.block = release
    sampler.start()
    try:
        assert device.entered.wait(10)
        scraped: list[dict[str, list[PromSample]]] = []
        worker = threading.Thread(target=lambda: scraped.append(scrape(metrics)), daemon=True)
        worker.start()
        # Order of events: the scrape is done while the NVML call is still hung.
        wait_until(lambda: scraped, message="a scrape during the hung NVML call")
        assert not release.is_set()
        s = scraped[0]
        assert value(s, "swapd_gpu_power_watts", gpu="0") == 250.0  # the last finished sample
    finally:
        release.set()
        sampler.stop()


def test_gpu_lost_mid_run_series_vanish_and_return(
    metrics: Metrics, real_sampler: tuple[Sampler, FakeDevice, Any]
) -> None:
    sampler, device, _ = real_sampler
    metrics.attach_sampler(sampler)
    sampler.start()
    wait_until(lambda: "swapd_gpu_info" in scrape(metrics), message="GPU series")
    device.lost = True
    wait_until(lambda: "swapd_gpu_info" not in scrape(metrics), message="GPU series gone")
    s = scrape(metrics)
    assert not [name for name in s if name.startswith("swapd_gpu_")]
    assert value(s, "swapd_engine_resident_memory_bytes", model="qwen") > 0
    assert sampler.running
    device.lost = False
    wait_until(lambda: "swapd_gpu_info" in scrape(metrics), message="GPU series back")


# -- HTTP ----------------------------------------------------------------------------------------


async def test_handle_serves_the_exposition(metrics: Metrics) -> None:
    metrics.register_models(["qwen"])
    metrics.attach_sampler(FixedSampler(gb10_sample()))
    app = web.Application()
    app.router.add_get("/metrics", metrics.handle)
    async with TestClient(TestServer(app)) as client:
        resp = await client.get("/metrics")
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        assert "version=" in resp.headers["Content-Type"]
        text = await resp.text()
    names = {f.name for f in text_string_to_metric_families(text)}
    assert {"swapd_requests", "swapd_engine_state", "swapd_gpu_info"} <= names
