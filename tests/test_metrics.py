"""Prometheus metrics: the coordinator's follow its state and counters (and are scraped over real HTTP), the
device daemon's land in a node-exporter textfile; both are parsed back with prometheus_client's own parser."""

from __future__ import annotations

import time
import urllib.request

import numpy as np
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from coordinator.fleet.metrics import FleetMetrics, serve_metrics
from coordinator.fleet.server import FleetConfig, FleetCoordinator, RoundResult
from coordinator.fleet.state import FleetState
from edge_client.daemon.config import DeviceConfig, MetricsConfig
from edge_client.daemon.metrics import DeviceMetrics
from edge_client.daemon.store import DeviceStore, IngestPosition
from edge_client.wire.mqtt import BrokerAddress

HEAD = {"w": np.zeros((2, 3), np.float32)}


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """(sample name, sorted labels) -> value."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def scrape(metrics: FleetMetrics) -> dict[tuple[str, tuple], float]:
    return samples(generate_latest(metrics.registry).decode())


def _fleet(tmp_path) -> FleetCoordinator:
    """A coordinator that is never connected: its state and counters are all the metrics read."""
    state = FleetState(tmp_path / "fleet.sqlite")
    coord = FleetCoordinator(FleetConfig(fleet="m"), BrokerAddress("127.0.0.1", 1), state)
    state.save_model("tsfm", HEAD, {"backbone_sha256": ""})
    for dev, st, bundle in (("a", "online", 2), ("b", "training", 1), ("c", "offline", None)):
        state.upsert_device(dev, runtime="onnxruntime", state=st, bundle_version=bundle)
    state.open_round("tsfm", "train", 0, ["a", "b", "c"], 2, time.time() + 60, {})
    state.add_update(1, "a", "m-a-1xxxx", 10, b"x" * 100, {"global_mse": 0.4, "personal_mse": 0.2, "naive_mse": 0.5})
    state.add_update(1, "b", "m-b-1xxxx", 10, b"x" * 300, {"global_mse": 0.6, "personal_mse": 0.4, "naive_mse": 0.5})
    state.close_round(1, HEAD, "tsfm")
    state.open_round("tsfm", "train", 1, ["a", "b", "c"], 3, time.time() + 60, {})
    state.fail_round(2)
    coord.receiver.rejected.update({"malformed": 2, "stale_round": 1})
    coord.receiver.accepted["update"] = 2
    coord.traffic.up[1], coord.traffic.down[1] = 400, 900
    return coord


def test_coordinator_metrics_follow_its_state_and_counters(tmp_path) -> None:
    coord = _fleet(tmp_path)
    metrics = FleetMetrics(coord)
    s = scrape(metrics)
    assert s[("fedge_devices_known", ())] == 3 and s[("fedge_devices_online", ())] == 2
    assert s[("fedge_devices", (("state", "offline"),))] == 1
    assert s[("fedge_rounds_opened_total", (("kind", "train"),))] == 2
    assert s[("fedge_rounds_closed_total", (("kind", "train"),))] == 1
    assert s[("fedge_rounds_failed_total", (("kind", "train"),))] == 1
    assert s[("fedge_messages_rejected_total", (("reason", "malformed"),))] == 2
    assert s[("fedge_messages_rejected_total", (("reason", "stale_round"),))] == 1
    assert s[("fedge_updates_received_total", ())] == 2
    assert s[("fedge_bytes_received_total", ())] == 400 and s[("fedge_bytes_sent_total", ())] == 900
    assert s[("fedge_model_version", (("task", "tsfm"),))] == 1
    assert s[("fedge_devices_bundle", (("version", "2"),))] == 1
    assert s[("fedge_devices_bundle", (("version", "none"),))] == 1
    # restored from the newest closed round in the state: a restarted coordinator shows it at once
    assert s[("fedge_fleet_mse", (("model", "global"),))] == pytest.approx(0.5)
    assert s[("fedge_fleet_mse", (("model", "personal"),))] == pytest.approx(0.3)
    assert s[("fedge_fleet_mse_round", ())] == 1
    assert not any(name == "fedge_privacy_epsilon" for name, _ in s)  # no DP, no epsilon
    assert not any(name == "fedge_open_round" for name, _ in s)

    coord.state.save_model("tsfm", HEAD, {"dp_epsilon": 1.5})
    result = RoundResult(3, "train", 1, 2, ("a", "b"), {"a": {"global_mse": 0.3, "naive_mse": 0.5}},
                         {"a": 10}, 100, 200, 4.0, aggregation_s=0.02)
    for observe in coord.round_observers:
        observe(result)
    s = scrape(metrics)
    assert s[("fedge_privacy_epsilon", (("task", "tsfm"),))] == 1.5
    assert s[("fedge_model_version", (("task", "tsfm"),))] == 2
    assert s[("fedge_round_duration_seconds_count", (("kind", "train"), ("state", "closed")))] == 1
    assert s[("fedge_round_duration_seconds_bucket", (("kind", "train"), ("le", "5.0"), ("state", "closed")))] == 1
    assert s[("fedge_aggregation_seconds_sum", ())] == pytest.approx(0.02)
    assert s[("fedge_fleet_mse", (("model", "global"),))] == pytest.approx(0.3)
    assert ("fedge_fleet_mse", (("model", "personal"),)) not in s  # not reported this round: absent, not stale
    assert s[("fedge_fleet_mse_round", ())] == 3


def test_metrics_are_scraped_over_http(tmp_path) -> None:
    coord = _fleet(tmp_path)
    server, _thread = serve_metrics(FleetMetrics(coord), "127.0.0.1", 0)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.server_port}/metrics", timeout=10) as resp:
            text = resp.read().decode()
    finally:
        server.shutdown()
    assert samples(text)[("fedge_devices_known", ())] == 3


def test_device_metrics_textfile(tmp_path) -> None:
    store = DeviceStore(tmp_path / "state")
    store.save_ingest_position("csv:/data/meter.csv", IngestPosition(good=90, bad=4))
    store.outbox_put(1, "msg-00001", "t", b"payload")
    path = tmp_path / "textfile" / "fedge.prom"
    path.parent.mkdir()
    metrics = DeviceMetrics(MetricsConfig(textfile=str(path)), store, "meter-1", lambda: 3)
    metrics.observe_round("train", 0.2, {"global_mse": 0.1, "rule_hits_range": 3})
    metrics.observe_round("train", 0.4, {"rule_hits_range": 5, "rule_hits_rate": 1})
    metrics.write()
    s = samples(path.read_text())
    assert s[("fedge_edge_round_seconds_count", (("kind", "train"),))] == 2
    assert s[("fedge_edge_round_seconds_sum", (("kind", "train"),))] == pytest.approx(0.6)
    assert s[("fedge_edge_rule_hits_total", (("rule", "range"),))] == 5  # cumulative counts, not added twice
    assert s[("fedge_edge_rule_hits_total", (("rule", "rate"),))] == 1
    assert s[("fedge_edge_ingest_errors_total", (("source", "csv:/data/meter.csv"),))] == 4
    assert s[("fedge_edge_outbox_depth", ())] == 1
    assert s[("fedge_edge_bundle_version", ())] == 3
    assert s[("fedge_edge_peak_rss_bytes", ())] > 10e6
    store.close()


def test_device_metrics_are_off_by_default_and_need_a_target(tmp_path) -> None:
    base = {"device_id": "meter-1", "backbone": "/opt/backbone.onnx"}
    assert DeviceConfig.model_validate(base).metrics is None
    assert DeviceConfig.model_validate({**base, "metrics": {"listen": "127.0.0.1:9465"}}).metrics.listen
    with pytest.raises(ValueError, match="textfile' or 'listen"):
        DeviceConfig.model_validate({**base, "metrics": {}})
    with pytest.raises(ValueError):
        DeviceConfig.model_validate({**base, "metrics": {"listen": "no-port"}})


def _exposed_names(registry) -> set[str]:  # type: ignore[no-untyped-def]
    """Every series name a registry can expose, including families that have no sample right now."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    return {fam.name + s for fam in registry.collect() for s in suffixes.get(fam.type, ("",))}


def test_the_grafana_dashboard_asks_only_for_metrics_that_exist(tmp_path) -> None:
    import json
    import re
    from pathlib import Path

    grafana = json.loads((Path(__file__).parent.parent / "docs" / "grafana" / "fedge-fleet.json").read_text())
    exprs = [t["expr"] for p in grafana["panels"] for t in p.get("targets", [])]
    used = {name for e in exprs for name in re.findall(r"\bfedge_[a-z_]+", e)}
    store = DeviceStore(tmp_path / "state")
    device = DeviceMetrics(MetricsConfig(textfile=str(tmp_path / "x.prom")), store, "d", lambda: 1)
    exposed = _exposed_names(FleetMetrics(_fleet(tmp_path)).registry) | _exposed_names(device.registry)
    assert used and used <= exposed, sorted(used - exposed)
    assert {"fedge_fleet_mse", "fedge_privacy_epsilon", "fedge_edge_peak_rss_bytes"} <= used
    store.close()
