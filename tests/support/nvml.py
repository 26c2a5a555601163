"""A fake `pynvml` module and what the GPU tests build with it: devices (a discrete GPU, a
DGX Spark's GB10), /proc/meminfo texts, process trees and the sampler's `groups` callable."""

from __future__ import annotations

import threading
import types
from dataclasses import dataclass, field
from typing import Any

from swapd.engines import procgroup
from tests.support import wait_until

# -- the fake pynvml -------------------------------------------------------------------------

NVML_SUCCESS = 0
NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_FUNCTION_NOT_FOUND = 13
NVML_ERROR_GPU_IS_LOST = 15
NVML_ERROR_UNKNOWN = 999
NVML_TEMPERATURE_GPU = 0


class NVMLError(Exception):
    """Like pynvml's: carries the NVML return code in `.value`."""

    def __init__(self, value: int) -> None:
        super().__init__(f"NVML error {value}")
        self.value = value


@dataclass
class FakeProcess:
    pid: int
    usedGpuMemory: int | None  # pynvml's spelling


@dataclass
class FakeUtilization:
    gpu: int
    memory: int


@dataclass
class FakeMemory:
    total: int
    free: int
    used: int


@dataclass
class FakeDevice:
    name: str = "NVIDIA H100 80GB HBM3"
    uuid: str = "GPU-00000000-0000-0000-0000-000000000000"
    memory: tuple[int, int] | None = (2 << 30, 80 << 30)  # (used, total); None: NOT_SUPPORTED
    temperature: int = 50
    power_mw: int = 250_000
    energy_mj: int = 1_000_000
    utilization: int = 37
    processes: list[FakeProcess] = field(default_factory=list)
    lost: bool = False
    """Every call on this GPU (its handle included) raises GPU_IS_LOST."""
    failing: dict[str, int] = field(default_factory=dict)
    """function name -> NVML error code that call raises."""
    block: threading.Event | None = None
    """When set, nvmlDeviceGetPowerUsage waits on it (a hung driver call)."""
    entered: threading.Event = field(default_factory=threading.Event)


def make_nvml(
    devices: list[FakeDevice],
    *,
    init_error: int | None = None,
    driver: str = "580.95.05",
    temperature_v: bool = True,
) -> Any:
    mod: Any = types.ModuleType("pynvml")
    mod.calls = []
    mod.shutdowns = 0
    mod.NVMLError = NVMLError
    for name, value in globals().items():
        if name.startswith(("NVML_ERROR_", "NVML_TEMPERATURE_", "NVML_SUCCESS")):
            setattr(mod, name, value)

    def record(name: str) -> None:
        mod.calls.append((name, threading.current_thread().name))

    def dev(handle: Any, call: str) -> FakeDevice:
        record(call)
        d = devices[handle[1]]
        if d.lost:
            raise NVMLError(NVML_ERROR_GPU_IS_LOST)
        if call in d.failing:
            raise NVMLError(d.failing[call])
        return d

    def nvmlInit() -> None:
        record("nvmlInit")
        if init_error is not None:
            raise NVMLError(init_error)

    def nvmlShutdown() -> None:
        record("nvmlShutdown")
        mod.shutdowns += 1

    def nvmlDeviceGetCount() -> int:
        record("nvmlDeviceGetCount")
        return len(devices)

    def nvmlSystemGetDriverVersion() -> str:
        record("nvmlSystemGetDriverVersion")
        return driver

    def nvmlDeviceGetHandleByIndex(index: int) -> Any:
        handle = ("handle", index)
        dev(handle, "nvmlDeviceGetHandleByIndex")
        return handle

    def nvmlDeviceGetName(handle: Any) -> str:
        return dev(handle, "nvmlDeviceGetName").name

    def nvmlDeviceGetUUID(handle: Any) -> bytes:
        # old pynvml versions return bytes; swapd decodes both
        return dev(handle, "nvmlDeviceGetUUID").uuid.encode()

    def nvmlDeviceGetMemoryInfo(handle: Any) -> FakeMemory:
        d = dev(handle, "nvmlDeviceGetMemoryInfo")
        if d.memory is None:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        used, total = d.memory
        return FakeMemory(total=total, free=total - used, used=used)

    def nvmlDeviceGetTemperatureV(handle: Any, sensor: int) -> int:
        assert sensor == NVML_TEMPERATURE_GPU
        return dev(handle, "nvmlDeviceGetTemperatureV").temperature

    def nvmlDeviceGetTemperature(handle: Any, sensor: int) -> int:
        assert sensor == NVML_TEMPERATURE_GPU
        return dev(handle, "nvmlDeviceGetTemperature").temperature

    def nvmlDeviceGetPowerUsage(handle: Any) -> int:
        d = dev(handle, "nvmlDeviceGetPowerUsage")
        if d.block is not None:
            d.entered.set()
            d.block.wait(30)
        return d.power_mw

    def nvmlDeviceGetPowerManagementLimit(handle: Any) -> int:
        dev(handle, "nvmlDeviceGetPowerManagementLimit")
        raise NVMLError(NVML_ERROR_NOT_SUPPORTED)  # GB10: the power limit reads N/A

    def nvmlDeviceGetTotalEnergyConsumption(handle: Any) -> int:
        return dev(handle, "nvmlDeviceGetTotalEnergyConsumption").energy_mj

    def nvmlDeviceGetUtilizationRates(handle: Any) -> FakeUtilization:
        return FakeUtilization(
            gpu=dev(handle, "nvmlDeviceGetUtilizationRates").utilization, memory=0
        )

    def nvmlDeviceGetComputeRunningProcesses(handle: Any) -> list[FakeProcess]:
        return list(dev(handle, "nvmlDeviceGetComputeRunningProcesses").processes)

    for fn in (
        nvmlInit,
        nvmlShutdown,
        nvmlDeviceGetCount,
        nvmlSystemGetDriverVersion,
        nvmlDeviceGetHandleByIndex,
        nvmlDeviceGetName,
        nvmlDeviceGetUUID,
        nvmlDeviceGetMemoryInfo,
        nvmlDeviceGetTemperature,
        nvmlDeviceGetPowerUsage,
        nvmlDeviceGetPowerManagementLimit,
        nvmlDeviceGetTotalEnergyConsumption,
        nvmlDeviceGetUtilizationRates,
        nvmlDeviceGetComputeRunningProcesses,
    ):
        setattr(mod, fn.__name__, fn)
    if temperature_v:
        mod.nvmlDeviceGetTemperatureV = nvmlDeviceGetTemperatureV
    return mod


def gb10_device(**kw: Any) -> FakeDevice:
    """A DGX Spark's GB10: no NVML memory info (unified memory)."""
    base: dict[str, Any] = {
        "name": "NVIDIA GB10",
        "uuid": "GPU-5f1c0e2a-0000-0000-0000-00000000gb10",
        "memory": None,
        "temperature": 41,
        "power_mw": 11_500,
        "energy_mj": 5_000_000,
        "utilization": 0,
    }
    base.update(kw)
    return FakeDevice(**base)


def meminfo_text(total_kib: int, available_kib: int) -> str:
    return (
        f"MemTotal:       {total_kib} kB\n"
        f"MemFree:         1234567 kB\n"
        f"MemAvailable:   {available_kib} kB\n"
        "Buffers:          123456 kB\n"
        "Cached:          4567890 kB\n"
    )


# -- helpers ----------------------------------------------------------------------------------

GiB = 1 << 30
NOT_A_PID = 0x7FFFFFF0  # no such process: never a member of any group


def tree(pid: int) -> procgroup.Tree:
    """The process tree led by `pid` (a group leader), as the scheduler hands it over."""
    return procgroup.Tree(leader=pid, start=procgroup.start_ticks(pid) or 0)


class Groups:
    """The `groups` callable: model -> tree, counting calls (one per sampling pass)."""

    def __init__(self, groups: dict[str, procgroup.Tree] | None = None) -> None:
        self.groups = dict(groups or {})
        self.calls = 0
        self.error: Exception | None = None

    def __call__(self) -> dict[str, procgroup.Tree]:
        self.calls += 1
        if self.error is not None:
            raise self.error
        return dict(self.groups)

    def wait_passes(self, n: int, timeout: float = 10.0) -> None:
        """Wait until the sampler has started `n` more passes."""
        target = self.calls + n
        wait_until(lambda: self.calls >= target, timeout, message=f"{n} sampling passes")


# -- a fake pynvml that a swapd subprocess imports --------------------------------------------

# Written as `pynvml.py` into a folder put first on swapd's PYTHONPATH. It reuses the fake of
# this module (the repo is on the path too) and replaces itself in sys.modules.
FAKE_PYNVML = """
import os, sys, time
import psutil
from tests.support.nvml import FakeProcess, gb10_device, make_nvml

GiB = 1 << 30
_mod = make_nvml([gb10_device(utilization=37)], driver="580.95.05")


def _engine_processes(handle):
    # Every engine swapd runs holds 1 GiB "on the GPU" (NVML lists compute processes by pid).
    procs = psutil.Process(os.getpid()).children(recursive=True)
    return [FakeProcess(p.pid, GiB) for p in procs]


_mod.nvmlDeviceGetComputeRunningProcesses = _engine_processes

_delay = float(os.environ.get("FAKE_NVML_DELAY", "0"))
if _delay:
    _marker = os.environ["FAKE_NVML_MARKER"]

    def _slow(fn):
        def call(*args, **kw):
            with open(_marker, "a") as f:
                f.write(fn.__name__ + "\\n")
            # a driver call stuck on its lock, until the test lets go ({marker}.release)
            end = time.monotonic() + _delay
            while time.monotonic() < end and not os.path.exists(_marker + ".release"):
                time.sleep(0.01)
            return fn(*args, **kw)
        return call

    for _name in dir(_mod):
        if _name.startswith(("nvmlDevice", "nvmlSystem")):
            setattr(_mod, _name, _slow(getattr(_mod, _name)))

sys.modules[__name__] = _mod
"""
