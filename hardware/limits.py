"""Put a child process under a device profile's resource limits: CPU affinity and a memory limit.

Why a cgroup and not RLIMIT_AS: ONNX Runtime, numpy's allocator and glibc's per-thread arenas reserve
far more virtual address space than they ever touch, so an address-space limit near a device's RAM
kills a healthy process (or has to be set so loose that it means nothing). A memory cgroup limits
what is resident, like the device's RAM does, and the kernel's OOM killer ends the process when it
is exceeded, which is what happens on a Pi too. What is tried, in order:

1. cgroup v2 ``memory.max`` (a writable cgroup2 hierarchy with the memory controller),
2. cgroup v1 ``memory.limit_in_bytes`` (hybrid hosts such as this project's CI machines),
3. ``RLIMIT_AS`` with :data:`RLIMIT_AS_MARGIN_MB` added for those virtual reservations: a coarse bound
   that catches runaway growth but not a budget overrun of a few tens of MB,
4. nothing: the record says ``"none"`` and why, and no test pretends the limit held.

The CPU limit is the affinity mask (``taskset``), inherited by every thread the child starts.
The child is wrapped in ``sh -c`` that enters the cgroup itself before ``exec``, so no instruction
of the real program runs outside the limit (attaching the pid after ``Popen`` would race).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
RLIMIT_AS_MARGIN_MB = 2048  # ORT + glibc arenas reserve ~1-2 GB of address space they never touch
MB = 1024 * 1024


def allowed_cpus(cores: int, cpus: list[int] | None = None) -> list[int]:
    """The CPUs a profile with ``cores`` cores gets on this host: an explicit list (checked against
    what this process may use), else the last ``cores`` of the host's CPUs (CPU 0 often carries
    interrupts and the test runner), capped by what the host has."""
    host = sorted(os.sched_getaffinity(0))
    if cpus:
        bad = sorted(set(cpus) - set(host))
        if bad:
            raise ValueError(f"CPUs {bad} are not available here (allowed: {host})")
        return sorted(set(cpus))
    if cores < 1:
        raise ValueError("cores must be >= 1")
    return host[-cores:]


def _cgroup2_dir() -> Path | None:
    """A cgroup2 directory with the memory controller where we may create children, or None."""
    for mount in (CGROUP_ROOT, CGROUP_ROOT / "unified"):
        controllers = mount / "cgroup.controllers"
        if controllers.is_file() and "memory" in controllers.read_text().split():
            # our own cgroup (v2 forbids processes in inner nodes, so make a sibling under the parent)
            own = next((line.split("::", 1)[1] for line in Path("/proc/self/cgroup").read_text().splitlines()
                        if line.startswith("0::")), "/")
            base = mount / own.lstrip("/")
            parent = base.parent if base != mount else mount
            if os.access(parent, os.W_OK) and "memory" in (parent / "cgroup.subtree_control").read_text().split():
                return parent
    return None


def _cgroup1_dir() -> Path | None:
    mem = CGROUP_ROOT / "memory"
    return mem if (mem / "memory.limit_in_bytes").is_file() and os.access(mem, os.W_OK) else None


@dataclass
class MemoryLimit:
    """A memory limit for one child process; use as a context manager so the cgroup is removed."""

    limit_mb: int
    mode: str = "none"  # cgroup2 | cgroup1 | rlimit_as | none
    note: str = ""
    path: Path | None = None
    _files: dict[str, str] = field(default_factory=dict)

    @classmethod
    def create(cls, limit_mb: int, prefer: str = "auto") -> MemoryLimit:
        """The strongest limit this host allows (``prefer`` forces one mode, for tests and for hosts
        where a cgroup exists but is not wanted)."""
        if limit_mb < 1:
            raise ValueError("memory limit must be at least 1 MB")
        name = f"fedge-hil-{uuid.uuid4().hex[:8]}"
        tried = []
        if prefer in ("auto", "cgroup2"):
            base = _cgroup2_dir()
            if base is not None:
                path = base / name
                path.mkdir()
                (path / "memory.max").write_text(str(limit_mb * MB))
                with contextlib.suppress(OSError):
                    (path / "memory.swap.max").write_text("0")  # no swapping past the limit
                return cls(limit_mb, "cgroup2", "cgroup v2 memory.max", path,
                           {"procs": "cgroup.procs", "peak": "memory.peak", "events": "memory.events"})
            tried.append("no writable cgroup v2 hierarchy with the memory controller")
        if prefer in ("auto", "cgroup1"):
            base = _cgroup1_dir()
            if base is not None:
                path = base / name
                path.mkdir()
                (path / "memory.limit_in_bytes").write_text(str(limit_mb * MB))
                with contextlib.suppress(OSError):
                    (path / "memory.memsw.limit_in_bytes").write_text(str(limit_mb * MB))
                return cls(limit_mb, "cgroup1", "cgroup v1 memory.limit_in_bytes (page cache counts too)", path,
                           {"procs": "cgroup.procs", "peak": "memory.max_usage_in_bytes",
                            "events": "memory.oom_control"})
            tried.append("no writable cgroup v1 memory hierarchy")
        if prefer in ("auto", "rlimit_as"):
            return cls(limit_mb, "rlimit_as", f"RLIMIT_AS = limit + {RLIMIT_AS_MARGIN_MB} MB margin for virtual "
                       f"reservations (coarse; {'; '.join(tried) or 'asked for'})")
        return cls(limit_mb, "none", "not enforced: " + ("; ".join(tried) or "asked for no limit"))

    @property
    def enforced(self) -> bool:
        """True when the kernel holds the process to ``limit_mb`` of resident memory."""
        return self.mode in ("cgroup2", "cgroup1")

    def wrap(self, cmd: list[str], cpus: list[int]) -> list[str]:
        """``cmd`` run pinned to ``cpus``, entering the cgroup (or setting the rlimit) before exec."""
        taskset = shutil.which("taskset")
        if taskset is None:
            raise RuntimeError("taskset (util-linux) is needed to pin the device to the profile's CPUs")
        if self.path is not None:
            enter = f'echo $$ > "{self.path / self._files["procs"]}" && '
        elif self.mode == "rlimit_as":
            enter = f"ulimit -v {(self.limit_mb + RLIMIT_AS_MARGIN_MB) * 1024} && "
        else:
            enter = ""
        return [taskset, "-c", ",".join(map(str, cpus)), "sh", "-c", enter + 'exec "$@"', "sh", *cmd]

    def peak_mb(self) -> float | None:
        """Peak memory the cgroup charged (RSS + page cache); None without a cgroup or on kernels
        before memory.peak (v2, Linux 5.19)."""
        if self.path is None:
            return None
        try:
            return int((self.path / self._files["peak"]).read_text()) / MB
        except (OSError, ValueError):
            return None

    def oom_kills(self) -> int:
        """How many processes the kernel killed for exceeding the limit."""
        if self.path is None:
            return 0
        try:
            text = (self.path / self._files["events"]).read_text()
        except OSError:
            return 0
        return next((int(line.split()[1]) for line in text.splitlines() if line.startswith("oom_kill ")), 0)

    def close(self) -> None:
        """Remove the cgroup (the caller has reaped the child; a cgroup with a process inside stays)."""
        if self.path is not None:
            with contextlib.suppress(OSError):
                self.path.rmdir()

    def __enter__(self) -> MemoryLimit:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def vm_hwm_mb(status_text: str) -> float | None:
    """Peak resident set (VmHWM) from a /proc/<pid>/status text."""
    for line in status_text.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return None
