"""Prometheus metrics of a running coordinator (`fedge serve --metrics-bind host:port`).

Why most of them are read at scrape time: the coordinator already counts what it receives (the
:class:`~edge_client.wire.Receiver`'s accepted and rejected counters, the round traffic) and keeps
devices, rounds and models in its state, so a collector that reads those when Prometheus asks adds no
hook to the message path and cannot drift from what ``fedge status`` shows. Only what exists for a
moment -- how long a round and its aggregation took, the fleet's errors in the round just closed -- is
observed, through the coordinator's ``round_observers``.

Names (all prefixed ``fedge_``): see :data:`METRIC_HELP`; docs/metrics.md lists them with their labels.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from coordinator.fleet.server import FleetCoordinator, RoundResult

log = logging.getLogger("fedge.metrics")

# which metric of a device's update is the fleet error of which model (the demo's table and plot use the same)
FLEET_MSE = {"global": "global_mse", "personal": "personal_mse", "naive": "naive_mse"}
ROUND_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, math.inf)
AGGREGATION_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, math.inf)


def fleet_means(metrics: dict[str, dict[str, float]]) -> dict[str, float]:
    """model -> mean over the devices that reported it (absent when none did)."""
    out = {}
    for model, key in FLEET_MSE.items():
        values = [m[key] for m in metrics.values() if key in m and math.isfinite(m[key])]
        if values:
            out[model] = sum(values) / len(values)
    return out


class _StateCollector(Collector):
    """Everything derived from the coordinator's counters and its state, computed per scrape."""

    def __init__(self, coordinator: FleetCoordinator) -> None:
        self.coordinator = coordinator

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        c = self.coordinator
        state, task = c.state, c.cfg.task
        by_state = state.device_counts()
        online = sum(n for s, n in by_state.items() if s in ("online", "idle", "training"))
        yield GaugeMetricFamily("fedge_devices_known", "Devices registered in the fleet state",
                                value=sum(by_state.values()))
        yield GaugeMetricFamily("fedge_devices_online", "Devices connected now (online, idle or training)",
                                value=online)
        g = GaugeMetricFamily("fedge_devices", "Devices per last reported state", labels=["state"])
        for s, n in sorted(by_state.items()):
            g.add_metric([s], n)
        yield g

        counts = state.round_counts()
        for name, wanted, text in (("opened", None, "Rounds opened"), ("closed", "closed", "Rounds closed"),
                                   ("failed", "failed", "Rounds failed (quorum not met or aggregate refused)")):
            fam = CounterMetricFamily(f"fedge_rounds_{name}", text, labels=["kind"])
            for kind in sorted({k for k, _ in counts} | {"train"}):
                fam.add_metric([kind], sum(n for (k, s), n in counts.items() if k == kind and wanted in (None, s)))
            yield fam
        rec = c.open_round
        progress = GaugeMetricFamily("fedge_open_round", "The open round: its id, devices asked, updates stored",
                                     labels=["what"])
        if rec is not None:
            progress.add_metric(["round_id"], rec.round_id)
            progress.add_metric(["selected"], len(rec.selected))
            progress.add_metric(["reported"], len(state.reported(rec.round_id)))
        yield progress

        yield CounterMetricFamily("fedge_updates_received", "Updates that decoded and passed the receiver's checks",
                                  value=c.receiver.accepted.get("update", 0))
        yield CounterMetricFamily("fedge_updates_duplicate", "Second copies of a stored update (ignored)",
                                  value=c.duplicates)
        rej = CounterMetricFamily("fedge_messages_rejected", "Messages refused, by typed reason", labels=["reason"])
        for reason, n in sorted(dict(c.receiver.rejected).items()):
            rej.add_metric([reason], n)
        yield rej
        yield CounterMetricFamily("fedge_bytes_received", "Update payload bytes stored",
                                  value=sum(c.traffic.up.values()))
        yield CounterMetricFamily("fedge_bytes_sent", "Task and global-model payload bytes published to devices",
                                  value=sum(c.traffic.down.values()))

        latest = state.latest_model_meta(task)
        version = GaugeMetricFamily("fedge_model_version", "Current global model version", labels=["task"])
        eps = GaugeMetricFamily("fedge_privacy_epsilon", "Differential-privacy epsilon spent by the current model",
                                labels=["task"])
        if latest is not None:
            version.add_metric([task], latest[0])
            if isinstance(latest[1].get("dp_epsilon"), int | float):
                eps.add_metric([task], float(latest[1]["dp_epsilon"]))
        yield version
        yield eps  # a family without samples is not exposed: absent while DP is off

        bundles = GaugeMetricFamily("fedge_devices_bundle", "Devices per installed bundle version",
                                    labels=["version"])
        for v, n in sorted(state.bundle_versions().items(), key=lambda kv: (kv[0] is None, kv[0] or 0)):
            bundles.add_metric(["none" if v is None else str(v)], n)
        yield bundles


class FleetMetrics:
    """The coordinator's metrics in their own registry (several coordinators in one process, as the tests
    run them, never collide)."""

    def __init__(self, coordinator: FleetCoordinator, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.round_seconds = Histogram("fedge_round_duration_seconds", "Wall time of a round, open to close",
                                       ["kind", "state"], buckets=ROUND_BUCKETS, registry=self.registry)
        self.aggregation_seconds = Histogram("fedge_aggregation_seconds", "Time to aggregate and store a round",
                                             buckets=AGGREGATION_BUCKETS, registry=self.registry)
        self.fleet_mse = Gauge("fedge_fleet_mse", "Mean over devices of the newest closed round's held-back MSE",
                               ["model"], registry=self.registry)
        self.fleet_round = Gauge("fedge_fleet_mse_round", "The round fedge_fleet_mse comes from",
                                 registry=self.registry)
        self.registry.register(_StateCollector(coordinator))
        self._restore(coordinator)
        coordinator.round_observers.append(self.observe_round)

    def _restore(self, coordinator: FleetCoordinator) -> None:
        """A restarted coordinator shows the errors of the newest round in its state at once."""
        for row in coordinator.state.round_rows(limit=20):
            metrics = coordinator.state.round_metrics(row.round_id) if row.state == "closed" else {}
            if metrics:
                self._set_fleet_mse(row.round_id, metrics)
                return

    def _set_fleet_mse(self, round_id: int, metrics: dict[str, dict[str, float]]) -> None:
        means = fleet_means(metrics)
        if not means:
            return
        self.fleet_round.set(round_id)
        self.fleet_mse.clear()  # a model no device reported this round is absent, not left at an older value
        for model, value in means.items():
            self.fleet_mse.labels(model).set(value)

    def observe_round(self, result: RoundResult) -> None:
        self.round_seconds.labels(result.kind, result.state).observe(result.seconds)
        if result.kind == "train" and result.state == "closed":
            self.aggregation_seconds.observe(result.aggregation_s)
        if result.state == "closed":
            self._set_fleet_mse(result.round_id, result.metrics)


def serve_metrics(metrics: FleetMetrics, host: str, port: int) -> tuple[object, threading.Thread]:
    """prometheus_client's own HTTP server on a daemon thread: GET /metrics."""
    return start_http_server(port, addr=host, registry=metrics.registry)
