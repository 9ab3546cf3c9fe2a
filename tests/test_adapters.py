"""The device's numpy head: analytic gradients against finite differences, and training works."""

from __future__ import annotations

import numpy as np
import pytest

from edge_client.learning.head import (
    Features,
    LossConfig,
    apply_delta,
    head_forecast,
    head_loss_and_grad,
    head_shapes,
    param_delta,
    slice_head,
    train_head,
)


def _problem(seed: int = 0, n: int = 32, d: int = 6, h: int = 5, q: int = 3):
    rng = np.random.default_rng(seed)
    feats = Features(rng.normal(size=(n, d)), rng.normal(size=(n, 1)), rng.uniform(0.5, 2.0, size=(n, 1)))
    params = {k: rng.normal(scale=0.3, size=s) for k, s in head_shapes(d, h, q).items()}
    y = rng.normal(size=(n, h))
    return feats, params, y


@pytest.mark.parametrize("cfg", [
    LossConfig(),
    LossConfig(quantile_weight=0.0),
    LossConfig(quantiles=(0.05, 0.5, 0.95), quantile_weight=2.0, prox_mu=0.3),
])
def test_analytic_gradient_matches_central_differences(cfg: LossConfig) -> None:
    feats, params, y = _problem()
    anchor = {k: v + 0.1 for k, v in params.items()}
    _, grads = head_loss_and_grad(params, feats, y, cfg, anchor)
    eps = 1e-6
    rng = np.random.default_rng(1)
    for name, value in params.items():
        for flat in rng.choice(value.size, size=min(8, value.size), replace=False):
            idx = np.unravel_index(flat, value.shape)
            plus = {k: v.copy() for k, v in params.items()}
            minus = {k: v.copy() for k, v in params.items()}
            plus[name][idx] += eps
            minus[name][idx] -= eps
            up = head_loss_and_grad(plus, feats, y, cfg, anchor)[0]
            down = head_loss_and_grad(minus, feats, y, cfg, anchor)[0]
            numeric = (up - down) / (2 * eps)
            assert grads[name][idx] == pytest.approx(numeric, rel=1e-3, abs=1e-5), (name, idx)


def test_pinball_gradient_sign_pushes_quantiles_toward_their_level() -> None:
    feats, params, y = _problem(n=200)
    cfg = LossConfig(quantile_weight=1.0)
    result = train_head(params, feats, y, epochs=300, lr=0.02, batch_size=200, cfg=cfg)
    _, quant = head_forecast(result.params, feats)
    coverage = (y[:, None, :] <= quant).mean(axis=(0, 2))
    assert coverage[0] < coverage[1] < coverage[2]
    assert abs(coverage[0] - 0.1) < 0.12 and abs(coverage[2] - 0.9) < 0.12


def test_training_reduces_loss_and_delta_round_trips() -> None:
    feats, params, y = _problem(n=256)
    result = train_head(params, feats, y, epochs=20, lr=1e-2, batch_size=32, seed=3)
    assert result.losses[-1] < result.losses[0] * 0.8
    delta = param_delta(result.params, params, "float32")
    back = apply_delta(params, delta)
    for k in params:
        np.testing.assert_allclose(back[k], result.params[k], rtol=1e-6, atol=1e-6)


def test_float16_delta_falls_back_to_float32_when_it_would_overflow() -> None:
    old = {"w": np.zeros(3, np.float32)}
    assert param_delta({"w": np.array([1e-3, 0, 1], np.float32)}, old)["w"].dtype == np.float16
    assert param_delta({"w": np.array([1e5, 0, 1], np.float32)}, old)["w"].dtype == np.float32


def test_slicing_a_head_gives_the_first_steps_of_its_forecast() -> None:
    feats, params, _ = _problem(h=10)
    point_full, quant_full = head_forecast(params, feats)
    point, quant = head_forecast(slice_head(params, 4), feats)
    np.testing.assert_allclose(point, point_full[:, :4])
    np.testing.assert_allclose(quant, quant_full[:, :, :4])


def test_training_is_deterministic_for_a_seed() -> None:
    feats, params, y = _problem(n=64)
    a = train_head(params, feats, y, epochs=2, seed=7).params
    b = train_head(params, feats, y, epochs=2, seed=7).params
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
