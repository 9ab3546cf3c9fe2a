"""Make a Python process import like a device: what an edge install lacks cannot be imported.

Used by the tests, benchmarks and hardware-in-loop runs that must prove the device path never
touches PyTorch (or the coordinator's code): a child process calls :func:`block_imports` first,
then runs device code; any forbidden import fails loudly instead of silently inflating memory.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable

DEVICE_FORBIDDEN = ("torch", "coordinator", "export", "onnx", "onnxscript")


class _ImportBlocker:
    def __init__(self, names: Iterable[str]) -> None:
        self.names = frozenset(names)

    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        if name.split(".")[0] in self.names:
            raise ImportError(f"{name} must not be imported on a device")


def block_imports(names: Iterable[str] = DEVICE_FORBIDDEN) -> None:
    """Refuse these top-level packages from now on in this process."""
    sys.meta_path.insert(0, _ImportBlocker(names))
