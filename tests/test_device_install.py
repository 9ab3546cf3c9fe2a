"""The smallest device install, built and run: `pip install '.[tflite]'` (numpy < 2 + tflite-runtime, no ONNX
Runtime, no torch, no rich/typer) in a fresh virtualenv. Its `fedge-edge info` and `status` run on the shipped
.tflite backbone (benchmarks/device_install.py's smoke), and its `fedge-edge run` joins a real broker and announces
itself with a Hello the wire decodes. Issue 14 asks for at most 100 MB; this install is 102.5 MB on x86-64 today
(docs/results/device_install.md), so the bound here is the measured size plus a margin, to catch a dependency that
grows it, not the target."""

from __future__ import annotations

import hashlib
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from edge_client.wire import Hello, decode
from edge_client.wire.mqtt import connect, make_client
from edge_client.wire.topics import Topics

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from device_install import SHIPPED, VARIANTS, device_config, measure

pytestmark = [pytest.mark.slow, pytest.mark.broker]


def test_tflite_device_install_runs_the_daemon_without_onnxruntime_torch_or_rich(mosquitto, tmp_path):
    name = "fedge[tflite]: numpy < 2 + tflite-runtime"
    row = measure(name, VARIANTS[name], tmp_path, keep=True)
    assert not row["onnxruntime"] and not row["torch"] and not row["rich"], row["top_mb"]
    assert row["smoke_ok"], row["smoke"]
    assert "litert" in row["smoke"]
    assert row["total_mb"] < 106, row["top_mb"]
    onnx = subprocess.run([str(tmp_path / "venv" / "bin" / "fedge-edge"), "info", "--config",
                           str(device_config(tmp_path, "backbone.int8.onnx"))], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    assert onnx.returncode == 2 and "pip install 'fedge[onnx]'" in onnx.stderr, onnx.stderr  # names the extra

    broker = mosquitto.address
    cfg = device_config(tmp_path, VARIANTS[name][1], f"{broker.host}:{broker.port}")
    hellos: list[Hello] = []
    got = threading.Event()

    def on_message(_client, _userdata, msg) -> None:
        message = decode(msg.payload)
        if isinstance(message, Hello):
            hellos.append(message)
            got.set()

    listener = make_client("lean-listener", persistent=False)
    listener.on_message = on_message
    connect(listener, broker, persistent=False)
    listener.subscribe(Topics("demo").hello("lean-1"), qos=1)
    listener.loop_start()
    daemon = subprocess.Popen([str(tmp_path / "venv" / "bin" / "fedge-edge"), "run", "--config", str(cfg)],
                              cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        announced = got.wait(90)
    finally:
        daemon.send_signal(signal.SIGTERM)
        out, _ = daemon.communicate(timeout=30)
        listener.loop_stop()
        listener.disconnect()
    assert announced, out[-2000:]
    assert daemon.returncode == 0, out[-2000:]
    shipped = hashlib.sha256((SHIPPED / VARIANTS[name][1]).read_bytes()).hexdigest()
    assert hellos[0].device_id == "lean-1" and hellos[0].runtime.startswith("tflite-runtime"), hellos[0]
    assert hellos[0].backbone_sha256 == shipped
    assert "Traceback" not in out, out[-2000:]
