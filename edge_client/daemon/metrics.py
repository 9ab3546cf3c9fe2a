"""The device daemon's own Prometheus metrics: a node-exporter textfile and/or a local /metrics endpoint.

Off by default, and prometheus_client is imported only when the config has a ``[metrics]`` table, so
the edge install does not carry it (``pip install 'fedge[metrics]'`` adds it: pure Python, no
dependencies). Like the coordinator's, most numbers are read from what the daemon already keeps
(its store's outbox and ingest counters, the process's peak RSS) when they are collected; only the
round time and the rule hits are observed as rounds finish.
"""

from __future__ import annotations

import logging
import resource
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

from edge_client.daemon.config import MetricsConfig
from edge_client.daemon.store import DeviceStore

log = logging.getLogger("fedge.metrics")

DEVICE_ROUND_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300, float("inf"))


class MetricsUnavailable(ValueError):
    """[metrics] is configured but prometheus_client is not installed."""


def peak_rss_bytes() -> int:
    """The process's peak resident set size (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


class DeviceMetrics:
    def __init__(self, cfg: MetricsConfig, store: DeviceStore, device_id: str,
                 bundle_version: Callable[[], int | None] = lambda: None) -> None:
        try:
            from prometheus_client import CollectorRegistry, Histogram
            from prometheus_client import Counter as PCounter
        except ImportError:
            raise MetricsUnavailable("[metrics] needs prometheus_client: pip install 'fedge[metrics]'") from None
        self.cfg, self.store, self.device_id, self.bundle_version = cfg, store, device_id, bundle_version
        self.registry = CollectorRegistry()
        self.round_seconds = Histogram("fedge_edge_round_seconds", "Local training and evaluation time of a round",
                                       ["kind"], buckets=DEVICE_ROUND_BUCKETS, registry=self.registry)
        self.rounds = PCounter("fedge_edge_rounds", "Rounds this process answered", ["kind"], registry=self.registry)
        self.rule_hits: Counter[str] = Counter()
        self._rule_family = PCounter("fedge_edge_rule_hits", "Forecast values a rule guard corrected", ["rule"],
                                     registry=self.registry)
        self.registry.register(self)  # collect() below: the numbers read at collection time
        self._server: Any = None

    def describe(self) -> list:
        return []  # collected fresh each time; nothing to pre-register

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        yield GaugeMetricFamily("fedge_edge_peak_rss_bytes", "Peak resident memory of the daemon",
                                value=peak_rss_bytes())
        counts = self.store.outbox_counts()
        yield GaugeMetricFamily("fedge_edge_outbox_depth", "Updates stored but not yet acknowledged by the broker",
                                value=counts.get("pending", 0) + counts.get("sent", 0))
        yield GaugeMetricFamily("fedge_edge_readings", "Readings in the device's store", value=self.store.n_samples())
        bad = CounterMetricFamily("fedge_edge_ingest_errors", "Input lines that could not be read, per source",
                                  labels=["source"])
        for source, (_, n_bad) in self.store.ingest_counts().items():
            bad.add_metric([source], n_bad)
        yield bad
        version = self.bundle_version()
        if version is not None:
            yield GaugeMetricFamily("fedge_edge_bundle_version", "Installed signed bundle version", value=version)

    def observe_round(self, kind: str, seconds: float, metrics: dict[str, float]) -> None:
        """After each update: its compute time, and the rule guards' cumulative hit counts if it reports them
        (``rule_hits_<rule>`` metrics)."""
        self.round_seconds.labels(kind).observe(seconds)
        self.rounds.labels(kind).inc()
        for key, value in metrics.items():
            if key.startswith("rule_hits_"):
                rule = key.removeprefix("rule_hits_")
                new = int(value) - self.rule_hits[rule]
                if new > 0:
                    self._rule_family.labels(rule).inc(new)
                    self.rule_hits[rule] = int(value)

    def start(self) -> None:
        if self.cfg.listen:
            from prometheus_client import start_http_server

            host, _, port = self.cfg.listen.rpartition(":")
            self._server = start_http_server(int(port), addr=host, registry=self.registry)
            log.info("device metrics on http://%s/metrics", self.cfg.listen)
        self.write()

    def write(self) -> None:
        """Rewrite the textfile (prometheus_client writes a temporary file and renames it: node-exporter
        never reads half a file). An unwritable path is logged, never fatal."""
        if not self.cfg.textfile:
            return
        from prometheus_client import write_to_textfile

        try:
            write_to_textfile(self.cfg.textfile, self.registry)
        except OSError as exc:
            log.error("cannot write metrics to %s: %s", self.cfg.textfile, exc)

    def stop(self) -> None:
        self.write()
        if self._server is not None:
            server = self._server[0] if isinstance(self._server, tuple) else self._server
            server.shutdown()
