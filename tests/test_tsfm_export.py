"""TSFM model, centralized pretraining and ONNX export, on a TINY config so the file runs in
seconds: what the fleet relies on is the contract (shapes, RevIN, the numpy head formula, ONNX
parity at any batch size, the spec in the metadata, the checkpoint format), not the accuracy."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from coordinator.models.checkpoints import load_checkpoint, save_checkpoint
from coordinator.models.tsfm import TSFM, TSFMConfig
from coordinator.pretrain import training
from coordinator.pretrain.evaluate import evaluate_ett
from coordinator.pretrain.training import TrainResult, pretrained_tsfm, train_tsfm
from edge_client.data.datasets import load_series
from edge_client.learning.head import HEAD_KEYS
from edge_client.learning.windows import ETT_VAL_END
from edge_client.runtime.spec import SPEC_KEY
from export.onnx_export import check_parity, export_model, numpy_head, sha256_file

TINY = TSFMConfig(
    context=64, horizon=16, patch_len=8, stride=4, d_model=16, n_heads=2, n_layers=1, d_ff=32, feature_dim=16
)
QUICK = dict(train_rows=2000, batch_size=32, lr=2e-3, val_stride=16, log_every=10, threads=2, seed=0)


@pytest.fixture(scope="module")
def trained() -> TrainResult:
    return train_tsfm(TINY, steps=80, val_every=40, **QUICK)


@pytest.fixture(scope="module")
def exported(trained: TrainResult, tmp_path_factory: pytest.TempPathFactory):
    return export_model(trained.model, tmp_path_factory.mktemp("bundle"))


def raw_windows(context: int, n_steps: int = 0) -> np.ndarray:
    """The 7 ETTh1 channels' last `context` raw values before the test split: batch 7, real units."""
    values = load_series("etth1").values
    end = ETT_VAL_END + n_steps
    return np.ascontiguousarray(values[end - context : end].T, dtype=np.float32)


# ------------------------------------------------------------------------------ model


def test_config_roundtrip_and_patch_count() -> None:
    assert TSFMConfig().n_patches == 64  # PatchTST/64: L=512, P=16, S=8
    assert TSFMConfig(context=336).n_patches == 42
    assert TSFMConfig.from_dict(json.loads(json.dumps(TINY.to_dict()))) == TINY
    with pytest.raises(ValueError, match="unknown"):
        TSFMConfig.from_dict({**TINY.to_dict(), "bogus": 1})
    with pytest.raises(ValueError):
        TSFMConfig(d_model=30, n_heads=4)


def test_size_classes() -> None:
    tiny, small = TSFM(TSFMConfig.tiny()).n_params(), TSFM(TSFMConfig.small()).n_params()
    assert tiny <= 1_000_000
    assert 1_000_000 < small <= 5_000_000
    for cfg in (TSFMConfig.tiny(), TSFMConfig.small()):  # the fleet's 24-step head, float16
        upload_bytes = 2 * (cfg.feature_dim + 1) * 24 * (1 + cfg.n_quantiles)
        assert upload_bytes < 32 * 1024


def test_shapes_and_head_state(trained: TrainResult) -> None:
    model = trained.model
    x = torch.from_numpy(raw_windows(TINY.context))
    point, quantiles = model(x)
    features, loc, scale = model.features(x)
    assert point.shape == (7, 16) and quantiles.shape == (7, 3, 16)
    assert features.shape == (7, 16) and loc.shape == (7, 1) and scale.shape == (7, 1)
    state = model.head_state()
    assert tuple(state) == HEAD_KEYS
    assert [state[k].shape for k in HEAD_KEYS] == [(16, 16), (16,), (3, 16, 16), (3, 16)]
    assert all(v.dtype == np.float32 for v in state.values())


def test_fresh_quantile_head_starts_at_point_and_ordered() -> None:
    torch.manual_seed(0)
    model = TSFM(TINY).eval()
    with torch.no_grad():
        p_n, q_n, _, _ = model.forward_normalised(torch.from_numpy(raw_windows(TINY.context)))
    offsets = (q_n - p_n[:, None, :]).numpy()  # normalised units: fractions of the window's std
    np.testing.assert_allclose(offsets, np.broadcast_to([[[-0.128], [0.0], [0.128]]], offsets.shape), atol=2e-3)


def test_revin_makes_forecasts_affine_equivariant(trained: TrainResult) -> None:
    model = trained.model
    x = raw_windows(TINY.context)
    a, b = 3.7, -12.5
    with torch.no_grad():
        p1, q1 = (t.numpy() for t in model(torch.from_numpy(x)))
        p2, q2 = (t.numpy() for t in model(torch.from_numpy(a * x + b)))
    np.testing.assert_allclose(p2, a * p1 + b, atol=1e-3 * a * np.abs(p1).max())
    np.testing.assert_allclose(q2, a * q1 + b, atol=1e-3 * a * np.abs(q1).max())


def test_numpy_head_reproduces_torch(trained: TrainResult) -> None:
    model = trained.model
    x = torch.from_numpy(raw_windows(TINY.context))
    with torch.no_grad():
        features, loc, scale = (t.numpy() for t in model.features(x))
        point, quantiles = (t.numpy() for t in model(x))
    p_n, q_n = numpy_head(model.head_state(), features)
    np.testing.assert_allclose(p_n * scale + loc, point, atol=1e-4)
    np.testing.assert_allclose(q_n * scale[:, :, None] + loc[:, :, None], quantiles, atol=1e-4)


def test_load_head_state_roundtrip_and_shape_check(trained: TrainResult) -> None:
    clone = TSFM(TINY)
    state = {k: v * 2.0 for k, v in trained.model.head_state().items()}
    clone.load_head_state(state)
    for key in HEAD_KEYS:
        np.testing.assert_array_equal(clone.head_state()[key], state[key])
    with pytest.raises(ValueError, match="point_weight"):
        clone.load_head_state({**state, "point_weight": np.zeros((8, 16), np.float32)})


# --------------------------------------------------------------------------- training


def test_short_training_reduces_loss(trained: TrainResult) -> None:
    losses = [h["train_loss"] for h in trained.history]
    assert len(losses) == 8 and losses[-1] < losses[0]
    # the same training windows scored by the untrained start point (same seed -> same init)
    pool = training.training_pool(TINY, trained.settings, data_dir=None)
    x, y = pool.batch(np.arange(0, len(pool.starts), 5), TINY.context)
    torch.manual_seed(QUICK["seed"])
    untrained = TSFM(TINY).eval()
    levels = torch.tensor(TINY.quantiles)
    with torch.no_grad():
        before = float(training.forecast_loss(*untrained(x), y, levels))
        after = float(training.forecast_loss(*trained.model(x), y, levels))
    assert after < 0.9 * before  # 0.56 -> 0.44 on this data
    assert np.isfinite(trained.val_mse) and trained.best_step in (40, 80)
    assert not trained.model.training


def test_training_is_seeded() -> None:
    a = train_tsfm(TINY, steps=4, val_every=4, **QUICK).model.head_state()
    b = train_tsfm(TINY, steps=4, val_every=4, **QUICK).model.head_state()
    for key in HEAD_KEYS:
        np.testing.assert_array_equal(a[key], b[key])


def test_evaluate_ett_protocol(trained: TrainResult) -> None:
    full = evaluate_ett(trained.model, "test")
    # test targets cover rows [11520, 14400) exactly: 2880 - H + 1 windows per channel, 7 channels
    assert full["n_windows"] == 7 * (2880 - 16 + 1)
    assert 0.0 < full["mse"] < 5.0 and 0.0 < full["mae"] < 2.0 and full["crps"] > 0.0
    short = evaluate_ett(trained.model, "val", horizon=8)
    assert short["horizon"] == 8 and np.isfinite(short["mse"])
    with pytest.raises(ValueError, match="horizon"):
        evaluate_ett(trained.model, "test", horizon=32)


# ----------------------------------------------------------------------------- export


def test_onnx_parity_at_batch_1_and_7(trained: TrainResult, exported) -> None:
    report = check_parity(trained.model, exported.backbone, exported.head, raw_windows(TINY.context))
    assert report.batch_sizes == [1, 7]
    assert report.backbone_max_abs_err < 1e-4
    assert report.forecast_max_abs_err < 1e-4
    assert report.numpy_head_max_abs_err < 1e-4
    assert exported.parity.ok(1e-4)


def test_onnx_io_contract(exported) -> None:
    backbone = ort.InferenceSession(str(exported.backbone), providers=["CPUExecutionProvider"])
    head = ort.InferenceSession(str(exported.head), providers=["CPUExecutionProvider"])
    assert [i.name for i in backbone.get_inputs()] == ["context"]
    assert [o.name for o in backbone.get_outputs()] == ["features", "loc", "scale"]
    assert [o.name for o in head.get_outputs()] == ["point", "quantiles"]
    f, loc, scale = backbone.run(None, {"context": raw_windows(TINY.context)})
    assert f.shape == (7, 16) and loc.shape == (7, 1) and scale.shape == (7, 1)
    point, quantiles = head.run(None, {"features": f[:3]})
    assert point.shape == (3, 16) and quantiles.shape == (3, 3, 16)


def test_spec_in_onnx_metadata_and_spec_json(trained: TrainResult, exported) -> None:
    sess = ort.InferenceSession(str(exported.backbone), providers=["CPUExecutionProvider"])
    spec = json.loads(sess.get_modelmeta().custom_metadata_map[SPEC_KEY])
    assert (spec["context"], spec["horizon"], spec["feature_dim"]) == (64, 16, 16)
    assert (spec["patch_len"], spec["stride"], spec["quantiles"]) == (8, 4, [0.1, 0.5, 0.9])
    assert spec["n_params"] == trained.model.n_params()
    assert spec["model_id"] == trained.model.model_id()
    on_disk = json.loads(exported.spec_path.read_text())
    for path in (exported.backbone, exported.head, exported.head_npz):
        assert on_disk["files"][path.name]["sha256"] == sha256_file(path)
    assert on_disk["exporter"] == {"backbone": "dynamo", "head": "dynamo"}
    with np.load(exported.head_npz) as npz:
        for key, value in trained.model.head_state().items():
            np.testing.assert_array_equal(npz[key], value)


def test_export_is_single_file(exported) -> None:
    assert sorted(p.name for p in exported.out_dir.iterdir()) == [
        "backbone.onnx", "head.npz", "head.onnx", "spec.json"
    ]
    proto = onnx.load(str(exported.backbone), load_external_data=False)
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)


# ------------------------------------------------------------------------- checkpoints


def test_checkpoint_roundtrip(trained: TrainResult, tmp_path) -> None:
    path = save_checkpoint(trained.model, tmp_path / "m.pt", meta={"val_mse": trained.val_mse})
    loaded = load_checkpoint(path)
    assert loaded.config == TINY
    x = torch.from_numpy(raw_windows(TINY.context))
    with torch.no_grad():
        np.testing.assert_array_equal(loaded(x)[0].numpy(), trained.model(x)[0].numpy())


def test_load_checkpoint_rejects_bad_files(trained: TrainResult, tmp_path) -> None:
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x80\x02 definitely not a checkpoint")
    with pytest.raises(ValueError, match="not a readable"):
        load_checkpoint(corrupt)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    with pytest.raises(ValueError, match="not a TSFM checkpoint"):
        load_checkpoint(foreign)
    mismatched = save_checkpoint(trained.model, tmp_path / "mismatch.pt")
    payload = torch.load(mismatched, weights_only=True)
    payload["config"]["feature_dim"] = 32
    torch.save(payload, mismatched)
    with pytest.raises(ValueError, match="does not match"):
        load_checkpoint(mismatched)


def test_pretrained_cache_trains_once_then_loads(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    args = dict(steps=3, val_every=3, train_rows=1000, batch_size=16, val_stride=32, seed=1)
    first = pretrained_tsfm(tmp_path, TINY, threads=2, **args)
    (cached,) = tmp_path.glob("tsfm-*.pt")

    def no_training(*_: object, **__: object) -> TrainResult:
        raise AssertionError("should have loaded from the cache")

    monkeypatch.setattr(training, "train_with_settings", no_training)
    second = pretrained_tsfm(tmp_path, TINY, threads=2, **args)
    for key in HEAD_KEYS:
        np.testing.assert_array_equal(first.head_state()[key], second.head_state()[key])
    monkeypatch.undo()
    cached.write_bytes(b"garbage")  # a corrupt cache entry is retrained over, not fatal
    third = pretrained_tsfm(tmp_path, TINY, threads=2, **args)
    for key in HEAD_KEYS:
        np.testing.assert_array_equal(first.head_state()[key], third.head_state()[key])
    assert load_checkpoint(cached).config == TINY
