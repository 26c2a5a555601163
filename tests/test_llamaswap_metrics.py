"""`metrics.llamaSwapNames: true`: llama-swap's `llamaswap_*` series with its names, labels
and units beside swapd's, from a real scrape (GPU series from a sampler on a fake GB10
NVML); off again after a reload that turns it off."""

from __future__ import annotations

import os

from prometheus_client.parser import text_string_to_metric_families

from swapd.memory.gpu import Sampler
from swapd.observe.metrics import Metrics
from tests.support.nvml import FakeProcess, gb10_device, make_nvml, meminfo_text, tree

# llama-swap's series (internal/perf/prometheus.go) and their labels, less the two swapd
# cannot measure (VRAM temperature, fan speed).
LLAMASWAP = {
    "llamaswap_cpu_util_percent": {"core"},
    "llamaswap_memory_total_bytes": set(),
    "llamaswap_memory_used_bytes": set(),
    "llamaswap_memory_free_bytes": set(),
    "llamaswap_swap_total_bytes": set(),
    "llamaswap_swap_used_bytes": set(),
    "llamaswap_load_average": {"interval"},
    "llamaswap_network_bytes_total": {"interface", "direction"},
    "llamaswap_gpu_temperature_celsius": {"id", "name", "uuid"},
    "llamaswap_gpu_util_percent": {"id", "name", "uuid"},
    "llamaswap_gpu_memory_util_percent": {"id", "name", "uuid"},
    "llamaswap_gpu_memory_used_bytes": {"id", "name", "uuid"},
    "llamaswap_gpu_memory_total_bytes": {"id", "name", "uuid"},
    "llamaswap_gpu_power_draw_watts": {"id", "name", "uuid"},
}


def scrape(metrics: Metrics) -> dict[str, list[tuple[dict[str, str], float]]]:
    body, _ = metrics.render()
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((sample.labels, sample.value))
    return out


def test_llamaswap_names_beside_swapds_and_off_again(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(meminfo_text(128 * 1024 * 1024, 100 * 1024 * 1024))
    nvml = make_nvml([gb10_device(processes=[FakeProcess(os.getpid(), 1 << 30)])])
    sampler = Sampler(lambda: {"qwen": tree(os.getpgid(0))}, nvml=nvml,
                      meminfo_path=str(meminfo))
    metrics = Metrics()
    metrics.attach_sampler(sampler)
    sampler.sample_once()
    try:
        assert not [n for n in scrape(metrics) if n.startswith("llamaswap_")]
        metrics.llamaswap_names(True)
        metrics.llamaswap_names(True)  # a reload that keeps it on registers nothing twice
        found = scrape(metrics)
        for name, labels in LLAMASWAP.items():
            assert name in found, name
            for sample_labels, _ in found[name]:
                assert set(sample_labels) == labels, (name, sample_labels)
        # Units are llama-swap's: percent where swapd has a ratio, bytes, watts; GPUs by id.
        swapd_gpu = {s[0]["gpu"]: s[1] for s in found["swapd_gpu_utilization_ratio"]}
        for labels, value in found["llamaswap_gpu_util_percent"]:
            assert value == 100 * swapd_gpu[labels["id"]]
        used = found["swapd_gpu_memory_used_bytes"][0][1]
        total = found["swapd_gpu_memory_total_bytes"][0][1]
        assert found["llamaswap_gpu_memory_used_bytes"][0][1] == used
        assert found["llamaswap_gpu_memory_util_percent"][0][1] == 100 * used / total
        assert found["llamaswap_gpu_power_draw_watts"][0][1] == \
            found["swapd_gpu_power_watts"][0][1]
        assert {s[0]["interval"] for s in found["llamaswap_load_average"]} == {"1m", "5m", "15m"}
        assert found["llamaswap_memory_total_bytes"][0][1] > 0
        metrics.llamaswap_names(False)
        assert not [n for n in scrape(metrics) if n.startswith("llamaswap_")]
    finally:
        sampler.stop()
