"""Which Python runs the device side of a hardware-in-loop run: this host's, or an aarch64 CPython
under qemu-user emulation when the profile's architecture differs from the host's.

The aarch64 userland (Debian arm64 CPython 3.11 + manylinux aarch64 wheels of the device stack) and
a recent ``qemu-aarch64`` are built by ``hardware/qemu/make-rootfs.sh`` into ``~/.cache/fedge``; they
are never built implicitly (a few hundred MB and minutes of download). qemu is run explicitly with
``-L ROOTFS``, so no binfmt_misc registration or chroot is needed.

Emulated timings are not hardware timings: qemu translates every instruction (typically 5-20x slower
than the host and unlike any real Cortex core); they show that the aarch64 wheels and the daemon work
and how memory behaves, not how fast a Pi is. Every result says which way it ran.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("FEDGE_CACHE", Path.home() / ".cache" / "fedge"))
MIN_QEMU = (8, 1)  # older qemu-user shows the host's x86 /proc/cpuinfo; ORT's cpuinfo then segfaults on import
MAKE_ROOTFS = "hardware/qemu/make-rootfs.sh"


class EmulationUnavailable(RuntimeError):
    """qemu or the aarch64 rootfs is missing; the message says which and how to get it."""


@dataclass(frozen=True)
class PythonTarget:
    """How to start the device's Python: ``argv`` replaces ``sys.executable`` in a command line."""

    argv: tuple[str, ...]
    arch: str
    emulated: bool
    note: str
    env: dict[str, str] = field(default_factory=dict)


def host_arch() -> str:
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(platform.machine().lower(), platform.machine().lower())


def rootfs_dir() -> Path:
    return Path(os.environ.get("FEDGE_AARCH64_ROOTFS", CACHE / "aarch64-rootfs"))


def _qemu_version(binary: str) -> tuple[int, int] | None:
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"version (\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else None


def find_qemu() -> tuple[str | None, str]:
    """(path of a usable qemu-aarch64, why not when None)."""
    candidates = [os.environ.get("FEDGE_QEMU"), str(rootfs_dir().parent / "qemu-aarch64"),
                  shutil.which("qemu-aarch64"), shutil.which("qemu-aarch64-static")]
    too_old = []
    for c in candidates:
        if not c or not Path(c).is_file() or not os.access(c, os.X_OK):
            continue
        version = _qemu_version(c)
        if version is not None and version >= MIN_QEMU:
            return c, ""
        too_old.append(f"{c} ({'.'.join(map(str, version)) if version else 'unknown version'})")
    if too_old:
        return None, (f"qemu-aarch64 older than {'.'.join(map(str, MIN_QEMU))} only: {', '.join(too_old)}; it passes "
                      f"the host's /proc/cpuinfo through and onnxruntime segfaults on import ({MAKE_ROOTFS} fetches "
                      "a newer one)")
    return None, f"no qemu-aarch64 (run {MAKE_ROOTFS}, which also fetches it)"


def find_rootfs() -> tuple[Path | None, str]:
    root = rootfs_dir()
    if (root / ".fedge-rootfs-ok").is_file() and (root / "usr/bin/python3.11").is_file():
        return root, ""
    return None, f"no aarch64 rootfs at {root} (build it with {MAKE_ROOTFS}; ~500 MB, a few minutes)"


def qemu_python() -> PythonTarget:
    """The aarch64 CPython under qemu, or :class:`EmulationUnavailable` with every missing piece."""
    qemu, why_q = find_qemu()
    rootfs, why_r = find_rootfs()
    if qemu is None or rootfs is None:
        raise EmulationUnavailable("; ".join(w for w in (why_q, why_r) if w))
    site = rootfs / "opt/fedge/site-packages"
    return PythonTarget(
        argv=(qemu, "-L", str(rootfs), str(rootfs / "usr/bin/python3.11")), arch="aarch64", emulated=True,
        note=f"aarch64 CPython under {Path(qemu).name} {'.'.join(map(str, _qemu_version(qemu) or ()))} user-mode "
             "emulation: timings are emulated, not hardware timings",
        # only the checkout and the aarch64 wheels: nothing from this host's (x86) environment
        env={"PYTHONPATH": f"{ROOT}{os.pathsep}{site}", "PYTHONNOUSERSITE": "1"})


def native_python(note: str = "") -> PythonTarget:
    return PythonTarget(argv=(sys.executable,), arch=host_arch(), emulated=False,
                        note=note or f"native {host_arch()} on this host")


def resolve(mode: str, profile_arch: str) -> PythonTarget:
    """``native``: this host's Python. ``qemu``: the emulated one or an error saying what is missing.
    ``auto``: native when the host already has the profile's architecture (a real Pi), else qemu when
    available, else native with the reason emulation was skipped in the note."""
    if mode not in ("auto", "qemu", "native"):
        raise ValueError(f"emulate must be auto, qemu or native, not {mode!r}")
    if mode == "native":
        return native_python()
    if mode == "qemu":
        return qemu_python()
    if not profile_arch or profile_arch == host_arch():
        return native_python(f"native {host_arch()}: the host has the profile's architecture")
    try:
        return qemu_python()
    except EmulationUnavailable as exc:
        return native_python(f"native {host_arch()}, not emulated {profile_arch}: {exc}")
