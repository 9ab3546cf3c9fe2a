"""The smallest device install, built and run as README and hardware/INSTALL.md document it: fedge's wheel built
from the checkout, a venv without pip, `pip --python V/bin/python install --no-compile 'fedge[tflite]'` (numpy < 2 +
tflite-runtime: no ONNX Runtime, torch, rich/typer or pip). Its `fedge-edge info` and `status` run on the shipped
.tflite backbone as the systemd unit runs them (benchmarks/device_install.py's smoke), its `fedge-edge run` joins a
real broker and announces itself with a Hello the wire decodes, and the whole venv, measured after that, must be
within issue 14's 100 MB. With an aarch64 rootfs (hardware/qemu/make-rootfs.sh) the same install is made and run by
an aarch64 CPython under qemu and held to the same 100 MB."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from coordinator.pretrain.shipped import VERSION
from edge_client.wire import Hello, decode
from edge_client.wire.mqtt import connect, make_client
from edge_client.wire.topics import Topics

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from device_install import LIMIT_MB, SHIPPED, SMALL, VARIANTS, build_wheel, device_config, measure, measure_aarch64

from hardware import emulation

pytestmark = [pytest.mark.slow, pytest.mark.broker]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    return build_wheel(tmp_path_factory.mktemp("build"))


@pytest.mark.timeout(900)  # the wheel, an install from the index, the daemon's runs
def test_tflite_device_install_is_within_100_mb_and_runs_the_daemon(mosquitto, tmp_path, wheel):
    name = SMALL
    row = measure(VARIANTS[name], tmp_path, wheel, keep=True)
    assert not row["onnxruntime"] and not row["torch"] and not row["rich"], row["packages_mb"]
    assert row["smoke_ok"], row["smoke"]
    assert "litert" in row["smoke"]
    assert not row["pip_in_venv"] and row["pyc_mb"] < 0.1, row  # the documented install makes neither
    assert row["shipped_model"] == [f"{VERSION}.tar.xz"], row["shipped_model"]  # packed, not the plain folder
    assert row["total_mb"] <= LIMIT_MB, row["packages_mb"]
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


@pytest.mark.timeout(1800)  # pip and the daemon run emulated
def test_tflite_device_install_on_aarch64_is_within_100_mb_and_runs(tmp_path, wheel):
    """A real aarch64 install (pip run by Debian bookworm's aarch64 CPython under qemu: it picks the aarch64 wheels),
    its daemon's `info` and `status` on the fp32 .tflite backbone. Minutes under emulation (3-13 on 2 cores), so
    it runs on request only; the x86-64 test above holds every run to the same limit with the same wheel."""
    if os.environ.get("FEDGE_AARCH64_INSTALL_TEST") != "1":
        pytest.skip("emulated aarch64 install takes minutes: FEDGE_AARCH64_INSTALL_TEST=1 runs it "
                    "(benchmarks/device_install.py --fresh measures it too)")
    try:
        row = measure_aarch64(tmp_path, wheel, int8=False)  # the int8 crash is the benchmark's finding
    except emulation.EmulationUnavailable as exc:
        pytest.skip(str(exc))
    assert row["arch"] == "aarch64" and not row["pip_in_venv"] and row["pyc_mb"] < 0.1, row
    assert row["smoke_ok"], row["smoke"]
    assert not row["onnxruntime"] and not row["torch"], row["packages_mb"]
    assert row["total_mb"] <= LIMIT_MB, row["packages_mb"]
