"""Device profiles: how many cores and how much memory a device class has, which runtime it uses,
how many threads the backbone may take and which model format it prefers.

``runtime`` x ``preferred_format`` names the backbone a device runs from a bundle: onnxruntime + int8
-> ``backbone.int8.onnx``, litert + fp32 -> ``backbone.tflite`` (see ``edge_client.bundles.store.backbone_key``).

Profiles are TOML files shipped with the device package (``edge_client/runtime/profiles/*.toml``, not under
``hardware/``: a device reads its own profile, and edge_client imports nothing from hardware); bundles list the
profiles they are compatible with, and a device refuses a bundle that does not list its profile.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from edge_client.runtime.backbone import RUNTIMES  # onnxruntime | litert: picks the bundle's .onnx or .tflite

FORMATS = frozenset({"fp32", "int8"})


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    cores: int
    memory_mb: int
    runtime: str
    threads: int
    preferred_format: Literal["fp32", "int8"]
    description: str = ""
    arch: str = ""

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DeviceProfile:
        """Validate a parsed TOML table; a wrong profile should fail at start-up, not mid-round."""
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"profile {data.get('name')!r}: unknown keys {sorted(unknown)}")
        try:
            p = cls(**data)
        except TypeError as exc:
            raise ValueError(f"profile {data.get('name')!r}: {exc}") from None
        if p.runtime not in RUNTIMES:
            raise ValueError(f"profile {p.name}: runtime {p.runtime!r} not in {sorted(RUNTIMES)}")
        if p.preferred_format not in FORMATS:
            raise ValueError(f"profile {p.name}: format {p.preferred_format!r} not in {sorted(FORMATS)}")
        if not (isinstance(p.cores, int) and isinstance(p.threads, int) and 1 <= p.threads <= p.cores):
            raise ValueError(f"profile {p.name}: threads {p.threads} must be between 1 and cores {p.cores}")
        if not (isinstance(p.memory_mb, int) and p.memory_mb > 0):
            raise ValueError(f"profile {p.name}: memory_mb must be a positive integer")
        return p


def _profile_dir() -> Path:
    return Path(str(resources.files("edge_client.runtime") / "profiles"))


def list_profiles() -> list[str]:
    """Names of the shipped profiles."""
    return sorted(p.stem for p in _profile_dir().glob("*.toml"))


def load_profile(name_or_path: str | os.PathLike[str]) -> DeviceProfile:
    """A shipped profile by name ("pi4") or any profile TOML file by path."""
    path = Path(name_or_path)
    if path.suffix != ".toml":
        path = _profile_dir() / f"{name_or_path}.toml"
        if not path.is_file():
            raise ValueError(f"unknown device profile {name_or_path!r}; known: {', '.join(list_profiles())}")
    with open(path, "rb") as fh:
        return DeviceProfile.from_dict(tomllib.load(fh))
