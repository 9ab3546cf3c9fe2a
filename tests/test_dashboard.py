"""The fleet dashboard: its pages and token rules over real HTTP, and a real fleet watched in a real browser.

The browser test is what a fleet owner does: a private Mosquitto, `fedge serve --ui` as its own process,
two simulated devices and one `fedge-edge run` daemon; Debian's headless Chromium (driven by Playwright,
never a browser Playwright downloads) opens the dashboard with its token, sees the devices appear and the
rounds advance without reloading, follows a device to its own page, and saves screenshots (desktop and
phone width). Set FEDGE_SCREENSHOT_DIR to keep them (docs/dashboard.png is one).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import paho.mqtt.publish as mqtt_publish
import pytest

from coordinator.dashboard.app import access_token, start_dashboard
from coordinator.dashboard.views import FleetView
from coordinator.fleet.simulation import carve_devices, start_devices
from coordinator.fleet.state import FleetState
from tests.waiting import wait_for

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
HEAD = {"w": np.zeros((2, 3), np.float32)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, headers: dict | None = None) -> tuple[int, str, dict]:
    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *a, **kw):
            return None

    opener = urllib.request.build_opener(NoRedirect)
    try:
        with opener.open(urllib.request.Request(url, headers=headers or {}), timeout=20) as resp:
            return resp.status, resp.read().decode(), dict(resp.headers)
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(), dict(err.headers)


def _answers(url: str, status: int) -> bool:
    try:
        return _get(url)[0] == status
    except urllib.error.URLError:  # not listening yet
        return False


def _small_fleet(path: Path) -> None:
    st = FleetState(path)
    st.save_model("tsfm", HEAD, {})
    for dev, state in (("meter-1", "online"), ("meter-2", "offline")):
        st.upsert_device(dev, profile="pi4", runtime="onnxruntime 1.22", state=state, n_train=50,
                         backbone_sha256="ab" * 32, bundle_version=1 if dev == "meter-1" else None)
    st.open_round("tsfm", "train", 0, ["meter-1", "meter-2"], 1, time.time() + 60, {})
    st.add_update(1, "meter-1", "m1-r1-xxxx", 50, b"x" * 2048, {"global_mse": 0.5, "personal_mse": 0.4,
                                                                 "naive_mse": 0.6})
    st.add_update(1, "meter-2", "m2-r1-xxxx", 50, b"x" * 2048, {"global_mse": 0.3, "personal_mse": 0.35,
                                                                 "naive_mse": 0.6})
    st.close_round(1, HEAD, "tsfm", meta={"dp_epsilon": 0.75})  # what a DP strategy records with its model
    st.open_round("tsfm", "train", 1, ["meter-1", "meter-2"], 1, time.time() + 60, {})
    st.close()


def test_pages_numbers_and_token(tmp_path) -> None:
    db = tmp_path / "fleet.sqlite"
    _small_fleet(db)
    server = start_dashboard(db, "127.0.0.1", 0, token="s3cret-token")
    base = f"http://127.0.0.1:{server.port}"
    try:
        status, body, _ = _get(base + "/")
        assert status == 401 and "token" in body
        assert _get(base + "/api/overview", {"Authorization": "Bearer wrong"})[0] == 401
        status, _, headers = _get(base + "/?token=s3cret-token")
        assert status == 303 and headers["location"] == base + "/"  # the token leaves the address bar
        assert "httponly" in headers["set-cookie"].lower() and "samesite=strict" in headers["set-cookie"].lower()
        cookie = {"Cookie": headers["set-cookie"].split(";")[0]}
        status, page, headers = _get(base + "/", cookie)
        assert status == 200 and "meter-1" in page and "meter-2" in page
        assert "default-src 'self'" in headers["content-security-policy"]
        auth = {"Authorization": "Bearer s3cret-token"}
        d = json.loads(_get(base + "/api/overview", auth)[1])
        assert (d["n_devices"], d["n_online"], d["model_version"], d["dp_epsilon"]) == (2, 1, 1, 0.75)
        r1, r2 = d["rounds"]
        assert (r1["state"], r1["reported"], r1["selected"], r2["state"]) == ("closed", 2, 2, "open")
        assert r1["global_mse"] == pytest.approx(0.4) and r1["personal_mse"] == pytest.approx(0.375)
        assert d["open_round"]["round_id"] == 2 and d["rejects"] is None  # not inside a coordinator
        gains = {x["device_id"]: x["gain_pct"] for x in d["devices"]}
        assert gains["meter-1"] == pytest.approx(20.0) and gains["meter-2"] == pytest.approx(-100 / 6)
        assert d["rollout"]["newest"] == 1 and d["rollout"]["on_newest"] == 1
        d = json.loads(_get(base + "/api/overview?q=ER-2", auth)[1])  # the device filter, case-insensitive
        assert [x["device_id"] for x in d["devices"]] == ["meter-2"] and d["n_devices"] == 2
        # the open round's numbers follow new updates (finished rounds come from the cache)
        writer = FleetState(db)
        writer.add_update(2, "meter-1", "m1-r2-xxxx", 50, b"y" * 10, {"global_mse": 0.2})
        d = json.loads(_get(base + "/api/overview", auth)[1])
        assert d["rounds"][1]["reported"] == 1 and d["rounds"][1]["global_mse"] == pytest.approx(0.2)
        assert d["rounds"][0]["kb_up"] == pytest.approx(4.0)
        assert writer.prune(keep_rounds=1)["update_payloads"] == 2  # round 1's deltas dropped by retention
        fresh = start_dashboard(db, "127.0.0.1", 0)  # a new process reads the pruned round from scratch
        try:
            r1 = json.loads(_get(f"http://127.0.0.1:{fresh.port}/api/overview")[1])["rounds"][0]
        finally:
            fresh.stop()
        assert r1["kb_up"] is None and r1["reported"] == 2 and r1["global_mse"] == pytest.approx(0.4)
        status, page, _ = _get(base + "/devices/meter-1", auth)
        assert status == 200 and page.count("<tr><td>") == 2  # its two rounds
        assert "+20.0 %" in page
        assert _get(base + "/devices/nobody", auth)[0] == 404
        assert _get(base + "/static/uPlot.iife.min.js", auth)[0] == 200
        writer.close()
    finally:
        server.stop()


def test_a_large_fleet_shows_the_devices_that_need_attention_first(tmp_path) -> None:
    db = tmp_path / "fleet.sqlite"
    _small_fleet(db)  # meter-1 online (+20 % gain), meter-2 offline
    st = FleetState(db)
    st.upsert_device("meter-3", state="online")  # no update yet: no gain known
    st.add_update(2, "meter-3", "m3-r2-xxxx", 5, b"z", {"global_mse": 0.5, "personal_mse": 0.45})  # +10 %
    st.close()
    view = FleetView(FleetState(db, readonly=True), devices_shown=2)
    d = view.overview()
    assert [x["device_id"] for x in d["devices"]] == ["meter-2", "meter-3"] and d["n_devices"] == 3
    assert len(d["charts"]["devices"]["names"]) == 2


def test_token_rules_and_a_read_only_state(tmp_path) -> None:
    assert access_token("127.0.0.1", None) is None and access_token("::1", None) is None
    assert access_token("localhost", None) is None
    generated = access_token("0.0.0.0", None)
    assert generated and len(generated) >= 20 and generated != access_token("0.0.0.0", None)
    assert access_token("192.0.2.1", "mine") == "mine"
    db = tmp_path / "fleet.sqlite"
    _small_fleet(db)
    ro = FleetState(db, readonly=True)
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        ro.upsert_device("intruder")
    ro.close()
    with pytest.raises(FileNotFoundError):
        FleetState(tmp_path / "missing.sqlite", readonly=True)


def test_dashboard_cli_refuses_a_missing_database(tmp_path) -> None:
    proc = subprocess.run([sys.executable, "-c", "from coordinator.cli import app; app()", "dashboard", "--db",
                           str(tmp_path / "none.sqlite")], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "no fleet database" in proc.stdout + proc.stderr


# ---------------------------------------------------------------------------------------------- in a browser

DAEMON_TOML = """device_id = "meter-d"
fleet = "{fleet}"
broker = "{host}:{port}"
backbone = "{backbone}"
horizon = 24
state_dir = "{state}"
profile = "pi4"
heartbeat_s = 2

[data]
kind = "dataset"
dataset = "etth1"
column = "OT"
start = 8640
stop = 11640

[metrics]
textfile = "{textfile}"
interval_s = 1
"""


def _browser():  # type: ignore[no-untyped-def]
    if not Path(CHROMIUM).exists():
        pytest.skip(f"Debian's chromium is not installed at {CHROMIUM} (.ci/run installs it: apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the dev extra")
    return sync_api.sync_playwright()


def _keep(path: Path) -> None:
    target = os.environ.get("FEDGE_SCREENSHOT_DIR")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(target) / path.name)


@pytest.mark.broker
@pytest.mark.slow
def test_a_real_fleet_seen_in_a_real_browser(mosquitto, tiny_export, tmp_path) -> None:
    fleet, db, token = "watched", tmp_path / "fleet.sqlite", "browser-token-123"
    ui_port, metrics_port = _free_port(), _free_port()
    clients = start_devices(carve_devices(2, seed=3), tiny_export["backbone"], mosquitto.address, fleet, horizon=24)
    slow = clients[0]
    original = slow.learner.run_round

    def late_round(*a, **kw):  # a round stays open long enough to be seen running
        time.sleep(2.5)
        return original(*a, **kw)

    slow.learner.run_round = late_round
    textfile = tmp_path / "node-exporter" / "fedge.prom"
    textfile.parent.mkdir()
    cfg = tmp_path / "device.toml"
    cfg.write_text(DAEMON_TOML.format(fleet=fleet, host=mosquitto.address.host, port=mosquitto.address.port,
                                      backbone=tiny_export["backbone"], state=tmp_path / "state", textfile=textfile))
    daemon = subprocess.Popen([sys.executable, "-c", "from edge_client.daemon.cli import app; app()", "run",
                               "--config", str(cfg)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    serve = subprocess.Popen(
        [sys.executable, "-c", "from coordinator.cli import app; app()", "serve", "--init-head",
         str(tiny_export["dir"] / "head.npz"), "--db", str(db), "--broker",
         f"{mosquitto.address.host}:{mosquitto.address.port}", "--fleet", fleet, "--rounds", "1000", "--min-devices",
         "3", "--deadline", "60", "--horizon", "24", "--local-epochs", "1", "--wait-devices", "90", "--ui",
         "--ui-bind", f"127.0.0.1:{ui_port}", "--metrics-bind", f"127.0.0.1:{metrics_port}"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ,
                                                                                 "FEDGE_UI_TOKEN": token})
    base = f"http://127.0.0.1:{ui_port}"
    try:
        wait_for(lambda: _answers(base + "/", 401), 90, "the dashboard to listen (and ask for its token)")
        with _browser() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(base + "/")
            assert "needs its token" in page.content()
            page.goto(f"{base}/?token={token}")
            assert page.url == base + "/"  # redirected: the token is now a cookie, not in the address
            # the page's CSP forbids eval, so the waits poll from here (locators) instead of page.wait_for_function
            wait_for(lambda: page.locator("#devices tr[data-device]").count() == 3, 90,
                     "three devices in the table")  # they appear without a reload
            assert page.locator("#devices tr[data-device='meter-d'] td").nth(3).inner_text() == "pi4"
            wait_for(lambda: "running" in page.locator("#round-status").inner_text(), 90, "a round shown running")
            assert page.locator("#rounds tr.open").count() == 1
            wait_for(lambda: page.locator("#rounds tr.closed").count() >= 2, 120, "two closed rounds")
            mqtt_publish.single(f"fedge/v1/{fleet}/rounds/99/updates/meter-d", b"\xc1 not msgpack",
                                hostname=mosquitto.address.host, port=mosquitto.address.port)
            page.wait_for_selector("#rejects td", timeout=30_000)
            assert "malformed" in page.locator("#rejects").inner_text()
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=20) as resp:
                text = resp.read().decode()  # scraped while the rounds run
            assert "fedge_devices_known 3.0" in text and 'fedge_messages_rejected_total{reason="malformed"}' in text
            assert 'fedge_rounds_closed_total{kind="train"}' in text
            wait_for(lambda: page.locator("#rounds tr.closed").count() >= 3, 120, "three closed rounds")
            curve = json.loads(page.locator("#chart-data").text_content())["error"]["global"]
            assert len([v for v in curve if v is not None]) >= 3
            assert page.locator(".chart canvas").count() == 4  # uPlot drew all four charts
            backbone = page.locator("#devices tr[data-device='meter-d'] td.mono").inner_text()
            assert backbone == tiny_export["export"].spec["files"]["backbone.onnx"]["sha256"][:12]
            page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
            _keep(tmp_path / "dashboard.png")

            page.click("#devices a:text('meter-d')")
            page.wait_for_url(base + "/devices/meter-d")
            assert page.locator("#history tbody tr").count() >= 3
            phone = browser.new_page(viewport={"width": 390, "height": 844}, is_mobile=True)
            phone.context.add_cookies(page.context.cookies())
            phone.goto(base + "/")
            phone.wait_for_selector("#devices tr[data-device]")
            # tables scroll inside their frames: the page itself never scrolls sideways on a phone
            assert phone.evaluate("() => document.documentElement.scrollWidth <= window.innerWidth + 1")
            phone.screenshot(path=str(tmp_path / "dashboard-phone.png"), full_page=True)
            _keep(tmp_path / "dashboard-phone.png")
            assert not errors, errors
            browser.close()

        serve.send_signal(signal.SIGINT)  # rounds go on until the owner stops it; the browser took its time
        out, _ = serve.communicate(timeout=60)
        assert f"dashboard: {base}/?token={token}" in out, out
        assert "round 3 closed" in out
        wait_for(lambda: textfile.exists() and "fedge_edge_round_seconds_count" in textfile.read_text(), 30,
                 "the daemon's metrics textfile")
        assert 'fedge_edge_rounds_total{kind="train"}' in textfile.read_text()
    finally:
        for proc in (serve, daemon):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
        for c in clients:
            c.stop()
