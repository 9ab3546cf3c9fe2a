"""Learned executable rule guards for forecasts (transferred from WALL-E 2.0's symbolic rules).

Why: a learned forecaster can output values the device's own physics forbid (negative load, a jump
no sensor ever made, a night-time value above anything seen at that hour). WALL-E 2.0 aligns an agent
with its environment through small executable rules learned from experience; here each device
learns such rules from its own history, checks every forecast with them, clamps the violations and
counts the hits so the fleet can see how often a model is being corrected (a cheap drift/fault
signal). Rules are plain data + numpy, readable with :meth:`RuleGuard.describe`.

Conventions: forecasts are (N, H) arrays in the device's units, `last` (N,) is the last context value
(for rate-of-change), `phase` (N,) is the seasonal phase (e.g. hour of day) of the first forecast step.
NaN in the history is ignored when fitting; NaN in `last` disables the rate rule for that window.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np


class Rule(Protocol):
    name: str

    def violations(self, y: np.ndarray, last: np.ndarray, phase: np.ndarray) -> np.ndarray: ...
    def correct(self, y: np.ndarray, last: np.ndarray, phase: np.ndarray) -> np.ndarray: ...
    def describe(self) -> str: ...


@dataclass(frozen=True)
class SignRule:
    """The series never went negative in history ⇒ forecasts are clamped at 0."""

    name: str = "sign"

    def violations(self, y: np.ndarray, last: np.ndarray, phase: np.ndarray) -> np.ndarray:
        return y < 0

    def correct(self, y: np.ndarray, last: np.ndarray, phase: np.ndarray) -> np.ndarray:
        return np.maximum(y, 0.0)

    def describe(self) -> str:
        return "y >= 0"


@dataclass(frozen=True)
class RangeRule:
    """Forecasts stay within the seen range widened by a margin (values may drift somewhat)."""

    lo: float
    hi: float
    name: str = "range"

    def violations(self, y: np.ndarray, last: np.ndarray, phase: np.ndarray) -> np.ndarray:
        return (y < self.lo) | (y > self.hi)

    def correct(self, y: np.ndarray, last: np.ndarray, phase: np.ndarray) -> np.ndarray:
        return np.clip(y, self.lo, self.hi)

    def describe(self) -> str:
        return f"{self.lo:.4g} <= y <= {self.hi:.4g}"


@dataclass(frozen=True)
class RateRule:
    """|y_t − y_{t−1}| <= max_step, starting from the last observed value."""

    max_step: float
    name: str = "rate"

    def _steps(self, y: np.ndarray, last: np.ndarray) -> np.ndarray:
        return np.diff(np.concatenate([last[:, None], y], axis=1), axis=1)

    def violations(self, y: np.ndarray, last: np.ndarray, phase: np.ndarray) -> np.ndarray:
        steps = self._steps(y, last)
        return np.abs(np.nan_to_num(steps, nan=0.0)) > self.max_step

    def correct(self, y: np.ndarray, last: np.ndarray, phase: np.ndarray) -> np.ndarray:
        out = y.copy()
        prev = np.where(np.isfinite(last), last, y[:, 0])
        for t in range(y.shape[1]):
            out[:, t] = np.clip(out[:, t], prev - self.max_step, prev + self.max_step)
            prev = out[:, t]
        return out

    def describe(self) -> str:
        return f"|Δy| <= {self.max_step:.4g} per step"


@dataclass(frozen=True)
class EnvelopeRule:
    """Per seasonal phase (hour of day for hourly data) the value stays within the seen envelope."""

    lo: np.ndarray  # (season,)
    hi: np.ndarray  # (season,)
    name: str = "envelope"

    def _bounds(self, y: np.ndarray, phase: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        idx = (np.asarray(phase, int)[:, None] + np.arange(y.shape[1])[None, :]) % len(self.lo)
        return self.lo[idx], self.hi[idx]

    def violations(self, y: np.ndarray, last: np.ndarray, phase: np.ndarray) -> np.ndarray:
        lo, hi = self._bounds(y, phase)
        return (y < lo) | (y > hi)

    def correct(self, y: np.ndarray, last: np.ndarray, phase: np.ndarray) -> np.ndarray:
        lo, hi = self._bounds(y, phase)
        return np.clip(y, lo, hi)

    def describe(self) -> str:
        return f"seasonal envelope over {len(self.lo)} phases, width {float(np.mean(self.hi - self.lo)):.4g} on average"


@dataclass(frozen=True)
class RuleFitConfig:
    margin: float = 0.1  # widen range/envelope by this share of the seen range
    rate_quantile: float = 0.999  # the max-step rule uses this quantile of |Δy| ...
    rate_factor: float = 1.5  # ... times this factor
    min_seasons: int = 4  # an envelope needs at least this many full seasons of history


@dataclass
class RuleGuard:
    """A device's rule set plus its hit counters (reported in metrics, never the data itself)."""

    rules: list[Rule]
    hits: dict[str, int] = field(default_factory=dict)
    checked_values: int = 0
    corrected_windows: int = 0

    @classmethod
    def fit(cls, history: np.ndarray, season: int = 1, cfg: RuleFitConfig = RuleFitConfig(),
            phase0: int = 0) -> RuleGuard:
        """Learn the rules from a 1-D history (NaN ignored); `phase0` is the phase of history[0]."""
        h = np.asarray(history, np.float64).ravel()
        ok = np.isfinite(h)
        vals = h[ok]
        if len(vals) < 2:
            return cls([])
        span = float(vals.max() - vals.min()) or 1.0
        rules: list[Rule] = []
        if vals.min() >= 0:
            rules.append(SignRule())
        rules.append(RangeRule(float(vals.min() - cfg.margin * span), float(vals.max() + cfg.margin * span)))
        steps = np.abs(np.diff(h))
        steps = steps[np.isfinite(steps)]
        if len(steps):
            rules.append(RateRule(max(float(np.quantile(steps, cfg.rate_quantile)) * cfg.rate_factor, 1e-9)))
        if season >= 2 and ok.sum() >= cfg.min_seasons * season:
            rules.append(_envelope(h, season, phase0, cfg.margin * span))
        return cls(rules)

    def check(self, forecast: np.ndarray, last: np.ndarray | None = None,
              phase: np.ndarray | None = None) -> dict[str, int]:
        """Count violations per rule (values, not windows) without changing anything."""
        y, last, phase = _prep(forecast, last, phase)
        return {r.name: int(r.violations(y, last, phase).sum()) for r in self.rules}

    def correct(self, forecast: np.ndarray, last: np.ndarray | None = None,
                phase: np.ndarray | None = None) -> np.ndarray:
        """Check, log the hits, and return the forecast with every rule enforced (same shape)."""
        shape = np.shape(forecast)
        y, last, phase = _prep(forecast, last, phase)
        bad = np.zeros(y.shape, bool)
        for name, count in self.check(y, last, phase).items():
            self.hits[name] = self.hits.get(name, 0) + count
        for r in self.rules:
            bad |= r.violations(y, last, phase)
        self.checked_values += y.size
        self.corrected_windows += int(bad.any(axis=1).sum())
        lo = next((r.lo for r in self.rules if isinstance(r, RangeRule)), -np.inf)
        hi = next((r.hi for r in self.rules if isinstance(r, RangeRule)), np.inf)
        last = np.clip(last, lo, hi)  # a spike in the context must not license a jump
        for r in self.rules:
            y = r.correct(y, last, phase)
        return y.reshape(shape)

    def report(self) -> dict[str, float]:
        """Metrics a device may upload: hit counts per rule and the share of values touched."""
        out: dict[str, float] = {f"rule_hits_{k}": float(v) for k, v in self.hits.items()}
        out["rule_hit_rate"] = sum(self.hits.values()) / max(self.checked_values, 1)
        out["rule_corrected_windows"] = float(self.corrected_windows)
        return out

    def describe(self) -> list[str]:
        return [f"{r.name}: {r.describe()}" for r in self.rules]


def _envelope(h: np.ndarray, season: int, phase0: int, pad: float) -> EnvelopeRule:
    phase = (phase0 + np.arange(len(h))) % season
    lo, hi = np.full(season, np.inf), np.full(season, -np.inf)
    ok = np.isfinite(h)
    np.minimum.at(lo, phase[ok], h[ok])
    np.maximum.at(hi, phase[ok], h[ok])
    seen = np.isfinite(lo)
    lo = np.where(seen, lo, np.nanmin(h)) - pad
    hi = np.where(seen, hi, np.nanmax(h)) + pad
    return EnvelopeRule(lo, hi)


def _prep(forecast: np.ndarray, last: np.ndarray | None, phase: np.ndarray | None
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    y = np.atleast_2d(np.asarray(forecast, np.float64))
    n = len(y)
    last_a = np.full(n, np.nan) if last is None else np.broadcast_to(np.asarray(last, np.float64), (n,)).copy()
    phase_a = np.zeros(n, int) if phase is None else np.broadcast_to(np.asarray(phase, int), (n,)).copy()
    return y, last_a, phase_a
