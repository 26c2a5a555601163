"""GPU and engine-memory sampler: NVML + /proc/meminfo + per-process-group RSS, in a thread.

NVML calls take a driver lock and can stall for a long time (one project froze its API by
calling them on the event loop), so they run only here, in a daemon thread at ~1 Hz; the
`/metrics` scrape reads `Sampler.latest()`, the last finished sample, and never waits.

GB10 (DGX Spark) facts this code is shaped by:
- `nvmlDeviceGetMemoryInfo` raises NOT_SUPPORTED (unified memory). Used memory is then
  MemTotal - MemAvailable from /proc/meminfo (what nvtop and the Spark tools report) and
  `memory_source` says "meminfo".
- Temperature, power (mW), total energy (mJ), utilisation and the per-process
  `usedGpuMemory` of compute processes work; the power *limit* reads N/A (not read here).

No NVML at all (CI, a laptop, a container without the driver) means no GPU in the samples and
one log line, never an exception. A GPU that falls off the bus mid-run (GPU_IS_LOST, or any
error on its handle) drops out of the samples, logged once; the thread keeps sampling, and the
GPU comes back if NVML answers for it again.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Final, Literal

import psutil
import structlog

from swapd.engines import procgroup
from swapd.memory.meminfo import PROC_MEMINFO, MemInfo, read_meminfo

log = structlog.get_logger("swapd.gpu")

MemoryOrigin = Literal["nvml", "meminfo"]


# NVML return codes (pynvml's constants, with the C header's values as fallbacks for fakes).
_NOT_SUPPORTED: Final = 3
_UNINITIALIZED: Final = 1
_DRIVER_NOT_LOADED: Final = 9
_GPU_IS_LOST: Final = 15
_RESET_REQUIRED: Final = 16
_TEMPERATURE_GPU: Final = 0


@dataclass(frozen=True)
class GpuSample:
    """One GPU at one instant. Optional fields are None when NVML cannot read them."""

    index: int
    name: str
    uuid: str
    driver: str
    memory_used_bytes: int
    memory_total_bytes: int
    memory_source: MemoryOrigin
    temperature_celsius: float | None = None
    power_watts: float | None = None
    energy_joules: float | None = None
    utilization_ratio: float | None = None


@dataclass(frozen=True)
class Sample:
    """Everything one sampling pass saw. Never mutated after it is published."""

    gpus: tuple[GpuSample, ...] = ()
    group_rss_bytes: dict[str, int] = field(default_factory=dict)
    """model -> resident bytes of every process in that engine's process group."""
    group_gpu_bytes: dict[str, int] = field(default_factory=dict)
    """model -> GPU memory NVML attributes to the group's processes (only where NVML says)."""
    taken_at: float = 0.0
    """time.time() when the sample was taken; 0.0 for the empty sample before the first one."""


class _GpuUnavailable(Exception):
    """This GPU cannot be read right now (lost, reset, bad handle): drop it from the sample."""


def group_rss(groups: Mapping[str, procgroup.Tree]) -> tuple[dict[str, int], dict[int, str]]:
    """Resident bytes of each model's process tree, and pid -> model for every member.

    Every model in `groups` gets an entry (0 when its tree has no live member right now).
    The tree is `procgroup.engine_trees`': group, marker, adopted orphans and cgroup, so a
    worker that moved to its own session still counts. Not `psutil.process_iter`: its
    process cache is module-global and shared with the event loop's own scans.
    """
    rss = dict.fromkeys(groups, 0)
    members: dict[int, str] = {}
    for model, pids in procgroup.engine_trees(groups).items():
        for pid in pids:
            try:
                rss[model] += psutil.Process(pid).memory_info().rss
            except (OSError, psutil.Error):
                continue  # exited between the listing and the read, or a zombie
            members[pid] = model
    return rss, members


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


class Sampler:
    """Samples NVML, /proc/meminfo and the engines' process groups every `interval` seconds.

    `groups` returns an immutable model -> process tree (`procgroup.Tree`) snapshot of the
    engines that run now (the scheduler replaces it, never mutates it); it is called from
    the sampler thread, so it must be cheap and must not need the loop.
    `nvml` replaces `import pynvml` (tests pass a fake module); `meminfo_path` replaces
    /proc/meminfo.
    """

    def __init__(
        self,
        groups: Callable[[], Mapping[str, procgroup.Tree]],
        interval: float = 1.0,
        nvml: ModuleType | None = None,
        *,
        meminfo_path: str = PROC_MEMINFO,
    ) -> None:
        self._groups = groups
        self._interval = interval
        self._injected = nvml
        self._meminfo_path = meminfo_path
        self._latest = Sample()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # Serialises sampling passes (the thread, and tests calling sample_once directly).
        self._lock = threading.Lock()
        # NVML session state, touched only under _lock.
        self._nvml: Any = None
        self._nvml_state: Literal["uninit", "ok", "absent"] = "uninit"
        self._driver = "unknown"
        self._count = 0
        self._handles: dict[int, Any] = {}
        self._static: dict[int, tuple[str, str]] = {}  # index -> (name, uuid)
        self._down: set[int] = set()  # GPUs currently unreadable (logged once per outage)
        self._logged: set[str] = set()  # one-shot log keys

    # -- public API ------------------------------------------------------------------

    def latest(self) -> Sample:
        """The last finished sample (an empty one before the first). Never blocks."""
        return self._latest

    def start(self) -> None:
        """Start the sampling thread (a daemon); a no-op when it already runs."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="swapd-gpu-sampler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Stop the thread, wait for it, and shut NVML down."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread.is_alive():
            # The thread shuts NVML down itself once its current pass ends.
            thread.join(timeout if timeout is not None else max(5.0, 2 * self._interval))
            if thread.is_alive():
                log.warning("gpu sampler thread did not stop in time; leaving it (daemon)")
            return
        with self._lock:
            self._shutdown_nvml()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def sample_once(self) -> Sample:
        """Take one sample now (initialising NVML on first use), publish it and return it."""
        with self._lock:
            if self._nvml_state == "uninit":
                self._init_nvml()
            groups = self._read_groups()
            rss, members = group_rss(groups)
            gpus: list[GpuSample] = []
            per_pid_gpu: dict[int, int | None] | None = None
            if self._nvml_state == "ok":
                meminfo: list[MemInfo] = []  # read at most once per pass
                for index in range(self._count):
                    try:
                        gpu, procs = self._read_gpu(index, meminfo)
                    except _GpuUnavailable as exc:
                        self._mark_down(index, exc)
                        continue
                    self._mark_up(index)
                    gpus.append(gpu)
                    if procs is not None:
                        per_pid_gpu = per_pid_gpu if per_pid_gpu is not None else {}
                        for pid, used in procs.items():
                            before = per_pid_gpu.get(pid, 0)
                            per_pid_gpu[pid] = (
                                None if used is None or before is None else before + used
                            )
            group_gpu: dict[str, int] = {}
            if per_pid_gpu is not None:
                # Known for every model, 0 included, once NVML listed compute processes; a
                # model with a process whose usage NVML withholds is unknown, not 0.
                group_gpu = dict.fromkeys(groups, 0)
                unknown: set[str] = set()
                for pid, used in per_pid_gpu.items():
                    model = members.get(pid)
                    if model is None:
                        continue
                    if used is None:
                        unknown.add(model)
                    else:
                        group_gpu[model] += used
                for model in unknown:
                    del group_gpu[model]
            sample = Sample(
                gpus=tuple(gpus),
                group_rss_bytes=rss,
                group_gpu_bytes=group_gpu,
                taken_at=time.time(),
            )
            self._latest = sample
            return sample

    # -- thread ------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    self.sample_once()
                except Exception as exc:  # the thread must outlive any surprise
                    self._log_once(
                        f"sample:{type(exc).__name__}:{exc}",
                        "gpu sampler pass failed",
                        error=repr(exc),
                    )
                self._stop.wait(self._interval)
        finally:
            with self._lock:
                self._shutdown_nvml()

    # -- helpers -------------------------------------------------------------------------

    def _log_once(self, key: str, event: str, **kw: Any) -> None:
        if key in self._logged:
            return
        self._logged.add(key)
        log.warning(event, **kw)

    def _read_groups(self) -> Mapping[str, procgroup.Tree]:
        # An immutable snapshot (the scheduler replaces it, never mutates it).
        try:
            return self._groups()
        except Exception as exc:
            self._log_once("groups", "cannot read engine process groups", error=repr(exc))
            return {}

    def _code(self, name: str, default: int) -> int:
        value = getattr(self._nvml, name, default)
        return value if isinstance(value, int) else default

    def _error_value(self, exc: BaseException) -> int | None:
        value = getattr(exc, "value", None)
        return value if isinstance(value, int) else None

    def _is_lost(self, exc: BaseException) -> bool:
        lost = {
            self._code("NVML_ERROR_GPU_IS_LOST", _GPU_IS_LOST),
            self._code("NVML_ERROR_RESET_REQUIRED", _RESET_REQUIRED),
            self._code("NVML_ERROR_UNINITIALIZED", _UNINITIALIZED),
            self._code("NVML_ERROR_DRIVER_NOT_LOADED", _DRIVER_NOT_LOADED),
        }
        return self._error_value(exc) in lost

    def _init_nvml(self) -> None:
        nvml: Any = self._injected
        try:
            if nvml is None:
                import pynvml

                nvml = pynvml
            nvml.nvmlInit()
        except Exception as exc:  # ImportError, NVMLError_LibraryNotFound, DriverNotLoaded...
            self._nvml_state = "absent"
            log.info("NVML not available: no GPU metrics", error=str(exc) or repr(exc))
            return
        self._nvml = nvml
        try:
            count = int(nvml.nvmlDeviceGetCount())
        except Exception as exc:
            self._nvml_state = "absent"
            log.info("NVML cannot count GPUs: no GPU metrics", error=str(exc) or repr(exc))
            self._shutdown_nvml()
            return
        try:
            self._driver = _text(nvml.nvmlSystemGetDriverVersion())
        except Exception:
            self._driver = "unknown"
        self._count = count
        self._nvml_state = "ok"
        log.info("NVML initialised", gpus=count, driver=self._driver)

    def _shutdown_nvml(self) -> None:
        if self._nvml_state == "ok" or self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception:
                pass
        self._nvml = None
        self._nvml_state = "uninit" if self._nvml_state == "ok" else self._nvml_state
        self._handles.clear()
        self._static.clear()
        self._down.clear()

    def _mark_down(self, index: int, exc: _GpuUnavailable) -> None:
        self._handles.pop(index, None)
        self._static.pop(index, None)
        if index not in self._down:
            self._down.add(index)
            log.warning("GPU unreadable: its metrics are dropped", gpu=index, error=str(exc))

    def _mark_up(self, index: int) -> None:
        if index in self._down:
            self._down.discard(index)
            log.info("GPU readable again", gpu=index)

    def _handle(self, index: int) -> tuple[Any, str, str]:
        nvml = self._nvml
        handle = self._handles.get(index)
        if handle is None:
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                name = _text(nvml.nvmlDeviceGetName(handle))
                uuid = _text(nvml.nvmlDeviceGetUUID(handle))
            except Exception as exc:
                raise _GpuUnavailable(str(exc) or repr(exc)) from exc
            self._handles[index] = handle
            self._static[index] = (name, uuid)
        name, uuid = self._static[index]
        return handle, name, uuid

    def _optional(self, read: Callable[[], float]) -> float | None:
        """One optional reading: None when it fails, _GpuUnavailable when the GPU is gone."""
        try:
            return read()
        except Exception as exc:
            if self._is_lost(exc):
                raise _GpuUnavailable(str(exc) or repr(exc)) from exc
            return None

    def _temperature(self, handle: Any) -> float:
        nvml = self._nvml
        sensor = self._code("NVML_TEMPERATURE_GPU", _TEMPERATURE_GPU)
        get_v = getattr(nvml, "nvmlDeviceGetTemperatureV", None)
        if get_v is not None:
            try:
                return float(get_v(handle, sensor))
            except Exception as exc:
                if self._is_lost(exc):
                    raise
                # an older driver without the V entry point: the legacy call below
        return float(nvml.nvmlDeviceGetTemperature(handle, sensor))

    def _memory(self, handle: Any, meminfo: list[MemInfo]) -> tuple[int, int, MemoryOrigin]:
        try:
            info = self._nvml.nvmlDeviceGetMemoryInfo(handle)
            used, total = int(info.used), int(info.total)
            if total > 0:
                return used, total, "nvml"
        except Exception as exc:
            if self._error_value(exc) != self._code("NVML_ERROR_NOT_SUPPORTED", _NOT_SUPPORTED):
                raise _GpuUnavailable(str(exc) or repr(exc)) from exc
        # Unified memory (GB10): the GPU's memory is the system's.
        if not meminfo:
            try:
                meminfo.append(read_meminfo(self._meminfo_path))
            except (OSError, ValueError) as exc:
                raise _GpuUnavailable(f"no NVML memory info and {exc!r}") from exc
        info = meminfo[0]
        return max(info.total - info.available, 0), info.total, "meminfo"

    def _processes(self, handle: Any) -> dict[int, int | None] | None:
        """pid -> usedGpuMemory of the GPU's compute processes (None: NVML withholds it);
        None when NVML cannot list them."""
        try:
            procs = self._nvml.nvmlDeviceGetComputeRunningProcesses(handle)
        except Exception as exc:
            if self._is_lost(exc):
                raise _GpuUnavailable(str(exc) or repr(exc)) from exc
            return None
        out: dict[int, int | None] = {}
        for proc in procs or ():
            pid = getattr(proc, "pid", None)
            used = getattr(proc, "usedGpuMemory", None)  # None: NVML_VALUE_NOT_AVAILABLE
            if not isinstance(pid, int):
                continue
            before = out.get(pid, 0)
            out[pid] = None if not isinstance(used, int) or before is None else before + used
        return out

    def _read_gpu(
        self, index: int, meminfo: list[MemInfo]
    ) -> tuple[GpuSample, dict[int, int | None] | None]:
        nvml = self._nvml
        handle, name, uuid = self._handle(index)
        used, total, source = self._memory(handle, meminfo)
        temperature = self._optional(lambda: self._temperature(handle))
        power = self._optional(lambda: nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0)
        energy = self._optional(lambda: nvml.nvmlDeviceGetTotalEnergyConsumption(handle) / 1000.0)
        utilization = self._optional(lambda: nvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100.0)
        procs = self._processes(handle)
        gpu = GpuSample(
            index=index,
            name=name,
            uuid=uuid,
            driver=self._driver,
            memory_used_bytes=used,
            memory_total_bytes=total,
            memory_source=source,
            temperature_celsius=temperature,
            power_watts=power,
            energy_joules=energy,
            utilization_ratio=utilization,
        )
        return gpu, procs
