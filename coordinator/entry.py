"""The `fedge` command's entry point, importable on a device-only install.

Why: `pip install fedge` is the lean device install (no typer, rich or torch); the coordinator CLI needs the
coordinator extra. Without this shim a device owner who types `fedge` gets a ModuleNotFoundError traceback
instead of the one line that says what to install.
"""

from __future__ import annotations

import sys


def main() -> None:
    try:
        from coordinator.cli import app
    except ModuleNotFoundError as exc:
        sys.stderr.write(f"error: the coordinator CLI needs the coordinator extra (missing module {exc.name!r}): "
                         "pip install 'fedge[coordinator]'; on a device, the daemon is `fedge-edge`\n")
        raise SystemExit(2) from None
    app()
