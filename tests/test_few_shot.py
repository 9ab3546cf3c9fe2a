"""The few-shot comparison of the foundation benchmark: NLinear fit on exactly the given windows, fine-tuning
that picks its lr on validation, and residual-head scores on the AutoETS subset that match the full scoring."""

from __future__ import annotations

import numpy as np
import torch

from coordinator.models.tsfm import TSFM, TSFMConfig
from coordinator.pretrain.protocol import fine_tune, nlinear_fit_windows, protocol_windows
from coordinator.pretrain.residual_head import residual_protocol_scores

SMALL = TSFMConfig(context=512, horizon=336, d_model=16, n_heads=2, n_layers=1, d_ff=32, feature_dim=8)


def test_nlinear_on_given_windows_recovers_a_linear_rule() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 24)).astype(np.float32)
    w_true = rng.normal(size=(24, 6)) * 0.2
    w_true[-1] = 0.0  # x_last - x_last is always 0: its weight is not identifiable
    y = (x - x[:, -1:]) @ w_true + 0.5 + x[:, -1:]
    w, b = nlinear_fit_windows(x, y.astype(np.float32), ridge=1e-9)
    np.testing.assert_allclose(w, w_true, atol=1e-3)
    np.testing.assert_allclose(b, 0.5, atol=1e-3)


def test_fine_tune_keeps_the_lr_with_the_best_validation() -> None:
    torch.manual_seed(0)
    net, info = fine_tune(None, SMALL, "etth1", 0.01, steps=4, batch_size=8, lrs=(1e-5, 1e-3), val_every=2,
                          threads=1)
    sweep = {float(k): v for k, v in info["lr_sweep"].items()}
    assert set(sweep) == {1e-5, 1e-3}
    assert info["lr"] == min(sweep, key=sweep.get) and info["val_mse"] == min(sweep.values())
    assert not net.training


def test_residual_scores_on_the_subset_equal_the_full_scores_there() -> None:
    torch.manual_seed(0)
    model = TSFM(SMALL).eval()
    rng = np.random.default_rng(1)
    params = {**{k: v.astype(np.float32) for k, v in model.head_state().items()},
              "lag_weight": (rng.normal(size=(336, 48)) * 0.01).astype(np.float32)}
    full = residual_protocol_scores(model, params, "etth1", threads=1)
    subset = residual_protocol_scores(model, params, "etth1", threads=1, subset_only=True)
    assert set(subset) == {"ets/H96", "ets/H192", "ets/H336"}
    for key in subset:
        np.testing.assert_allclose(subset[key]["mse"], full[key]["mse"], rtol=1e-5)
    assert subset["ets/H96"]["n"] == len(protocol_windows("etth1", 512).rows(96, subset=True))
