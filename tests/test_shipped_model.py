"""The pretrained model shipped inside the package: its files are intact and small, the torch checkpoint
and the ONNX files agree, and the ETTh1 score in its card (docs/model-card.md) is what the shipped
files actually score on the standard protocol, measured the way a device computes forecasts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from coordinator.pretrain import shipped
from edge_client.runtime.backbone import BackboneRunner, sha256_file

MAX_TOTAL_MB = 10.0


def test_every_shipped_file_matches_its_sha256_and_the_artifact_stays_small() -> None:
    folder = shipped.artifact_dir()
    spec = json.loads((folder / "spec.json").read_text())
    for name, info in spec["files"].items():
        assert sha256_file(folder / name) == info["sha256"], name
    for name in ("model.pt", "backbone.onnx", "backbone.int8.onnx", "backbone.tflite", "backbone.int8.tflite",
                 "head.npz", "card.json"):
        assert (folder / name).is_file(), name
    total = sum(p.stat().st_size for p in folder.iterdir()) / 2**20
    assert total < MAX_TOTAL_MB
    assert spec["version"] == shipped.VERSION


def test_checkpoint_and_onnx_backbone_are_the_same_model() -> None:
    import torch

    model, meta = shipped.load_shipped()
    spec = json.loads((shipped.artifact_dir() / "spec.json").read_text())
    assert model.model_id() == spec["model_id"] == shipped.card()["model_id"]
    assert meta["version"] == shipped.VERSION
    runner = BackboneRunner(shipped.artifact_dir() / "backbone.onnx", threads=1)
    x = np.random.default_rng(0).normal(size=(16, model.config.context)).cumsum(axis=1).astype(np.float32)
    with torch.inference_mode():
        feats, _, _ = model.features(torch.from_numpy(x))
    np.testing.assert_allclose(runner.features(x).feats, feats.numpy(), atol=1e-4)


def test_card_etth1_score_is_what_the_shipped_files_score() -> None:
    """ETTh1 test split, every stride-1 window of every channel, H96, ONNX fp32 backbone + numpy head."""
    folder = shipped.artifact_dir()
    card = shipped.card()
    measured = shipped.device_path_mse(folder / "backbone.onnx", folder / "head.npz", 96)
    assert measured["windows"] == (2880 - 96 + 1) * 7
    expected = card["device_path"]["backbone.onnx"]["96"]
    assert measured["mse"] == pytest.approx(expected["mse"], abs=2e-4)
    assert measured["mae"] == pytest.approx(expected["mae"], abs=2e-4)
    # and the device path agrees with the torch evaluation the benchmark tables report
    assert measured["mse"] == pytest.approx(card["scores"]["in_domain"]["etth1"]["H96"]["mse"], abs=2e-3)


def test_card_etth1_head_score_is_what_the_shipped_residual_head_scores() -> None:
    """head.etth1.npz -- the feature head plus a linear map of the last k context values -- on the device path
    (ONNX fp32 backbone + the numpy residual head), every ETTh1 test window, H96."""
    from edge_client.learning.residual import LAG_KEY

    folder = shipped.artifact_dir()
    card = shipped.card()
    measured = shipped.device_path_mse(folder / "backbone.onnx", folder / shipped.ETTH1_HEAD, 96)
    expected = card["device_path"][f"backbone.onnx + {shipped.ETTH1_HEAD}"]["96"]
    assert measured["mse"] == pytest.approx(expected["mse"], abs=2e-4)
    assert measured["mae"] == pytest.approx(expected["mae"], abs=2e-4)
    assert measured["mse"] == pytest.approx(card["scores"]["etth1_head"]["scores"]["H96"]["mse"], abs=2e-3)
    with np.load(folder / shipped.ETTH1_HEAD) as f:
        assert f[LAG_KEY].shape == (card["model"]["horizon"], card["etth1_head"]["lags"])


def test_model_card_reports_the_card_scores() -> None:
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "model-card.md").read_text()
    card = shipped.card()
    assert shipped.VERSION in text
    assert f"{card['scores']['in_domain']['etth1']['H96']['mse']:.3f}" in text
    assert f"{card['device_path']['backbone.onnx']['96']['mse']:.4f}" in text
    assert f"{card['scores']['etth1_head']['scores']['H96']['mse']:.3f}" in text
    assert f"{card['device_path'][f'backbone.onnx + {shipped.ETTH1_HEAD}']['96']['mse']:.4f}" in text


def test_tflite_backbone_agrees_with_onnx() -> None:
    pytest.importorskip("ai_edge_litert", reason="LiteRT runtime (fedge[litert]) not installed")
    folder = shipped.artifact_dir()
    onnx = BackboneRunner(folder / "backbone.onnx", threads=1)
    tfl = BackboneRunner(folder / "backbone.tflite", threads=1)
    x = np.random.default_rng(1).normal(size=(8, onnx.spec.context)).cumsum(axis=1).astype(np.float32)
    np.testing.assert_allclose(tfl.features(x).feats, onnx.features(x).feats, atol=1e-3)


def test_fedge_export_without_a_checkpoint_writes_the_shipped_files(tmp_path) -> None:
    from coordinator.cli import app

    result = CliRunner().invoke(app, ["export", "--out", str(tmp_path / "model")])
    assert result.exit_code == 0, result.output
    spec = json.loads((tmp_path / "model" / "spec.json").read_text())
    for name in ("backbone.onnx", "backbone.int8.onnx", "backbone.tflite", "backbone.int8.tflite", "head.npz"):
        assert sha256_file(tmp_path / "model" / name) == spec["files"][name]["sha256"]


def test_damaged_shipped_file_is_refused(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    fake = tmp_path / shipped.VERSION
    shutil.copytree(shipped.artifact_dir(), fake)
    (fake / "head.npz").write_bytes(b"not the head")
    monkeypatch.setattr(shipped, "ARTIFACT_DIR", fake)
    with pytest.raises(ValueError, match="sha256"):
        shipped.copy_device_files(tmp_path / "out")


def test_fedge_serve_starts_from_the_shipped_head_by_default() -> None:
    from coordinator.cli import app

    # no broker listens on port 1 of this machine: serve gets as far as connecting, after loading the head
    result = CliRunner().invoke(app, ["serve", "--broker", "127.0.0.1:1", "--wait-devices", "1"])
    assert result.exit_code != 0
    assert f"the shipped model {shipped.VERSION}" in result.output


@pytest.mark.slow
def test_pretrain_shipped_runs_the_recipe(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`fedge pretrain --strategy shipped` trains with the recipe's settings (budget shrunk here) and writes
    a checkpoint that reports its own ETTh1 score next to the shipped one."""
    # the CLI's and pretrain_command's defaults read shipped.SHARE at import: bind them before the patch below
    import coordinator.cli
    import coordinator.pretrain.federated  # noqa: F401
    from coordinator.models.checkpoints import read_checkpoint
    from edge_client.data.datasets import resolve_data_dir

    if resolve_data_dir() is None:
        pytest.skip("the shared datasets are not beside this checkout")
    monkeypatch.setattr(shipped, "RECIPE", {**shipped.RECIPE, "windows": 2 * 64 * 5, "rounds": 2})
    monkeypatch.setattr(shipped, "SHARE", 0.0)
    monkeypatch.setitem(shipped.RECIPE, "synthetic_share", 0.0)
    from rich.console import Console

    console = Console(record=True, width=200)
    path = shipped.reproduce(tmp_path, console=console)
    model, meta = read_checkpoint(path)
    assert meta["recipe"]["strategy"] == "centralized" and meta["recipe"]["rounds"] == 2
    assert model.config == shipped.tsfm_config()
    text = console.export_text()
    assert "ETTh1 test H96 MSE" in text and f"shipped {shipped.VERSION}" in text


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> Path:
    """The shipped folder packed the way setup.py packs it into the wheel."""
    from coordinator.pretrain.archive import pack

    return pack(shipped.ARTIFACT_DIR, tmp_path_factory.mktemp("wheel") / f"{shipped.VERSION}.tar.xz")


def test_wheel_archive_is_reproducible_and_smaller_than_the_folder(packed, tmp_path) -> None:
    from coordinator.pretrain.archive import pack

    again = pack(shipped.ARTIFACT_DIR, tmp_path / packed.name)
    assert again.read_bytes() == packed.read_bytes()  # same folder, same bytes: same wheel
    folder = sum(p.stat().st_size for p in shipped.ARTIFACT_DIR.iterdir() if p.is_file())
    assert packed.stat().st_size < 0.5 * folder  # the formats share their weights; xz stores them once


def test_installed_archive_gives_back_every_shipped_file_byte_for_byte(packed, tmp_path, monkeypatch) -> None:
    """An installed wheel has the archive, not the folder: the coordinator unpacks it once into its cache and
    `fedge export` writes the same sha256-checked files as from a checkout."""
    from coordinator.cli import app

    monkeypatch.setattr(shipped, "ARTIFACT_DIR", tmp_path / "site" / shipped.VERSION)  # not there, as in a wheel
    monkeypatch.setattr(shipped, "ARCHIVE", packed)
    monkeypatch.setenv("FEDGE_CACHE", str(tmp_path / "cache"))
    folder = shipped.artifact_dir()
    assert folder.is_relative_to(tmp_path / "cache")
    originals = sorted(p.name for p in (Path(__file__).resolve().parents[1] / "coordinator" / "pretrained"
                                        / shipped.VERSION).iterdir())
    for name in originals:
        assert sha256_file(folder / name) == sha256_file(
            Path(__file__).resolve().parents[1] / "coordinator" / "pretrained" / shipped.VERSION / name), name
    assert shipped.artifact_dir() == folder  # unpacked once, then reused
    assert shipped.card()["model_id"] == json.loads((folder / "spec.json").read_text())["model_id"]
    result = CliRunner().invoke(app, ["export", "--out", str(tmp_path / "model")])
    assert result.exit_code == 0, result.output
    assert sha256_file(tmp_path / "model" / "backbone.int8.tflite") == sha256_file(folder / "backbone.int8.tflite")


def test_archive_with_a_path_outside_its_folder_or_damaged_is_refused(packed, tmp_path, monkeypatch) -> None:
    import io
    import lzma
    import tarfile

    from coordinator.pretrain.archive import unpacked

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("../escape.txt")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    evil = tmp_path / "evil.tar.xz"
    evil.write_bytes(lzma.compress(buf.getvalue()))
    with pytest.raises(ValueError, match="unexpected member"):
        unpacked(evil, tmp_path / "cache")
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path / "cache" / "evil").exists()
    damaged = tmp_path / packed.name
    data = bytearray(packed.read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    monkeypatch.setattr(shipped, "ARTIFACT_DIR", tmp_path / "site" / shipped.VERSION)
    monkeypatch.setattr(shipped, "ARCHIVE", damaged)
    monkeypatch.setenv("FEDGE_CACHE", str(tmp_path / "cache2"))
    with pytest.raises(shipped.ShippedModelMissing, match="unreadable"):
        shipped.artifact_dir()


def test_reproduce_recipe_is_the_recipe_the_shipped_model_was_trained_with() -> None:
    """`fedge pretrain --strategy shipped` runs shipped.RECIPE; the card keeps the settings the shipped cell ran
    (benchmarks/foundation.py's recipe). The two are written in two places, so they must agree; a setting added
    after the ship ran at its default (the round-checkpoint rule)."""
    from coordinator.pretrain.federated import FederatedSettings

    card = shipped.card()
    trained = {**FederatedSettings().to_json(), **card["recipe"]}
    assert shipped.recipe_settings(len(card["silos"])).to_json() == trained


def test_pretrain_for_a_silo_strategy_defaults_to_the_shipped_recipe() -> None:
    """`fedge pretrain --strategy fedavg` (and every silo strategy) trains with the shipped recipe's lr, warmup and
    synthetic share unless told otherwise: its earlier defaults (lr 1e-3 from the first step, no synthetic silo)
    were recipe 1, which killed 62 of 64 features on a seed of the foundation grid."""
    import inspect

    from coordinator.cli import pretrain
    from coordinator.pretrain.federated import pretrain_command

    fn = inspect.signature(pretrain_command).parameters
    assert (fn["lr"].default, fn["warmup_rounds"].default, fn["synthetic_share"].default, fn["batch_size"].default) \
        == (shipped.LR, shipped.WARMUP_ROUNDS, shipped.SHARE, shipped.BATCH)
    cli = inspect.signature(pretrain).parameters
    assert (cli["lr"].default, cli["synthetic_share"].default, cli["batch_size"].default) \
        == (shipped.LR, shipped.SHARE, shipped.BATCH)
