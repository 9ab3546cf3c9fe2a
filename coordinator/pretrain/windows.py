"""Windows of the pretraining series: the split of each dataset into train/val/test rows, the series scaled with
statistics of its training rows only, and windows (or window start offsets) inside a split.

Protocol (ETT long-horizon convention, see ALGORITHMS.md §9): a StandardScaler per channel fit on the training
rows only, channel-independent univariate windows from all channels, loss and metrics on the scaled values.
Training windows are sampled by index from the scaled series instead of being materialised: ETTh1 at context 512
would otherwise be ~140 MB of copies.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from edge_client.data.datasets import load_series
from edge_client.learning.windows import ETT_TEST_END, ETT_TRAIN_END, ETT_VAL_END, Scaler, make_windows

ETT_NAMES = ("etth1", "etth2", "ettm1", "ettm2")


def split_bounds(name: str, n_rows: int) -> tuple[int, int, int]:
    """(train_end, val_end, test_end) rows: ETT's fixed 12/4/4 months, else 70/10/20 (the
    Autoformer convention for the other long-horizon datasets)."""
    if name in ETT_NAMES:
        return ETT_TRAIN_END, ETT_VAL_END, ETT_TEST_END
    return int(n_rows * 0.7), int(n_rows * 0.8), n_rows


def scaled_series(name: str, data_dir: str | os.PathLike[str] | None = None) -> tuple[np.ndarray, tuple[int, int, int]]:
    """The whole series standardised with statistics of its training rows only (no leakage)."""
    values = load_series(name, data_dir).values
    bounds = split_bounds(name, len(values))
    scaler = Scaler.fit(values[: bounds[0]])
    return scaler.transform(values).astype(np.float32), bounds


def window_starts(x: np.ndarray, span: int, stride: int, stop: int) -> np.ndarray:
    """Start offsets of complete (NaN-free) windows of length `span` inside x[:stop]."""
    n = min(stop, len(x)) - span + 1
    if n <= 0:
        return np.zeros(0, np.int64)
    bad = np.concatenate([[0], np.cumsum(~np.isfinite(x[:stop]))])
    starts = np.arange(0, n, stride)
    return starts[bad[starts + span] - bad[starts] == 0]


@dataclass
class WindowPool:
    """All channels of all training series laid end to end, plus valid window starts into it."""

    flat: np.ndarray  # (T_total,) float32
    starts: np.ndarray  # (N,) int64
    span: int

    def batch(self, idx: np.ndarray, context: int) -> tuple[torch.Tensor, torch.Tensor]:
        win = self.flat[self.starts[idx, None] + np.arange(self.span)[None, :]]
        return torch.from_numpy(win[:, :context]), torch.from_numpy(win[:, context:])


def split_windows(
    name: str, split: str, context: int, horizon: int, stride: int = 1,
    data_dir: str | os.PathLike[str] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Channel-independent windows whose targets fall in a split; contexts may reach back
    `context` rows before the split boundary (the standard ETT protocol)."""
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be train, val or test, not {split!r}")
    scaled, (train_end, val_end, test_end) = scaled_series(name, data_dir)
    start, stop = {"train": (0, train_end), "val": (train_end, val_end), "test": (val_end, test_end)}[split]
    xs, ys = zip(
        *(make_windows(scaled[:, c], context, horizon, stride, start, stop) for c in range(scaled.shape[1])),
        strict=True,
    )
    return np.concatenate(xs), np.concatenate(ys)


