"""Fixed GPU samples, for metrics and pages that show the sampler's last sample."""

from __future__ import annotations

import time

from swapd.memory.gpu import GpuSample, Sample

GiB = 1 << 30


class FixedSampler:
    """Stands in for swapd.gpu.Sampler: `latest()` returns whatever the test set."""

    def __init__(self, sample: Sample) -> None:
        self.sample = sample

    def latest(self) -> Sample:
        return self.sample


def gb10_sample() -> Sample:
    return Sample(
        gpus=(
            GpuSample(
                index=0,
                name="NVIDIA GB10",
                uuid="GPU-gb10",
                driver="580.95.05",
                memory_used_bytes=28 * GiB,
                memory_total_bytes=128 * GiB,
                memory_source="meminfo",
                temperature_celsius=41.0,
                power_watts=11.5,
                energy_joules=5000.0,
                utilization_ratio=0.25,
            ),
        ),
        group_rss_bytes={"qwen": 3 * GiB},
        group_gpu_bytes={"qwen": 60 * GiB},
        taken_at=time.time(),
    )
