"""The `fedge` entry point on a device-only install: one clear line and exit 2, never a traceback."""

from __future__ import annotations

import subprocess
import sys


def test_fedge_without_the_coordinator_extra_names_what_to_install() -> None:
    # a device-only install has neither typer nor rich: make both unimportable in a child interpreter
    code = ("import sys; sys.modules['typer'] = None; sys.modules['rich'] = None\n"
            "from coordinator.entry import main; main()")
    proc = subprocess.run([sys.executable, "-c", code, "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "pip install 'fedge[coordinator]'" in proc.stderr and "Traceback" not in proc.stderr


def test_fedge_with_the_coordinator_extra_runs_the_cli() -> None:
    proc = subprocess.run([sys.executable, "-c", "from coordinator.entry import main; main()", "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "demo" in proc.stdout
