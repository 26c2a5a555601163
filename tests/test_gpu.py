"""The GPU sampler (swapd.gpu) against a fake `pynvml` module: the NVML boundary, nothing below.

Four platforms: a discrete GPU (memory from NVML), a DGX Spark's GB10 (memory info NOT_SUPPORTED,
so /proc/meminfo), no NVML at all, and a GPU lost mid-run. Plus the per-process-group RSS with real
processes. No fixed sleeps: every wait polls a condition with a deadline.

The fake pynvml is tests/support/nvml.py (test_metrics and test_dashboard use it too).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
from structlog.testing import capture_logs

from swapd.engines import procgroup
from swapd.memory.gpu import GpuSample, Sample, Sampler, group_rss
from swapd.memory.meminfo import MemInfo, read_meminfo
from swapd.observe.metrics import Metrics
from tests.support import wait_until
from tests.support.nvml import (
    NOT_A_PID,
    NVML_ERROR_FUNCTION_NOT_FOUND,
    NVML_ERROR_GPU_IS_LOST,
    NVML_ERROR_INVALID_ARGUMENT,
    NVML_ERROR_LIBRARY_NOT_FOUND,
    NVML_ERROR_NOT_SUPPORTED,
    NVML_ERROR_UNKNOWN,
    FakeDevice,
    FakeProcess,
    GiB,
    Groups,
    gb10_device,
    make_nvml,
    meminfo_text,
    tree,
)


@pytest.fixture
def gb10_meminfo(tmp_path: Path) -> str:
    """A Spark's /proc/meminfo: 128 GiB in all, 100 GiB available -> 28 GiB used."""
    path = tmp_path / "meminfo"
    path.write_text(meminfo_text(128 * 1024 * 1024, 100 * 1024 * 1024))
    return str(path)


@pytest.fixture
def sampler_cleanup() -> Iterator[list[Sampler]]:
    samplers: list[Sampler] = []
    yield samplers
    for s in samplers:
        s.stop()


def events(logs: list[dict[str, Any]], text: str) -> list[dict[str, Any]]:
    return [e for e in logs if text in e["event"]]


# -- a discrete GPU: memory from NVML --------------------------------------------------------


def test_discrete_gpu_reads_everything_from_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    nvml = make_nvml(
        [FakeDevice(processes=[FakeProcess(os.getpid(), 3 * GiB), FakeProcess(NOT_A_PID, GiB)])]
    )
    # the lazy `import pynvml` finds the fake
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    sampler = Sampler(Groups({"m": tree(os.getpgid(0))}))
    before = time.time()
    sample = sampler.sample_once()

    assert sample.gpus == (
        GpuSample(
            index=0,
            name="NVIDIA H100 80GB HBM3",
            uuid="GPU-00000000-0000-0000-0000-000000000000",
            driver="580.95.05",
            memory_used_bytes=2 * GiB,
            memory_total_bytes=80 * GiB,
            memory_source="nvml",
            temperature_celsius=50.0,
            power_watts=250.0,
            energy_joules=1000.0,
            utilization_ratio=0.37,
        ),
    )
    # our own pid is in group "m"; NOT_A_PID is in no group
    assert sample.group_gpu_bytes == {"m": 3 * GiB}
    assert sample.group_rss_bytes["m"] >= psutil.Process().memory_info().rss // 2
    assert sample.taken_at >= before
    assert sampler.latest() is sample
    names = [c[0] for c in nvml.calls]
    assert "nvmlDeviceGetTemperatureV" in names  # the current call, not the deprecated one
    assert "nvmlDeviceGetTemperature" not in names

    sampler.stop()
    assert nvml.shutdowns == 1


def test_latest_before_the_first_sample_is_empty() -> None:
    sampler = Sampler(Groups(), nvml=make_nvml([FakeDevice()]))
    assert sampler.latest() == Sample()
    assert sampler.latest().taken_at == 0.0


# -- GB10: no NVML memory info -----------------------------------------------------------------


def test_gb10_memory_comes_from_meminfo(gb10_meminfo: str) -> None:
    nvml = make_nvml([gb10_device(processes=[FakeProcess(os.getpid(), 60 * GiB)])])
    sampler = Sampler(Groups({"m": tree(os.getpgid(0))}), nvml=nvml, meminfo_path=gb10_meminfo)
    sample = sampler.sample_once()

    (gpu,) = sample.gpus
    assert gpu.name == "NVIDIA GB10"
    assert gpu.memory_source == "meminfo"
    assert gpu.memory_used_bytes == 28 * GiB
    assert gpu.memory_total_bytes == 128 * GiB
    # temperature, power (the power *limit* reads N/A there), energy and utilisation work
    assert gpu.temperature_celsius == 41.0
    assert gpu.power_watts == 11.5
    assert gpu.energy_joules == 5000.0
    assert gpu.utilization_ratio == 0.0
    # per-process usedGpuMemory works on GB10
    assert sample.group_gpu_bytes == {"m": 60 * GiB}
    sampler.stop()


def test_meminfo_follows_the_file(gb10_meminfo: str) -> None:
    sampler = Sampler(Groups(), nvml=make_nvml([gb10_device()]), meminfo_path=gb10_meminfo)
    assert sampler.sample_once().gpus[0].memory_used_bytes == 28 * GiB
    Path(gb10_meminfo).write_text(meminfo_text(128 * 1024 * 1024, 8 * 1024 * 1024))
    assert sampler.sample_once().gpus[0].memory_used_bytes == 120 * GiB
    sampler.stop()


def test_read_meminfo(tmp_path: Path) -> None:
    path = tmp_path / "meminfo"
    path.write_text(meminfo_text(1000, 250))
    assert read_meminfo(str(path)) == MemInfo(total=1000 * 1024, available=250 * 1024)
    path.write_text("MemTotal: 1000 kB\nMemFree: 10 kB\n")  # an old kernel: no MemAvailable
    assert read_meminfo(str(path)) == MemInfo(total=1000 * 1024, available=1000 * 1024)


def test_withheld_process_memory_is_unknown_not_zero(gb10_meminfo: str) -> None:
    nvml = make_nvml([gb10_device(processes=[FakeProcess(os.getpid(), None)])])
    sampler = Sampler(
        Groups({"m": tree(os.getpgid(0)), "idle": tree(NOT_A_PID)}), nvml=nvml,
        meminfo_path=gb10_meminfo,
    )
    sample = sampler.sample_once()
    # "idle" has no process on the GPU: 0; "m" has one whose usage NVML withholds: absent
    assert sample.group_gpu_bytes == {"idle": 0}
    sampler.stop()


@pytest.mark.parametrize("temperature_v", [False, True])
def test_temperature_falls_back_to_the_legacy_call(temperature_v: bool) -> None:
    device = FakeDevice(failing={"nvmlDeviceGetTemperatureV": NVML_ERROR_FUNCTION_NOT_FOUND})
    sampler = Sampler(Groups(), nvml=make_nvml([device], temperature_v=temperature_v))
    assert sampler.sample_once().gpus[0].temperature_celsius == 50.0
    sampler.stop()


def test_a_failing_call_clears_only_its_field() -> None:
    device = FakeDevice(
        failing={
            "nvmlDeviceGetPowerUsage": NVML_ERROR_NOT_SUPPORTED,
            "nvmlDeviceGetTotalEnergyConsumption": NVML_ERROR_NOT_SUPPORTED,
            "nvmlDeviceGetComputeRunningProcesses": NVML_ERROR_UNKNOWN,
        },
        processes=[FakeProcess(os.getpid(), GiB)],
    )
    sampler = Sampler(Groups({"m": tree(os.getpgid(0))}), nvml=make_nvml([device]))
    sample = sampler.sample_once()
    (gpu,) = sample.gpus
    assert gpu.power_watts is None
    assert gpu.energy_joules is None
    assert gpu.temperature_celsius == 50.0
    assert gpu.utilization_ratio == 0.37
    assert gpu.memory_used_bytes == 2 * GiB
    assert sample.group_gpu_bytes == {}  # NVML could not list processes: unknown
    assert "m" in sample.group_rss_bytes
    sampler.stop()


# -- no NVML --------------------------------------------------------------------------------


def test_no_pynvml_module_means_no_gpu_and_one_log_line(
    monkeypatch: pytest.MonkeyPatch, sampler_cleanup: list[Sampler]
) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # `import pynvml` raises ImportError
    groups = Groups({"m": tree(os.getpgid(0))})
    sampler = Sampler(groups, interval=0.005)
    sampler_cleanup.append(sampler)
    with capture_logs() as logs:
        for _ in range(3):
            sample = sampler.sample_once()
            assert sample.gpus == ()
            assert sample.group_gpu_bytes == {}
            assert "m" in sample.group_rss_bytes  # RSS needs no NVML
        sampler.start()
        groups.wait_passes(5)
        sampler.stop()
    assert len(logs) == 1, logs
    assert "NVML" in logs[0]["event"]
    assert sampler.latest().gpus == ()


def test_nvml_init_failure_means_no_gpu_and_one_log_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    nvml = make_nvml([FakeDevice()], init_error=NVML_ERROR_LIBRARY_NOT_FOUND)
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    sampler = Sampler(Groups())
    with capture_logs() as logs:
        assert sampler.sample_once().gpus == ()
        assert sampler.sample_once().gpus == ()
        sampler.stop()
    assert len(logs) == 1, logs
    assert [c[0] for c in nvml.calls] == ["nvmlInit"]  # tried once, never again
    assert nvml.shutdowns == 0


# -- a GPU lost mid-run ------------------------------------------------------------------------


def test_gpu_lost_mid_run_drops_its_series_and_sampling_goes_on(
    sampler_cleanup: list[Sampler],
) -> None:
    devices = [FakeDevice(uuid="GPU-a"), FakeDevice(uuid="GPU-b")]
    nvml = make_nvml(devices)
    groups = Groups()
    sampler = Sampler(groups, interval=0.005, nvml=nvml)
    sampler_cleanup.append(sampler)
    with capture_logs() as logs:
        sampler.start()
        wait_until(lambda: len(sampler.latest().gpus) == 2, message="both GPUs sampled")

        devices[1].lost = True
        wait_until(
            lambda: [g.uuid for g in sampler.latest().gpus] == ["GPU-a"], message="GPU-b dropped"
        )
        groups.wait_passes(10)
        assert sampler.running
        assert [g.uuid for g in sampler.latest().gpus] == ["GPU-a"]
        assert len(events(logs, "GPU unreadable")) == 1  # once, not once per pass

        devices[1].lost = False
        wait_until(lambda: len(sampler.latest().gpus) == 2, message="GPU-b back")
        assert len(events(logs, "GPU readable again")) == 1
        groups.wait_passes(2)
        assert sampler.latest().gpus[1].temperature_celsius == 50.0

        sampler.stop()
    assert not sampler.running
    assert nvml.shutdowns == 1
    # every NVML call, shutdown included, ran in the sampler thread
    assert {thread for _, thread in nvml.calls} == {"swapd-gpu-sampler"}


@pytest.mark.parametrize(
    ("call", "code"),
    [
        ("nvmlDeviceGetTemperatureV", NVML_ERROR_GPU_IS_LOST),
        ("nvmlDeviceGetUtilizationRates", NVML_ERROR_GPU_IS_LOST),
        ("nvmlDeviceGetComputeRunningProcesses", NVML_ERROR_GPU_IS_LOST),
        ("nvmlDeviceGetMemoryInfo", NVML_ERROR_UNKNOWN),
        ("nvmlDeviceGetHandleByIndex", NVML_ERROR_INVALID_ARGUMENT),
        ("nvmlDeviceGetName", NVML_ERROR_UNKNOWN),
    ],
)
def test_a_lost_gpu_is_dropped_whichever_call_notices(call: str, code: int) -> None:
    devices = [FakeDevice(uuid="GPU-a"), FakeDevice(uuid="GPU-b", failing={call: code})]
    sampler = Sampler(Groups(), nvml=make_nvml(devices))
    with capture_logs() as logs:
        assert [g.uuid for g in sampler.sample_once().gpus] == ["GPU-a"]
        assert [g.uuid for g in sampler.sample_once().gpus] == ["GPU-a"]
    assert len(events(logs, "GPU unreadable")) == 1
    devices[1].failing.clear()
    assert [g.uuid for g in sampler.sample_once().gpus] == ["GPU-a", "GPU-b"]
    sampler.stop()


def test_the_thread_survives_a_failing_groups_callable(sampler_cleanup: list[Sampler]) -> None:
    groups = Groups({"m": tree(os.getpgid(0))})
    groups.error = ValueError("scheduler exploded")
    sampler = Sampler(groups, interval=0.005, nvml=make_nvml([FakeDevice()]))
    sampler_cleanup.append(sampler)
    with capture_logs() as logs:
        sampler.start()
        groups.wait_passes(5)
        assert sampler.running
        assert sampler.latest().group_rss_bytes == {}
        assert len(sampler.latest().gpus) == 1
        groups.error = None
        wait_until(lambda: "m" in sampler.latest().group_rss_bytes, message="groups back")
    assert len(events(logs, "process groups")) == 1


def test_a_scrape_never_waits_for_a_hung_nvml_call(sampler_cleanup: list[Sampler]) -> None:
    """A driver call that hangs must not hang `/metrics`: the scrape renders the last
    published sample while the sampler's thread is still stuck in NVML."""
    release = threading.Event()
    device = FakeDevice(block=release)
    nvml = make_nvml([device])
    sampler = Sampler(Groups(), interval=0.005, nvml=nvml)
    sampler_cleanup.append(sampler)
    metrics = Metrics()
    metrics.attach_sampler(sampler)
    sampler.start()
    scraped: list[str] = []
    try:
        assert device.entered.wait(10), "the sampler never called NVML"
        calls = len(nvml.calls)
        scrape = threading.Thread(
            target=lambda: scraped.append(metrics.render()[0].decode()), daemon=True
        )
        scrape.start()
        # Order of events: the scrape is done while NVML is still blocked.
        wait_until(lambda: scraped, message="a scrape during the hung NVML call")
        assert not release.is_set()
        assert len(nvml.calls) == calls, "the scrape called NVML itself"
        assert "swapd_gpu_memory_used_bytes{" not in scraped[0]  # nothing published yet
    finally:
        release.set()
    wait_until(lambda: len(sampler.latest().gpus) == 1, message="sample after release")
    assert "swapd_gpu_memory_used_bytes{" in metrics.render()[0].decode()


def test_stop_without_a_thread_shuts_nvml_down_and_sampling_can_resume() -> None:
    nvml = make_nvml([FakeDevice()])
    sampler = Sampler(Groups(), nvml=nvml)
    sampler.sample_once()
    sampler.stop()
    assert nvml.shutdowns == 1
    assert len(sampler.sample_once().gpus) == 1
    assert [c[0] for c in nvml.calls].count("nvmlInit") == 2
    sampler.stop()
    assert nvml.shutdowns == 2


# -- per-process-group RSS with real processes ---------------------------------------------------

_CHILD = "import sys; b = b'x' * (64 << 20); print('ready', flush=True); sys.stdin.read()"
_PARENT = f"""
import subprocess, sys
child = subprocess.Popen([sys.executable, "-c", {_CHILD!r}])
print(child.pid, flush=True)
sys.stdin.read()
child.wait()
"""


@dataclass
class Group:
    proc: subprocess.Popen[str]
    child_pid: int

    @property
    def pgid(self) -> int:
        return self.proc.pid


@pytest.fixture
def engine_group() -> Iterator[Group]:
    """A parent in its own session (so its own process group) with a child holding 64 MiB."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _PARENT],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert proc.stdout is not None and proc.stdin is not None
    try:
        lines = {proc.stdout.readline().strip() for _ in range(2)}
        assert "ready" in lines, lines
        (child,) = (int(x) for x in lines if x.isdigit())
        yield Group(proc, child)
    finally:
        proc.stdin.close()  # both exit at EOF; the parent reaps the child
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        proc.stdout.close()


def test_group_rss_sums_the_whole_process_group(engine_group: Group) -> None:
    pgid = engine_group.pgid
    assert os.getpgid(engine_group.child_pid) == pgid != os.getpgid(0)

    rss, members = group_rss({"engine": tree(pgid), "gone": tree(NOT_A_PID)})
    expected = sum(psutil.Process(p).memory_info().rss for p in (pgid, engine_group.child_pid))

    assert members == {pgid: "engine", engine_group.child_pid: "engine"}
    assert rss["gone"] == 0
    assert rss["engine"] >= 64 << 20  # the child's 64 MiB count
    assert abs(rss["engine"] - expected) < 16 << 20


def test_sampler_attributes_gpu_memory_to_the_group(engine_group: Group) -> None:
    device = gb10_device(
        processes=[
            FakeProcess(engine_group.child_pid, 40 * GiB),  # vLLM's EngineCore, say
            FakeProcess(engine_group.pgid, GiB),
            FakeProcess(os.getpid(), 7 * GiB),  # not in the engine's group
        ]
    )
    sampler = Sampler(Groups({"engine": tree(engine_group.pgid)}), nvml=make_nvml([device]))
    sample = sampler.sample_once()
    assert sample.group_gpu_bytes == {"engine": 41 * GiB}
    assert sample.group_rss_bytes["engine"] >= 64 << 20
    sampler.stop()


def test_group_rss_of_an_exited_group_is_zero() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"], start_new_session=True)
    proc.wait()
    rss, members = group_rss({"m": procgroup.Tree(leader=proc.pid, start=0)})
    assert rss == {"m": 0}
    assert members == {}
