"""Shared fixtures: a real Mosquitto per test on a free port, one tiny exported TSFM per session, the recommender's
synthetic log and tiny exported SASRec; and a check that every test using a broker says so with `broker`."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import numpy as np
import pytest

from coordinator.fleet.broker import RunningBroker, start_mosquitto


@pytest.fixture
def mosquitto() -> RunningBroker:
    """A private Mosquitto (its own config, free port) so tests never share sessions or retained
    messages with each other or with the system broker."""
    if shutil.which("mosquitto") is None and not Path("/usr/sbin/mosquitto").exists():
        pytest.fail("mosquitto is not installed; .ci/run installs it (apt-get install mosquitto)")
    broker = start_mosquitto()
    yield broker
    broker.stop()


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory) -> dict:
    """A tiny TSFM trained for a few steps on ETTh1 and exported to ONNX, shared by the tests
    that need a real backbone (context 96, horizon 24, so device rounds take milliseconds)."""
    from coordinator.models.tsfm import TSFMConfig
    from coordinator.pretrain.training import train_tsfm
    from export.onnx_export import export_model

    cfg = TSFMConfig(context=96, horizon=24, patch_len=16, stride=8, d_model=16, n_heads=2, n_layers=1,
                     d_ff=32, dropout=0.0, feature_dim=16)
    result = train_tsfm(cfg, steps=30, batch_size=64, seed=0, threads=1, progress=False)
    out = tmp_path_factory.mktemp("tiny-export")
    exported = export_model(result.model, out)
    return {"model": result.model, "config": cfg, "dir": out, "export": exported,
            "backbone": out / "backbone.onnx"}


@pytest.fixture(scope="session")
def rec_log() -> np.ndarray:
    """40 users who walk through the "neighbourhoods" of 60 items over 100 days: sequential structure for the
    recommender tests to learn (MovieLens itself is not needed)."""
    n_users, n_items, rng = 40, 60, np.random.default_rng(0)
    rows = []
    for u in range(1, n_users + 1):
        n = int(rng.integers(15, 40))
        start = int(rng.integers(1, n_items))
        items = (start + np.cumsum(rng.integers(1, 4, n))) % n_items + 1
        items = list(dict.fromkeys(items.tolist()))  # each item once per user, as in ML-100K
        ts = np.sort(rng.integers(0, 100 * 86400, len(items)))
        rows += [(u, i, 4, t) for i, t in zip(items, ts, strict=True)]
    return np.array(rows, np.int64)


@pytest.fixture(scope="module")
def bundle(split, tmp_path_factory):
    """A tiny SASRec pretrained on period 0 of the requesting module's `split` for a few epochs, exported to ONNX."""
    import torch

    from coordinator.models.recommender import SASRec, SASRecConfig
    from coordinator.recsys.training import RecTrainSettings, train_sasrec, windows_for
    from export.recommender_export import export_recommender

    torch.manual_seed(0)
    model = SASRec(SASRecConfig(n_items=split.n_items, d=16, heads=1, blocks=1, max_len=10, dropout=0.0))
    x, y = windows_for(split, 0, 10)
    losses = train_sasrec(model, x, y, RecTrainSettings(epochs=5, batch_size=32, lr=5e-3, threads=1)).losses
    out = tmp_path_factory.mktemp("rec-export")
    exported = export_recommender(model, out)
    return {"model": model, "dir": out, "export": exported, "losses": losses}


def pytest_collection_modifyitems(config, items) -> None:  # type: ignore[no-untyped-def]
    """A test that starts a Mosquitto (the `mosquitto` fixture) must carry the `broker` marker, so
    `-m "not broker"` really runs without one."""
    unmarked = [item.nodeid for item in items
                if "mosquitto" in getattr(item, "fixturenames", ()) and item.get_closest_marker("broker") is None]
    if unmarked:
        raise pytest.UsageError(f"tests use the mosquitto fixture without @pytest.mark.broker: {unmarked}")


POSTGRES_ADMIN = os.environ.get("FEDGE_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")


@pytest.fixture
def postgres_url() -> str:
    """A fresh PostgreSQL database on the machine's server (trust auth), dropped afterwards."""
    import psycopg

    name = f"fedge_test_{uuid.uuid4().hex[:12]}"
    try:
        admin = psycopg.connect(POSTGRES_ADMIN, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        pytest.fail(f"PostgreSQL is not reachable at {POSTGRES_ADMIN} ({exc}); .ci/run starts it")
    with admin:
        admin.execute(f"CREATE DATABASE {name}")
    yield POSTGRES_ADMIN.rsplit("/", 1)[0] + f"/{name}"
    with psycopg.connect(POSTGRES_ADMIN, autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture(params=["sqlite", "postgres"])
def fleet_db(request, tmp_path) -> str:
    """Where a FleetState lives: a SQLite file, or a fresh PostgreSQL database (both backends, same tests)."""
    if request.param == "sqlite":
        return str(tmp_path / "fleet.sqlite")
    return request.getfixturevalue("postgres_url")
