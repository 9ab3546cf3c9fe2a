"""The residual head (feature head + a linear map of the last k context values): its numpy forecast, the refusals
that keep it out of the fleet's head path, and the closed-form fit's selection arithmetic."""

from __future__ import annotations

import numpy as np
import pytest

from coordinator.pretrain.residual_head import block_penalty, design, normal_equations, ridge_solve
from edge_client.learning.head import Features, head_forecast, head_shapes
from edge_client.learning.residual import (
    LAG_KEY,
    check_residual_head,
    head_lags,
    residual_forecast,
    slice_residual,
)
from edge_client.wire.codec import check_arrays
from edge_client.wire.errors import WrongShape

D, H, Q, L = 8, 12, 3, 32


def _head(rng: np.random.Generator, k: int = 0) -> dict[str, np.ndarray]:
    params = {n: rng.normal(size=s).astype(np.float32) for n, s in head_shapes(D, H, Q).items()}
    if k:
        params[LAG_KEY] = rng.normal(size=(H, k)).astype(np.float32)
    return params


def _inputs(rng: np.random.Generator, n: int = 5) -> tuple[Features, np.ndarray]:
    x = rng.normal(size=(n, L)).cumsum(axis=1).astype(np.float32)
    loc = x.mean(axis=1, keepdims=True)
    scale = x.std(axis=1, keepdims=True) + 0.5
    return Features(rng.normal(size=(n, D)).astype(np.float32), loc, scale), x


def test_without_a_lag_block_it_is_the_plain_head() -> None:
    rng = np.random.default_rng(0)
    params, (feats, x) = _head(rng), _inputs(rng)
    for a, b in zip(residual_forecast(params, feats, x), head_forecast(params, feats), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_lag_block_adds_the_normalised_lags_to_point_and_every_quantile() -> None:
    rng = np.random.default_rng(1)
    params, (feats, x) = _head(rng, k=7), _inputs(rng)
    point, quant = residual_forecast(params, feats, x)
    base_p, base_q = head_forecast({k: v for k, v in params.items() if k != LAG_KEY}, feats)
    lag = ((x[:, -7:] - feats.loc) / feats.scale) @ params[LAG_KEY].T * feats.scale  # back in data units
    np.testing.assert_allclose(point, base_p + lag, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(quant, base_q + lag[:, None, :], rtol=1e-4, atol=1e-4)
    short = slice_residual(params, 4)
    assert short[LAG_KEY].shape == (4, 7) and head_lags(short) == 7
    np.testing.assert_allclose(residual_forecast(short, feats, x)[0], point[:, :4], rtol=1e-6)


def test_shapes_are_checked_and_the_fleet_refuses_a_lag_block() -> None:
    rng = np.random.default_rng(2)
    check_residual_head(_head(rng, k=L), D, H, Q, L)
    with pytest.raises(WrongShape, match=LAG_KEY):
        check_residual_head(_head(rng, k=L + 1), D, H, Q, L)  # more lags than the context holds
    with pytest.raises(WrongShape, match="unexpected"):
        check_residual_head({**_head(rng), "other": np.zeros(3, np.float32)}, D, H, Q, L)
    with pytest.raises(WrongShape, match="point_weight"):
        check_residual_head(_head(rng), D + 1, H, Q, L)
    # what a device does with a global head: a lag block it does not train is a typed refusal, not a crash
    with pytest.raises(WrongShape, match=LAG_KEY):
        check_arrays(_head(rng, k=4), head_shapes(D, H, Q), what="global")


def test_serve_refuses_a_residual_head_as_the_fleet_head(tmp_path) -> None:
    from typer.testing import CliRunner

    from coordinator.cli import app

    path = tmp_path / "head.residual.npz"
    np.savez(path, **_head(np.random.default_rng(3), k=4))
    result = CliRunner().invoke(app, ["serve", "--init-head", str(path), "--broker", "127.0.0.1:1"])
    assert result.exit_code != 0
    assert "residual head" in result.output


def test_ridge_with_a_prior_and_per_block_penalties() -> None:
    rng = np.random.default_rng(4)
    a = np.hstack([rng.normal(size=(200, 5)), 3 * rng.normal(size=(200, 3)), np.ones((200, 1))])
    y = rng.normal(size=(200, 2))
    gram, rhs = a.T @ a, a.T @ y
    reg = block_penalty(gram, (5, 3), (0.0, 1e9))
    assert reg[-1] == 0 and np.all(reg[:5] == 0) and np.allclose(reg[5:8], 1e9 * np.diag(gram)[5:8].mean())
    prior = rng.normal(size=(9, 2))
    sol = ridge_solve(gram, rhs, reg, prior)
    np.testing.assert_allclose(sol[5:8], prior[5:8], atol=1e-6)  # a huge penalty pins a block to its prior
    np.testing.assert_allclose(ridge_solve(gram, rhs, np.zeros(9)), np.linalg.lstsq(a, y, rcond=None)[0],
                               atol=1e-8)
    assert np.all(block_penalty(gram, (0, 8), (5.0, 1.0))[:8] > 0)  # an empty block takes no columns


def test_weighted_normal_equations_give_the_validation_mse_without_predictions() -> None:
    rng = np.random.default_rng(5)
    feats, x = _inputs(rng, n=300)
    y = rng.normal(size=(300, H)).astype(np.float32) * 2 + 1
    k = 6
    gram, rhs, yy = normal_equations(feats.feats, x, feats.loc, feats.scale, y, k, weight_by_scale=True)
    sol = rng.normal(size=(D + k + 1, H))
    pred = (design(feats.feats, x, feats.loc, feats.scale, k) @ sol) * feats.scale + feats.loc
    direct = np.mean((pred - y) ** 2)
    via_gram = (np.einsum("dh,dh->", sol, gram @ sol) - 2 * np.einsum("dh,dh->", sol, rhs) + yy.sum()) / y.size
    assert via_gram == pytest.approx(direct, rel=1e-6)


def test_a_corpus_head_counts_every_dataset_alike_and_scores_their_mean(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fit on several datasets, each one's normal equations are divided by its window count: a dataset with 5x the
    windows does not outweigh the other, one dataset listed twice is the same fit as once, and the validation
    score the choice is made on is the mean over datasets of the forecasts' MSE."""
    import torch

    from coordinator.models.tsfm import TSFM, TSFMConfig
    from coordinator.pretrain import residual_head as rh
    from coordinator.pretrain.protocol import frozen_features

    cfg = TSFMConfig(context=64, horizon=336, patch_len=16, stride=8, d_model=8, n_heads=2, n_layers=1, d_ff=16,
                     feature_dim=8)
    torch.manual_seed(0)
    model = TSFM(cfg).eval()
    t = np.arange(4000)
    series = {"daily": np.sin(2 * np.pi * t / 24), "weekly": np.sin(2 * np.pi * t / 7) + 0.3 * np.cos(t / 50)}
    counts = {"daily": 40, "weekly": 200}

    def windows(name, split, context, horizon, n=None, fraction=None, data_dir=None):
        rng = np.random.default_rng([len(name), split == "val"])
        starts = rng.integers(0, 4000 - context - horizon, counts[name] // (2 if split == "val" else 1))
        w = np.stack([series[name][s: s + context + horizon] + 0.1 * rng.standard_normal(context + horizon)
                      for s in starts]).astype(np.float32)
        return w[:, :context], w[:, context:]

    monkeypatch.setattr(rh, "split_subset", windows)
    both, info = rh.fit_residual_head(model, ["daily", "weekly"], lag_grid=(24, 48))
    twice, _ = rh.fit_residual_head(model, ["daily", "daily"], lag_grid=(24, 48))
    once, _ = rh.fit_residual_head(model, "daily", lag_grid=(24, 48))
    for key in once:
        np.testing.assert_allclose(twice[key], once[key], rtol=1e-4, atol=1e-5)
    per_dataset = []
    for name in ("daily", "weekly"):
        vx, vy = windows(name, "val", 64, 336)
        f, loc, scale = frozen_features(model, vx)
        point, _ = residual_forecast(both, Features(f.astype(np.float32), loc.astype(np.float32),
                                                    scale.astype(np.float32)), vx)
        per_dataset.append(np.mean((point[:, :96] - vy[:, :96]) ** 2))
    assert info["val_mse"]["H96"] == pytest.approx(np.mean(per_dataset), rel=1e-3)
    monkeypatch.setattr(rh, "split_subset", lambda name, *a, **kw: tuple(
        np.concatenate([w] * (5 if name == "weekly" else 1)) for w in windows(name, *a, **kw)))
    repeated, _ = rh.fit_residual_head(model, ["daily", "weekly"], lag_grid=(24, 48))  # weekly's windows 5 times
    for key in both:
        np.testing.assert_allclose(repeated[key], both[key], rtol=1e-3, atol=1e-4)
    assert info["datasets"] == ["daily", "weekly"] and info["train_windows"] == 240


def test_the_residual_head_model_forecasts_what_the_device_head_does() -> None:
    """ResidualHeadModel (what protocol scoring and seed ensembles call) is the frozen backbone's features through
    the device's numpy residual head, in the data's units."""
    import torch

    from coordinator.models.tsfm import TSFM, TSFMConfig
    from coordinator.models.tsfm import forecast as predict
    from coordinator.pretrain.protocol import frozen_features
    from coordinator.pretrain.residual_head import ResidualHeadModel

    cfg = TSFMConfig(context=64, horizon=24, patch_len=16, stride=8, d_model=8, n_heads=2, n_layers=1, d_ff=16,
                     feature_dim=8)
    torch.manual_seed(1)
    model = TSFM(cfg).eval()
    rng = np.random.default_rng(2)
    params = {**model.head_state(), LAG_KEY: rng.normal(size=(24, 16)).astype(np.float32) * 0.1}
    x = (rng.normal(size=(9, 64)).cumsum(axis=1) * 3 + 10).astype(np.float32)
    point, quant = predict(ResidualHeadModel(model, params), x)
    f, loc, scale = frozen_features(model, x)
    want_p, want_q = residual_forecast(params, Features(f.astype(np.float32), loc.astype(np.float32),
                                                        scale.astype(np.float32)), x)
    np.testing.assert_allclose(point, want_p, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(quant, want_q, rtol=1e-5, atol=1e-4)
    plain_p, _ = predict(model, x)
    assert not np.allclose(point, plain_p, atol=1e-3)  # the lag block is in the forecast
