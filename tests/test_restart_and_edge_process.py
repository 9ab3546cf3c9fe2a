"""Real processes: the coordinator killed mid-round and restarted (no update lost or counted
twice), and the device daemon running a round with torch made impossible to import."""

from __future__ import annotations

import ast
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from coordinator.fleet.server import FleetConfig, FleetCoordinator
from coordinator.fleet.simulation import carve_devices, start_devices
from coordinator.fleet.state import FleetState, params_from_blob
from edge_client import wire as P
from edge_client.learning.head import slice_head
from tests.waiting import db_rows, wait_for

pytestmark = pytest.mark.broker
ROOT = Path(__file__).resolve().parent.parent


def _serve_cmd(head: Path, db: Path, broker, fleet: str) -> list[str]:
    return [sys.executable, "-c", "from coordinator.cli import app; app()", "serve", "--init-head", str(head),
            "--db", str(db), "--broker", f"{broker.host}:{broker.port}", "--fleet", fleet, "--rounds", "1",
            "--min-devices", "3", "--deadline", "60", "--horizon", "24", "--local-epochs", "1", "--wait-devices", "30"]


def test_coordinator_killed_mid_round_resumes_and_counts_every_update_once(mosquitto, tiny_export, tmp_path):
    fleet, db, head = "restart", tmp_path / "fleet.sqlite", tiny_export["dir"] / "head.npz"
    clients = start_devices(carve_devices(3, seed=2), tiny_export["backbone"], mosquitto.address, fleet, horizon=24)
    slow = clients[2]
    original = slow.learner.run_round

    def late_round(*a, **kw):
        time.sleep(4.0)  # answers only after the coordinator has been killed
        return original(*a, **kw)

    slow.learner.run_round = late_round
    first = subprocess.Popen(_serve_cmd(head, db, mosquitto.address, fleet), cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: len(db_rows(db, "SELECT device_id FROM updates WHERE round_id=1")) >= 2, 60,
                 "two updates stored by the first coordinator")
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        assert len(db_rows(db, "SELECT 1 FROM updates")) == 2
        assert slow.updates_sent.acquire(timeout=30), "the slow device never got its update acknowledged"

        second = subprocess.run(_serve_cmd(head, db, mosquitto.address, fleet), cwd=ROOT, capture_output=True,
                                text=True, timeout=120)
        assert second.returncode == 0, second.stdout + second.stderr
        assert "(resumed)" in second.stdout
    finally:
        if first.poll() is None:
            first.kill()
        for c in clients:
            c.stop()

    assert db_rows(db, "SELECT round_id, state, base_version, new_version FROM rounds") == [(1, "closed", 0, 1)]
    payloads = db_rows(db, "SELECT device_id, payload FROM updates WHERE round_id=1 ORDER BY device_id")
    assert sorted(d for d, _ in payloads) == sorted(c.device_id for c in clients)
    updates = [P.decode(p) for _, p in payloads]
    models = {v: params_from_blob(b) for v, b in db_rows(db, "SELECT version, params FROM models")}
    assert sorted(models) == [0, 1]  # aggregated exactly once
    weights = np.array([u.n_samples for u in updates], np.float64)
    weights /= weights.sum()
    for k, base in models[0].items():
        expected = base + sum(w * u.delta[k].astype(np.float64) for w, u in zip(weights, updates, strict=True))
        np.testing.assert_allclose(models[1][k], expected, rtol=1e-5, atol=1e-6)


BLOCK_TORCH = """
import sys
from hardware.device_guard import block_imports
block_imports()
from edge_client.daemon.cli import app
try:
    app(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
assert 'torch' not in sys.modules, 'torch was imported'
print('NO_TORCH_OK', sorted(m for m in sys.modules if m.split('.')[0] in ('onnxruntime', 'numpy', 'paho'))[:3])
sys.exit(code)
"""


def test_device_daemon_runs_a_round_without_torch(mosquitto, tiny_export, tmp_path):
    fleet = "notorch"
    cfg = tmp_path / "device.toml"
    cfg.write_text(f"""device_id = "meter-1"
fleet = "{fleet}"
broker = "{mosquitto.address.host}:{mosquitto.address.port}"
backbone = "{tiny_export['backbone']}"
horizon = 24
state_dir = "{tmp_path / 'state'}"

[data]
kind = "dataset"
dataset = "etth1"
column = "OT"
start = 8640
stop = 13140
""")
    coord = FleetCoordinator(FleetConfig(fleet=fleet, deadline_s=60, local_epochs=1, min_devices=1),
                             mosquitto.address, FleetState(tmp_path / "fleet.sqlite")).start()
    coord.ensure_model(slice_head(tiny_export["model"].head_state(), 24))
    daemon = subprocess.Popen([sys.executable, "-c", BLOCK_TORCH, "run", "--config", str(cfg), "--max-rounds", "1"],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert coord.wait_for_devices(1, 30) == ["meter-1"]
        result = coord.run_round("train")
        out, _ = daemon.communicate(timeout=60)
    finally:
        if daemon.poll() is None:
            daemon.kill()
        coord.stop()
    assert daemon.returncode == 0, out
    assert "NO_TORCH_OK" in out
    assert result.state == "closed" and list(result.metrics) == ["meter-1"]


def test_edge_client_source_never_imports_coordinator_export_or_torch():
    """The import direction of the design: coordinator -> export -> edge_client.wire, never back."""
    for path in (ROOT / "edge_client").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                assert name.split(".")[0] not in {"torch", "coordinator", "export", "onnx"}, (path.name, name)


def test_daemon_reports_bad_config_clearly(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('device_id = "a/b"\nbackbone = "x.onnx"\n')
    proc = subprocess.run([sys.executable, "-c", "from edge_client.daemon.cli import app; app()", "info", "--config",
                           str(bad)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "device_id" in proc.stderr
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"not a model")
    good = tmp_path / "good.toml"
    good.write_text(f'device_id = "a"\nbackbone = "{corrupt}"\n')
    proc = subprocess.run([sys.executable, "-c", "from edge_client.daemon.cli import app; app()", "info", "--config",
                           str(good)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "cannot load" in proc.stderr and "backbone" in proc.stderr
