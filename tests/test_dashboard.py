"""docs/grafana-dashboard.json: valid, importable, and every series it queries is one swapd exports.

The exported names come from a real `Metrics` scrape (GPU series included, from a sampler that
reads a fake NVML), so renaming a metric without fixing the dashboard fails here.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from swapd.memory.gpu import Sampler
from swapd.observe.metrics import ENGINE_STATES, START_RESULTS, STOP_REASONS, Metrics
from tests.support.nvml import FakeProcess, gb10_device, make_nvml, meminfo_text, tree

DASHBOARD = Path(__file__).resolve().parent.parent / "docs" / "grafana-dashboard.json"

# Labels Prometheus adds to every scraped series; the dashboard may match on them.
TARGET_LABELS = {"instance", "job"}
# PromQL words that can stand where a metric name does.
_METRIC = re.compile(r"\bswapd_[A-Za-z0-9_]*")
_SELECTOR = re.compile(r"\b(swapd_[A-Za-z0-9_]*)\s*\{([^}]*)\}")
_MATCHER = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, set[str]]]:
    """Sample name -> its label names, for every series a GB10 swapd with one model exports."""
    meminfo = tmp_path_factory.mktemp("proc") / "meminfo"
    meminfo.write_text(meminfo_text(128 * 1024 * 1024, 100 * 1024 * 1024))
    nvml = make_nvml([gb10_device(processes=[FakeProcess(os.getpid(), 1 << 30)])])
    sampler = Sampler(lambda: {"qwen": tree(os.getpgid(0))}, nvml=nvml,
                      meminfo_path=str(meminfo))
    metrics = Metrics()
    metrics.register_models(["qwen"])
    metrics.series("qwen")  # a model that has run: its histograms and engine series exist
    metrics.set_engine_state("qwen", "ready")
    metrics.attach_sampler(sampler)
    metrics.attach_memory(_Memory())
    sampler.sample_once()
    body, _ = metrics.render()
    names: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            names.setdefault(sample.name, set()).update(sample.labels)
    sampler.stop()
    yield names


class _Memory:
    """MemAvailable and peaks as swapd's MemoryWatch gives them to the metrics."""

    def available_bytes(self) -> int | None:
        return 100 << 30

    def peaks(self) -> dict[str, int]:
        return {"qwen": 1 << 30}


def all_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))  # collapsed rows hold their panels
    return out


def queries(dashboard: dict[str, Any]) -> list[str]:
    """Every PromQL text: panel target exprs and template variable queries."""
    texts = [t["expr"] for p in all_panels(dashboard) for t in p.get("targets", []) if "expr" in t]
    for var in dashboard["templating"]["list"]:
        query = var.get("query")
        texts.append(query["query"] if isinstance(query, dict) else str(query or ""))
    return texts


def base_name(name: str) -> str:
    """The metric family a sample name belongs to (what the Metrics class defines)."""
    for suffix in ("_bucket", "_sum", "_count", "_total"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def test_is_valid_importable_json(dashboard: dict[str, Any]) -> None:
    assert dashboard["schemaVersion"] >= 36
    assert dashboard["title"]
    assert dashboard["uid"]
    (ds_input,) = dashboard["__inputs"]
    assert ds_input["name"] == "DS_PROMETHEUS"
    assert ds_input["pluginId"] == "prometheus"
    ids = [p["id"] for p in all_panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in all_panels(dashboard):
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        assert panel["targets"], panel["title"]
        for t in panel["targets"]:
            assert t["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
            assert t["expr"].strip(), panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]


def test_every_queried_series_is_exported(
    dashboard: dict[str, Any], exported: dict[str, set[str]]
) -> None:
    families = {base_name(n) for n in exported}
    for text in queries(dashboard):
        for name in _METRIC.findall(text):
            # Exactly a series name Prometheus will store (e.g. _bucket of a histogram, _total of
            # a counter): a bare histogram name or a counter without _total matches nothing.
            assert name in exported, (
                f"{name!r} in {text!r} is not a series swapd exports "
                f"(family {base_name(name)!r} known: {base_name(name) in families})"
            )


def test_label_matchers_use_real_labels_and_values(
    dashboard: dict[str, Any], exported: dict[str, set[str]]
) -> None:
    known_values = {
        "state": set(ENGINE_STATES),
        "reason": set(STOP_REASONS),
        "result": set(START_RESULTS),
    }
    for text in queries(dashboard):
        for name, body in _SELECTOR.findall(text):
            for label, op, val in _MATCHER.findall(body):
                assert label in exported[name] | TARGET_LABELS, (name, label, text)
                if op == "=" and label in known_values:
                    assert val in known_values[label], (name, label, val)


def test_grouping_labels_exist(dashboard: dict[str, Any], exported: dict[str, set[str]]) -> None:
    """`by (model, code)` on a metric that has no `code` label would silently merge series."""
    for text in queries(dashboard):
        names = set(_METRIC.findall(text))
        for group in re.findall(r"\bby\s*\(([^)]*)\)", text):
            for label in (x.strip() for x in group.split(",")):
                if label == "le":
                    assert any(n.endswith("_bucket") for n in names), text
                    continue
                assert all(label in exported[n] for n in names), (label, names, text)


def test_covers_the_metrics_that_matter(dashboard: dict[str, Any]) -> None:
    referenced = {base_name(n) for t in queries(dashboard) for n in _METRIC.findall(t)}
    required = {
        "swapd_engine_state",
        "swapd_engine_stops",
        "swapd_engine_starts",
        "swapd_engine_kills",
        "swapd_engine_start_seconds",
        "swapd_requests",
        "swapd_request_duration_seconds",
        "swapd_time_to_first_byte_seconds",
        "swapd_inflight_requests",
        "swapd_queued_requests",
        "swapd_gpu_memory_used_bytes",
        "swapd_gpu_memory_total_bytes",
        "swapd_gpu_temperature_celsius",
        "swapd_gpu_power_watts",
        "swapd_gpu_energy_joules",
        "swapd_gpu_utilization_ratio",
        "swapd_engine_resident_memory_bytes",
        "swapd_tokens",
        "swapd_time_to_first_token_seconds",
        "swapd_decode_tokens_per_second",
        "swapd_prefill_tokens_per_second",
        "swapd_stream_errors",
        "swapd_memory_available_bytes",
        "swapd_memory_guard_kills",
        "swapd_placement_evictions",
    }
    assert required <= referenced, required - referenced


def test_tenant_timeline_and_swaps(dashboard: dict[str, Any]) -> None:
    panels = all_panels(dashboard)
    timelines = [p for p in panels if p["type"] == "state-timeline"]
    assert any(
        "swapd_engine_state{" in t["expr"] and 'state="ready"' in t["expr"]
        for p in timelines
        for t in p["targets"]
    )
    assert any(
        "rate(swapd_engine_stops_total{" in t["expr"] and 'reason="swap"' in t["expr"]
        for p in panels
        for t in p.get("targets", [])
    )
    quantiles = [
        t["expr"] for p in panels for t in p.get("targets", []) if "histogram_quantile" in t["expr"]
    ]
    for family in ("swapd_request_duration_seconds", "swapd_time_to_first_byte_seconds"):
        for q in ("0.5", "0.95"):
            assert any(f"({q}," in e and f"{family}_bucket" in e for e in quantiles), (family, q)
