"""Memory sizes as people write them ("70GiB", "16G", "10%"), and how swapd prints them."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Final

KiB: Final = 1024
MiB: Final = 1024 * KiB
GiB: Final = 1024 * MiB
TiB: Final = 1024 * GiB

# "G" means GiB as in `free -g`, Kubernetes' "Gi" and llama.cpp's own logs: a footprint read off
# any of them and written as "16G" must not come out 7% short. "GB" is the same (docs say so).
_UNITS: Final = {
    "": 1, "b": 1,
    "k": KiB, "kb": KiB, "ki": KiB, "kib": KiB,
    "m": MiB, "mb": MiB, "mi": MiB, "mib": MiB,
    "g": GiB, "gb": GiB, "gi": GiB, "gib": GiB,
    "t": TiB, "tb": TiB, "ti": TiB, "tib": TiB,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?|\.\d+)\s*([a-zA-Z]*)\s*$")
_PERCENT = re.compile(r"^\s*(\d+(?:\.\d+)?|\.\d+)\s*%\s*$")


class SizeError(ValueError):
    """A size that cannot be read. The message says what was expected."""


def parse_size(value: object) -> int:
    """Bytes from `"70GiB"`, `"16G"`, `"512 MiB"`, `"1.5T"` or a plain number of bytes.

    Units are binary (K, M, G, T with or without "i"/"iB"/"B"); a bare number is bytes.
    Raises SizeError for anything else, zero and negative sizes included.
    """
    if isinstance(value, bool):
        raise SizeError(f"must be a size such as \"16GiB\" or a number of bytes, got {value!r}")
    if isinstance(value, int):
        number, unit = float(value), 1
    elif isinstance(value, float):
        number, unit = value, 1
    elif isinstance(value, str) and (m := _SIZE.match(value)):
        number = float(m[1])
        scale = _UNITS.get(m[2].lower())
        if scale is None:
            raise SizeError(f"unknown unit {m[2]!r} (use B, KiB, MiB, GiB or TiB), got {value!r}")
        unit = scale
    else:
        raise SizeError(f"must be a size such as \"16GiB\" or a number of bytes, got {value!r}")
    if not math.isfinite(number) or number * unit < 1:
        raise SizeError(f"must be more than 0 bytes, got {value!r}")
    return int(number * unit)


@dataclass(frozen=True)
class Floor:
    """A MemAvailable floor: an absolute size, or a percentage of MemTotal."""

    bytes: int | None = None
    percent: float | None = None

    def resolve(self, total: int) -> int:
        if self.percent is not None:
            return int(total * self.percent / 100)
        return self.bytes or 0

    def __str__(self) -> str:
        return f"{self.percent:g}%" if self.percent is not None else format_size(self.bytes or 0)


DEFAULT_FLOOR: Final = Floor(bytes=2 * GiB)


def parse_floor(value: object) -> Floor:
    """A guard floor: a size (`"2GiB"`) or a percentage of MemTotal (`"3%"`, above 0, below 50)."""
    if isinstance(value, str) and (m := _PERCENT.match(value)):
        percent = float(m[1])
        if not 0 < percent < 50:
            raise SizeError(f"a percentage of MemTotal must be above 0 and below 50, got {value!r}")
        return Floor(percent=percent)
    return Floor(bytes=parse_size(value))


def parse_percent(value: object) -> float | None:
    """The number in `"50%"` (above 0, at most 100); None when `value` is not a percentage."""
    if not isinstance(value, str) or not (m := _PERCENT.match(value)):
        return None
    percent = float(m[1])
    if not 0 < percent <= 100:
        raise SizeError(f"a percentage must be above 0 and at most 100, got {value!r}")
    return percent


def format_size(size: int) -> str:
    """Bytes as a short human size: `70.0GiB`, `512MiB`, `0B`."""
    sign = "-" if size < 0 else ""
    size = abs(size)
    for unit, scale in (("TiB", TiB), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if size >= scale:
            value = size / scale
            return f"{sign}{value:.1f}{unit}" if value < 100 else f"{sign}{value:.0f}{unit}"
    return f"{sign}{size}B"


