"""llama-swap's `llamaswap_*` series, for dashboards built on llama-swap's /metrics
(`metrics.llamaSwapNames: true`; docs/llama-swap.md maps each to its `swapd_*` series).

Names, labels and units are llama-swap's (its internal/perf/prometheus.go): percentages
0-100, bytes, watts; GPUs labelled `id`, `name`, `uuid`. The GPU series come from the
sampler's last sample, like swapd's own (a scrape never calls NVML); the system series
from psutil at scrape time (reads of /proc, no waiting: the CPU share is since the last
scrape). A series swapd cannot measure is left out rather than sent as 0: llama-swap's
`llamaswap_gpu_vram_temperature_celsius` and `llamaswap_gpu_fan_speed_percent` (nvidia-smi
reports neither on a GB10 either).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable

import psutil
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from swapd.memory.gpu import Sample


class LlamaSwapCollector(Collector):
    """Yields llama-swap's series; `latest()` is the sampler's last sample (None: none)."""

    def __init__(self, latest: Callable[[], Sample | None]) -> None:
        self._latest = latest

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        out = system_families()
        sample = self._latest()
        if sample is not None:
            out += gpu_families(sample)
        return out


def system_families() -> list[Metric]:
    cpu = GaugeMetricFamily("llamaswap_cpu_util_percent", "CPU utilization per core (0-100)",
                            labels=["core"])
    for core, pct in enumerate(psutil.cpu_percent(interval=None, percpu=True)):
        cpu.add_metric([str(core)], pct)
    memory = psutil.virtual_memory()
    swap = psutil.swap_memory()
    out: list[Metric] = [
        cpu,
        GaugeMetricFamily("llamaswap_memory_total_bytes", "Total memory in bytes",
                          value=memory.total),
        GaugeMetricFamily("llamaswap_memory_used_bytes", "Used memory in bytes",
                          value=memory.used),
        GaugeMetricFamily("llamaswap_memory_free_bytes", "Free memory in bytes",
                          value=memory.free),
        GaugeMetricFamily("llamaswap_swap_total_bytes", "Total swap in bytes", value=swap.total),
        GaugeMetricFamily("llamaswap_swap_used_bytes", "Used swap in bytes", value=swap.used),
    ]
    load = GaugeMetricFamily("llamaswap_load_average", "Load average", labels=["interval"])
    with contextlib.suppress(OSError):
        for interval, value in zip(("1m", "5m", "15m"), os.getloadavg(), strict=True):
            load.add_metric([interval], value)
    out.append(load)
    net = CounterMetricFamily("llamaswap_network_bytes", "Total network bytes transferred",
                              labels=["interface", "direction"])
    for name, io in sorted(psutil.net_io_counters(pernic=True).items()):
        net.add_metric([name, "recv"], io.bytes_recv)
        net.add_metric([name, "sent"], io.bytes_sent)
    if net.samples:
        out.append(net)
    return out


def gpu_families(sample: Sample) -> list[Metric]:
    labels = ["id", "name", "uuid"]
    temperature = GaugeMetricFamily("llamaswap_gpu_temperature_celsius",
                                    "GPU temperature in Celsius", labels=labels)
    util = GaugeMetricFamily("llamaswap_gpu_util_percent", "GPU utilization percent (0-100)",
                             labels=labels)
    mem_util = GaugeMetricFamily("llamaswap_gpu_memory_util_percent",
                                 "GPU memory utilization percent (0-100)", labels=labels)
    used = GaugeMetricFamily("llamaswap_gpu_memory_used_bytes", "GPU memory used in bytes",
                             labels=labels)
    total = GaugeMetricFamily("llamaswap_gpu_memory_total_bytes", "GPU memory total in bytes",
                              labels=labels)
    power = GaugeMetricFamily("llamaswap_gpu_power_draw_watts", "GPU power draw in watts",
                              labels=labels)
    for g in sample.gpus:
        key = [str(g.index), g.name, g.uuid]
        used.add_metric(key, g.memory_used_bytes)
        total.add_metric(key, g.memory_total_bytes)
        if g.memory_total_bytes:
            mem_util.add_metric(key, 100 * g.memory_used_bytes / g.memory_total_bytes)
        if g.temperature_celsius is not None:
            temperature.add_metric(key, g.temperature_celsius)
        if g.utilization_ratio is not None:
            util.add_metric(key, 100 * g.utilization_ratio)
        if g.power_watts is not None:
            power.add_metric(key, g.power_watts)
    return [f for f in (temperature, util, mem_util, used, total, power) if f.samples]
