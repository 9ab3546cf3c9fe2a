"""fedge on a clustered broker: a 3-node NATS cluster (JetStream, MQTT 3.1.1 on every node) on loopback ports,
emulated devices spread over the three nodes, the coordinator (`fedge serve`, MQTT 3.1.1 mode) on the first;
rounds complete with every update stored and aggregated once."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from coordinator.fleet.broker import start_nats_cluster
from coordinator.loadtest.harness import LoadConfig, run_loadtest

pytestmark = [pytest.mark.broker, pytest.mark.slow]


@pytest.fixture
def nats_cluster():
    if shutil.which("nats-server") is None and not Path("/usr/sbin/nats-server").exists():
        pytest.fail("nats-server is not installed (Debian package nats-server)")
    cluster = start_nats_cluster(3)
    yield cluster
    cluster.stop()


def test_rounds_complete_with_devices_spread_over_a_three_node_nats_cluster(nats_cluster, tiny_export,
                                                                           tmp_path) -> None:
    nodes = ",".join(f"mqtt3://{n.host}:{n.port}" for n in nats_cluster.nodes)
    cfg = LoadConfig(devices=12, rounds=2, procs=1, n_train=48, n_eval=4, deadline_s=120, broker=nodes,
                     work_dir=tmp_path, cache_dir=tmp_path / "cache", model_dir=tiny_export["dir"], bank_windows=300,
                     online_timeout_s=120)
    result = run_loadtest(cfg)
    assert result.rounds_done == 2 and result.updates == [12, 12]
    assert result.lost == 0 and result.duplicated == 0
    assert result.rejected == {}
