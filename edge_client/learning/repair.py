"""Input-side sensor-fault repair: find stuck runs, spikes and gaps in a device's recorded series and impute them
before the frozen backbone sees the context (numpy only).

Why: a field sensor freezes (the same reading repeated for hours), emits spikes and drops readings. The backbone
was pretrained on clean series; a frozen stretch or a 4-sigma spike in its context moves the RevIN level and spread
and the features the head reads, and the forecast of the *true* quantity suffers (issue 14: on the faulty etth1-LUFL
device every head scored about 2.1 MSE, 10 % above what the same head reaches on the clean context). Forward-filling
a gap (``distortions.fill_missing``) turns it into a stuck run of its own. Repair is learned from the device's own
history, like the rule guards (``rules.py``), and robust to the faults it looks for:

* stuck run: more consecutive identical readings than the history's ``run_quantile`` run length times
  ``run_factor`` (and at least ``min_run``): runs of identical readings are short in a working sensor (quantised
  ones repeat a few steps), a frozen one repeats for hours;
* spike: a Hampel-type filter: |x − rolling median| above ``spike_factor`` times the history's ``spike_quantile``
  of that residual. (The textbook scale, 1.4826·MAD of the residual, flagged 10–20 % of clean ETTh1 readings:
  a smooth series has a tiny median residual and heavy tails, 20–50 MADs at the 99.9th percentile.)
* gap: NaN or ±inf.

The limits are fit once on a history the device trusts (its first one) and kept, like the scaler: a history that
already holds many faults would raise both quantiles and hide the faults (conservative: fewer repairs, not wrong
ones).

Flagged readings are imputed by *seasonal interpolation*: the value one season earlier plus an offset that goes
linearly from the level difference at the left edge of the fault to the one at its right edge (one season of
history repeats the daily shape, the offsets keep the level); a fault at the newest end of a context (a live
forecast: nothing after it yet) holds the last good reading (``open_end``; continuing yesterday's shape from the left
offset instead repaired the faulty etth1-LUFL device's forecasts a little more, −5.5 % vs −4.7 % for the shipped
head, but made the faulty PM2.5 temperature's 3.9 % worse, where weather changes the daily shape). Rows are repaired
independently, so a context is repaired with nothing newer than its own last step (causal), while the whole history
in one row (training targets, known when the device trains) is repaired with both edges.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class RepairConfig:
    spike_quantile: float = 0.999  # quantile of the history's |x − rolling median| ...
    spike_factor: float = 1.5  # ... times this factor is the largest deviation a working sensor makes
    median_width: int = 5  # rolling-median window (odd) the spike residual is taken against
    run_quantile: float = 0.999  # quantile of the history's run lengths of identical readings ...
    run_factor: float = 2.0  # ... times this factor is the longest run a working sensor makes
    min_run: int = 6  # never call a run this short stuck
    anchor: int = 6  # readings averaged for the level offset at a fault's edge
    open_end: str = "hold"  # a fault at a context's newest end: "hold" the last good reading, or "seasonal" + offset


@dataclass(frozen=True)
class SensorRepair:
    """One device's learned fault detector and imputer (plain numbers: cheap to keep and to describe)."""

    season: int
    max_run: int  # a run of identical readings longer than this is a frozen sensor
    spike_limit: float  # the largest |x − rolling median| a working sensor makes
    cfg: RepairConfig = RepairConfig()

    @classmethod
    def fit(cls, history: np.ndarray, season: int = 1, cfg: RepairConfig = RepairConfig()) -> SensorRepair:
        """Learn the run-length limit and the spike scale from a 1-D history (NaN ignored)."""
        h = np.asarray(history, np.float64).ravel()
        runs = _run_lengths(h)
        limit = int(np.ceil(np.quantile(runs, cfg.run_quantile) * cfg.run_factor)) if len(runs) else cfg.min_run
        resid = np.abs(h - _rolling_median(h[None, :], cfg.median_width)[0])
        resid = resid[np.isfinite(resid)]
        limit_dev = cfg.spike_factor * float(np.quantile(resid, cfg.spike_quantile)) if len(resid) else 0.0
        if not limit_dev > 1e-9:  # a flat or tiny history: any deviation from it is news, not a fault
            limit_dev = np.inf
        return cls(max(1, season), max(cfg.min_run, limit), limit_dev, cfg)

    def flags(self, x: np.ndarray) -> np.ndarray:
        """(N, L) bool: readings to distrust (gaps, stuck runs after their first reading, spikes)."""
        x = np.atleast_2d(np.asarray(x, np.float64))
        bad = ~np.isfinite(x)
        bad |= self._stuck(x)
        resid = np.abs(x - _rolling_median(np.where(bad, np.nan, x), self.cfg.median_width))
        bad |= np.nan_to_num(resid, nan=0.0) > self.spike_limit
        return bad

    def repair(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N, L) contexts (or one (1, L) history) → (repaired float32 array, per-row share of imputed readings)."""
        x = np.atleast_2d(np.asarray(x, np.float64))
        bad = self.flags(x)
        out = np.where(bad, np.nan, x)
        for i in np.flatnonzero(bad.any(axis=1)):
            out[i] = self._impute(out[i])
        return out.astype(np.float32), bad.mean(axis=1)

    def _stuck(self, x: np.ndarray) -> np.ndarray:
        """Readings inside a run of identical values longer than ``max_run`` (the run's first reading is genuine)."""
        same = np.zeros(x.shape, bool)
        same[:, 1:] = x[:, 1:] == x[:, :-1]
        out = np.zeros(x.shape, bool)
        for i in np.flatnonzero(same.sum(axis=1) >= self.max_run):
            edges = np.diff(np.concatenate([[0], same[i].astype(np.int8), [0]]))
            for a, b in zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1), strict=True):
                if b - a >= self.max_run:  # b - a repeats of the reading at a - 1
                    out[i, a:b] = True
        return out

    def _impute(self, row: np.ndarray) -> np.ndarray:
        """Seasonal interpolation of the NaN segments of one row, oldest first (later segments may lean on earlier
        imputed ones one season back)."""
        row = row.copy()
        length, s, k = len(row), self.season, self.cfg.anchor
        missing = np.isnan(row)
        if missing.all():
            return np.zeros(length)
        edges = np.diff(np.concatenate([[0], missing.astype(np.int8), [0]]))
        for a, b in zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1), strict=True):
            t = np.arange(a, b)
            if a == 0:  # nothing before it: hold the first good reading
                row[t] = row[b]
                continue
            seasonal = s > 1 and a > s
            left = self._offset(row, a, s, k, seasonal, before=True)
            right = self._offset(row, b, s, k, seasonal, before=False) if b < length else np.nan
            if not np.isfinite(right):  # the newest end of a context (no right edge yet) or no usable one
                off = np.full(len(t), left)
            else:
                w = (t - a + 1) / (b - a + 1)
                off = (1 - w) * left + w * right
            if not seasonal:
                row[t] = off
                continue
            if b >= length and self.cfg.open_end == "hold":
                row[t] = row[a - 1]
                continue
            for lo in range(a, b, s):  # a season at a time: a fault longer than a season leans on its own imputation
                tt = np.arange(lo, min(lo + s, b))
                row[tt] = row[tt - s] + off[tt - a]
        return row

    @staticmethod
    def _offset(row: np.ndarray, edge: int, s: int, k: int, seasonal: bool, before: bool) -> float:
        """Level at a fault's edge, minus the season-ago level there when seasonal: mean over up to k good readings
        just before (left edge) or from (right edge) ``edge``; NaN when none is usable."""
        idx = np.arange(max(edge - k, 0), edge) if before else np.arange(edge, min(edge + k, len(row)))
        if seasonal:
            idx = idx[idx - s >= 0]
            d = row[idx] - row[idx - s]
            d = d[np.isfinite(d)]
            return float(d.mean()) if len(d) else np.nan
        d = row[idx][np.isfinite(row[idx])]
        if len(d) == 0:
            return np.nan
        return float(d[-1] if before else d[0])


def _run_lengths(h: np.ndarray) -> np.ndarray:
    """Lengths of the runs of identical consecutive finite readings (a run of 1: the reading changed)."""
    h = h[np.isfinite(h)]
    if len(h) == 0:
        return np.zeros(0, int)
    change = np.flatnonzero(np.diff(h) != 0)
    bounds = np.concatenate([[-1], change, [len(h) - 1]])
    return np.diff(bounds)


def _rolling_median(x: np.ndarray, width: int) -> np.ndarray:
    """Centred rolling median of each row over `width` readings (NaN ignored, edges use what exists; NaN where a
    window holds no reading at all, e.g. inside a long gap). Windows without a reading are left out of nanmedian
    instead of silencing its all-NaN warning: the warnings filter is process-wide and not thread-safe, and the
    daemon runs MQTT callbacks and ingestion on threads of its own."""
    half = width // 2
    pad = np.pad(x, ((0, 0), (half, half)), constant_values=np.nan)
    win = np.lib.stride_tricks.sliding_window_view(pad, width, axis=1)
    out = np.full(win.shape[:2], np.nan)
    some = np.isfinite(win).any(axis=2)
    if some.any():
        out[some] = np.nanmedian(win[some], axis=1)
    return out


def repaired_windows(series: np.ndarray, repair: SensorRepair, context: int, horizon: int, *, stride: int = 1,
                     start: int = 0, stop: int | None = None, min_present: float = 0.5,
                     max_imputed_target: float = 0.25) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Training windows of a recorded 1-D series whose targets lie in [start, stop), faults repaired: each context
    on its own (causal: what the device will do before a live forecast), the targets on the whole series (known
    when the device trains). Windows whose context is less than `min_present` real readings, or whose target is more
    than `max_imputed_target` imputed (a long imputation is a guess, not a reading to fit), are dropped. Returns
    (contexts (N, L) float32, targets (N, H) float32, index of each first target (N,), share of each context
    imputed (N,)): what the daemon's learner and the continual benchmark build their windows from."""
    x = np.asarray(series, np.float64).ravel()
    stop = len(x) if stop is None else min(stop, len(x))
    starts = np.arange(max(start, context) - context, stop - horizon - context + 1, stride)
    if len(starts) == 0:
        return np.zeros((0, context), np.float32), np.zeros((0, horizon), np.float32), np.zeros(0, int), np.zeros(0)
    target_src = repair.repair(x[None, :stop])[0][0]
    flagged = repair.flags(x[None, :stop])[0]
    ctx = x[starts[:, None] + np.arange(context)[None, :]]
    tgt = starts[:, None] + context + np.arange(horizon)[None, :]
    y = target_src[tgt]
    keep = (np.isfinite(y).all(axis=1) & (np.isfinite(ctx).mean(axis=1) >= min_present)
            & (flagged[tgt].mean(axis=1) <= max_imputed_target))
    filled, imputed = repair.repair(ctx[keep])
    return filled, y[keep].astype(np.float32), starts[keep] + context, imputed
