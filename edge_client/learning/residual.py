"""A residual head: the linear feature head plus a linear map of the last k context values (numpy, no torch).

Why: on ETTh1 a least-squares linear map of the look-back (NLinear) beats every linear readout of the frozen
backbone's features (0.367 vs 0.404 MSE at H96), while the features carry what the look-back map misses at long
horizons. TiDE (Das et al. 2023) puts a global linear skip from the look-back to the horizon beside its deep
path for this reason, as N-BEATS/DLinear hybrids do; here that skip sits beside the frozen backbone, in the
backbone's RevIN-normalised space, so the device computes it from the raw context and the loc/scale the backbone
already returns::

    lags_n  = (x[:, -k:] - loc) / scale                         # (N, k)
    point_n = f @ W_p.T + b_p + lags_n @ W_lag.T                 # (N, H)
    q_n     = f @ W_q.T + b_q + (lags_n @ W_lag.T)[:, None, :]   # (N, Q, H): the bands move with the point
    point   = point_n * scale + loc

A residual head is a *dataset head* (fit in closed form on one dataset's training split and shipped, e.g.
``head.etth1.npz``), not the fleet's head: a 512-lag block at 24 steps is 12,288 more numbers than the 6,240 the
fleet averages, past the 32 KB float16 upload. The fleet's head checks (``check_arrays`` with
:func:`edge_client.learning.head.head_shapes`) refuse its extra ``lag_weight`` array with ``WrongShape``, and
``fedge serve --init-head`` refuses such a file by name, so no code path drops the lag block silently.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from edge_client.learning.head import HEAD_KEYS, Features, Params, head_outputs, head_shapes, slice_head
from edge_client.wire.codec import check_arrays
from edge_client.wire.errors import WrongShape

LAG_KEY = "lag_weight"  # (H, k): the residual map of the last k RevIN-normalised context values


def head_lags(params: Mapping[str, np.ndarray]) -> int:
    """How many context values the head reads (0: a plain feature head)."""
    return int(params[LAG_KEY].shape[1]) if LAG_KEY in params else 0


def check_residual_head(params: Mapping[str, np.ndarray], feature_dim: int, horizon: int, n_quantiles: int,
                        context: int) -> None:
    """Refuse (WrongShape) a head whose arrays do not fit this backbone: the feature head's shapes, plus an
    optional (horizon, k) lag block with 1 <= k <= context."""
    check_arrays({k: v for k, v in params.items() if k != LAG_KEY}, head_shapes(feature_dim, horizon, n_quantiles),
                 what="head")  # the feature head: the same check as every global model a device receives
    if LAG_KEY in params:
        lag = params[LAG_KEY]
        if lag.ndim != 2 or lag.shape[0] != horizon or not 1 <= lag.shape[1] <= context:
            raise WrongShape(f"head.{LAG_KEY}: expected ({horizon}, k) with 1 <= k <= {context}, got {lag.shape}")


def normalised_lags(contexts: np.ndarray, loc: np.ndarray, scale: np.ndarray, k: int) -> np.ndarray:
    """The last k context values in the backbone's RevIN space (loc, scale as the backbone returns them)."""
    return ((np.asarray(contexts, np.float32)[:, -k:] - loc) / scale).astype(np.float32)


def residual_outputs(params: Mapping[str, np.ndarray], x: Features, contexts: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Normalised point (N, H) and quantile (N, Q, H) outputs of a residual (or plain) head."""
    point_n, quant_n = head_outputs({k: params[k] for k in HEAD_KEYS}, x.feats)
    k = head_lags(params)
    if k:
        lag = normalised_lags(contexts, x.loc, x.scale, k) @ params[LAG_KEY].T
        point_n, quant_n = point_n + lag, quant_n + lag[:, None, :]
    return point_n, quant_n


def residual_forecast(params: Mapping[str, np.ndarray], x: Features, contexts: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Point (N, H) and quantile (N, Q, H) forecasts in the data's units; `contexts` are the raw windows the
    features were computed from."""
    point_n, quant_n = residual_outputs(params, x, contexts)
    return point_n * x.scale + x.loc, quant_n * x.scale[:, :, None] + x.loc[:, :, None]


def slice_residual(params: Mapping[str, np.ndarray], horizon: int) -> Params:
    """The first `horizon` steps of a residual head (each output row forecasts one step, as for the plain head)."""
    out = slice_head(params, horizon)
    if LAG_KEY in params:
        out[LAG_KEY] = params[LAG_KEY][:horizon]
    return out
