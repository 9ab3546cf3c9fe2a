"""Updates stored by several `fedge ingest` processes on an MQTT v5 shared subscription, one `fedge serve`
aggregating, PostgreSQL as the shared state: every update stored and aggregated once, and the work really split."""

from __future__ import annotations

import psycopg
import pytest

from coordinator.loadtest.harness import LoadConfig, run_loadtest

pytestmark = [pytest.mark.broker, pytest.mark.slow]


def test_two_ingest_workers_share_the_updates_through_postgres(postgres_url, tiny_export, tmp_path) -> None:
    cfg = LoadConfig(devices=16, rounds=2, procs=1, n_train=48, n_eval=4, deadline_s=120, state=postgres_url,
                     serve_args=("--ingest-workers", "2"), work_dir=tmp_path, cache_dir=tmp_path / "cache",
                     model_dir=tiny_export["dir"], bank_windows=300, online_timeout_s=120)
    result = run_loadtest(cfg)
    assert result.state_backend == "postgres"
    assert result.rounds_done == 2 and result.updates == [16, 16]
    assert result.lost == 0 and result.duplicated == 0
    with psycopg.connect(postgres_url) as con:
        rows = con.execute("SELECT round_id, ingester, count FROM round_sums ORDER BY round_id, ingester").fetchall()
        closed = con.execute("SELECT COUNT(*) FROM rounds WHERE state = 'closed' AND new_version IS NOT NULL")
        assert closed.fetchone()[0] == 2
    assert {ingester for _, ingester, _ in rows} == {"ingest-0", "ingest-1"}  # the broker split the stream
    assert all(sum(c for r, _, c in rows if r == rid) == 16 for rid in (1, 2))


def test_ingest_workers_with_a_fleet_folder_are_refused_with_the_reason(tmp_path) -> None:
    """Workers neither verify device signatures nor sign their receipts yet: `fedge serve` says so and stops, rather
    than running a secured fleet whose updates nobody checks."""
    from coordinator.fleet.pki import FleetPKI
    from tests.test_cli import fedge

    FleetPKI(tmp_path / "fleet").init("secure", ("127.0.0.1",), 1_000_000)
    out = fedge("serve", "--fleet-dir", str(tmp_path / "fleet"), "--ingest-workers", "2", "--db",
                str(tmp_path / "fleet.sqlite"), "--broker", "127.0.0.1:1", timeout=120)
    assert out.returncode != 0
    assert "--ingest-workers" in out.stdout + out.stderr and "--fleet-dir" in out.stdout + out.stderr
    assert not (tmp_path / "fleet.sqlite").exists()  # refused before anything was created
