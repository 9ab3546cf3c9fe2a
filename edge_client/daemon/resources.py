"""May the device train now? A check of free memory, CPU load, battery and an operator's pause file.

A device's first job is its own (metering, serving a screen); federated training comes second. The
daemon asks :func:`check` before every round and defers the round (until its deadline) while the
answer is a reason. Everything read here is plain Linux (/proc, /sys), so no psutil is needed on a Pi.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

POWER_SUPPLY = Path("/sys/class/power_supply")


class ResourceLimits(BaseModel):
    """The ``[resources]`` table of a device config; an unset limit is not checked."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_free_mb: float | None = Field(default=None, ge=0)  # MemAvailable below this: defer
    max_load: float | None = Field(default=None, gt=0)  # 1-minute load average per core above this: defer
    min_battery_pct: float | None = Field(default=None, ge=0, le=100)  # when a battery exists and is discharging
    pause_file: str | None = None  # while this file exists, do not train (an operator's or a scheduler's switch)
    poll_s: float = Field(default=5.0, gt=0)  # how often a deferred round asks again


@dataclass(frozen=True)
class Snapshot:
    free_mb: float | None
    load_per_core: float | None
    battery_pct: float | None
    on_battery: bool


def free_memory_mb(meminfo: Path = Path("/proc/meminfo")) -> float | None:
    """MemAvailable (what can be allocated without swapping), in MiB; None off Linux."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    return None


def load_per_core() -> float | None:
    try:
        return os.getloadavg()[0] / max(1, len(os.sched_getaffinity(0)))
    except (OSError, AttributeError):
        return None


def battery(root: Path = POWER_SUPPLY) -> tuple[float | None, bool]:
    """(capacity %, discharging) of the first battery; (None, False) on mains-only devices."""
    try:
        supplies = sorted(root.iterdir())
    except OSError:
        return None, False
    for d in supplies:
        try:
            if (d / "type").read_text().strip() != "Battery":
                continue
            pct = float((d / "capacity").read_text().strip())
            status = (d / "status").read_text().strip() if (d / "status").exists() else ""
            return pct, status == "Discharging"
        except (OSError, ValueError):
            continue
    return None, False


def snapshot() -> Snapshot:
    pct, on_battery = battery()
    return Snapshot(free_memory_mb(), load_per_core(), pct, on_battery)


def check(limits: ResourceLimits, snap: Snapshot | None = None) -> str | None:
    """None when training may run now, else the reason it may not."""
    if limits.pause_file and Path(limits.pause_file).exists():
        return f"paused ({limits.pause_file} exists)"
    snap = snap or snapshot()
    if limits.min_free_mb is not None and snap.free_mb is not None and snap.free_mb < limits.min_free_mb:
        return f"free memory {snap.free_mb:.0f} MB < {limits.min_free_mb:.0f} MB"
    if limits.max_load is not None and snap.load_per_core is not None and snap.load_per_core > limits.max_load:
        return f"load {snap.load_per_core:.2f} per core > {limits.max_load:.2f}"
    if (limits.min_battery_pct is not None and snap.battery_pct is not None and snap.on_battery
            and snap.battery_pct < limits.min_battery_pct):
        return f"battery {snap.battery_pct:.0f} % < {limits.min_battery_pct:.0f} % and discharging"
    return None
