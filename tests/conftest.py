"""Shared fixtures: a real Mosquitto per test on a free port, and one tiny exported TSFM per session."""

from __future__ import annotations

import shutil
from pathlib import Path

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
