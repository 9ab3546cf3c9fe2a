"""The coordinator CLI: the demo end to end (quick mode, embedded broker) and clear errors for
bad arguments."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def fedge(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from coordinator.cli import app; app()", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})


@pytest.mark.slow
def test_demo_runs_end_to_end_on_the_embedded_broker_with_the_shipped_model(tmp_path) -> None:
    """The default demo: the shipped backbone (nothing pretrained here, ~12 s on 2 idle cores; `--quick` would
    pretrain one first, which took minutes on the shared machine), exported, run by 3 devices for 2 rounds."""
    pytest.importorskip("iotcore")
    out = tmp_path / "demo"
    proc = fedge("demo", "--devices", "3", "--rounds", "2", "--broker", "embedded", "--out", str(out),
                 env={"FEDGE_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "iotcore" in proc.stdout and "final" in proc.stdout
    assert "dashboard (live while the demo runs): http://127.0.0.1:" in proc.stdout
    result = json.loads((out / "demo.json").read_text())
    assert [r["round"] for r in result["rows"]] == [1, 2, "final"]
    assert all(r["devices"] == "3/3" for r in result["rows"])
    assert len(result["devices"]) == 3 and result["parity"]["forecast_max_abs_err"] < 1e-4
    assert (out / "demo.png").stat().st_size > 10_000
    assert (out / "model" / "backbone.onnx").is_file()
    assert result["backbone"]["strategy"] == "shipped" and not (tmp_path / "cache").exists()  # nothing pretrained


@pytest.mark.parametrize(("args", "message"), [
    (("demo", "--strategy", "magic"), "unknown aggregation strategy"),
    (("demo", "--personalize", "telepathy=1"), "unknown personalisation option"),
    (("demo", "--task", "chess"), "--task must be"),
    (("demo", "--devices", "0"), "devices"),
    (("demo", "--data-dir", "/nonexistent/dir"), "does not exist"),
    (("demo", "--pretrain-strategy", "fedpm"), "cannot be the demo's backbone"),
    (("serve", "--init-head", "/nonexistent/head.npz"), "cannot start"),
    (("export", "/nonexistent/ckpt.pt"), "error"),
    (("status", "--db", "/nonexistent/fleet.sqlite"), "no fleet database"),
    (("pretrain", "--strategy", "fedavg", "--lr", "-1"), "--lr must be a positive number"),
    (("pretrain", "--strategy", "fedavg", "--lr", "nan"), "--lr must be a positive number"),
    (("pretrain", "--strategy", "fedavg", "--synthetic-share", "1"), "--synthetic-share must be in [0, 1)"),
    (("pretrain", "--strategy", "fedavg", "--batch-size", "0"), "batch-size"),
    (("pretrain", "--strategy", "fedprox", "--hparam", "nu=0.1"), "does not take these hyper-parameters"),
    (("pretrain", "--strategy", "fedprox", "--hparam", "mu=abc"), "is not a number"),
    (("pretrain", "--strategy", "fedavg", "--hparam", "weight_power=2"), "weight_power must be in [0, 1]"),
    (("pretrain", "--strategy", "magic"), "unknown strategy"),
])
def test_bad_arguments_exit_2_with_a_clear_message(args: tuple[str, ...], message: str) -> None:
    proc = fedge(*args, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in (proc.stdout + proc.stderr)
    assert "Traceback" not in proc.stdout + proc.stderr


@pytest.mark.broker
@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_serve_stops_on_a_signal_at_once_without_a_traceback(mosquitto, tmp_path, sig) -> None:
    """Ctrl-C or SIGTERM while `fedge serve` waits for devices: it returns within seconds, exit 0, no traceback
    (it used to raise KeyboardInterrupt wherever it was, and could leave a lock held for the writer to wait on)."""
    import signal
    import time

    serve = subprocess.Popen([sys.executable, "-c", "from coordinator.cli import app; app()", "serve", "--db",
                              str(tmp_path / "fleet.sqlite"), "--broker", f"127.0.0.1:{mosquitto.address.port}",
                              "--fleet", "sig",
                              "--min-devices", "1", "--wait-devices", "120"],
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while not (tmp_path / "fleet.sqlite").exists() and time.time() < deadline:
            time.sleep(0.2)
        time.sleep(2.0)  # connected and waiting for devices
        t0 = time.monotonic()
        serve.send_signal(getattr(signal, sig))
        out, err = serve.communicate(timeout=30)
        assert time.monotonic() - t0 < 10
        assert serve.returncode == 0 and "Traceback" not in err and "devices said hello" not in out + err, out + err
    finally:
        if serve.poll() is None:
            serve.kill()


def test_pretrain_hparams_become_the_strategys_keyword_arguments() -> None:
    from coordinator.cli import parse_hparams

    assert parse_hparams("fedavg", "weight_power=0, server_lr=1.5") == {"weight_power": 0, "server_lr": 1.5}
    assert parse_hparams("centralized", "balanced=true") == {"balanced": True}
    assert parse_hparams("fedprox", "") == {}
    with pytest.raises(ValueError, match="finite"):
        parse_hparams("fedprox", "mu=nan")
