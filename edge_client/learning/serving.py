"""What a personalised device forecasts with, and the check that it is never worse than the global head.

Why: the personal model, the FVG-PT gate and the rule guards are each trained or fit on a device's own short
history; any of them can make forecasts worse (too few windows, a regime the device has not seen). A device
therefore validates the *whole* served predictor — personal adapter + head, gated with the global head and the
prior, then corrected by the rule guards — on its newest training windows, held out of training, against the
global head alone, and serves the global head whenever the personal predictor does not validate better
(``fallback``). A device with no validation windows serves the global head too: nothing shows the personal
one is better.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from edge_client.learning import personalize as PZ
from edge_client.learning import windows as W
from edge_client.learning.head import Features, Params, head_forecast
from edge_client.learning.rules import RuleGuard


@dataclass(frozen=True)
class Windows:
    """Features plus what gates and rules need besides them: the last context value (rate rule), the seasonal
    phase of the first forecast step (envelope rule) and the context's missing rate (gate cue)."""

    x: Features
    y: np.ndarray
    last: np.ndarray
    phase: np.ndarray
    miss: np.ndarray
    naive: np.ndarray | None = None  # (N, H) seasonal-naive forecasts: the gate's model-free prior (naive_prior)

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, idx: np.ndarray) -> Windows:
        return Windows(self.x.subset(idx), self.y[idx], self.last[idx], self.phase[idx], self.miss[idx],
                       None if self.naive is None else self.naive[idx])


def params_forecast(params: Mapping[str, np.ndarray], x: Features) -> tuple[np.ndarray, np.ndarray]:
    """A head or an adapter + head (the same call for both)."""
    return (PZ.personal_forecast if "adapter_A" in params else head_forecast)(params, x)


@dataclass
class ServedModel:
    """The device's predictor after a personalised round."""

    personal: Params
    glob: Params
    prior: Params
    gate: PZ.Gate | None = None
    naive_prior: bool = False  # the gate's prior is the seasonal-naive forecast instead of the prior head
    guard: RuleGuard | None = None
    fallback: bool = False  # the personal predictor validated no better than the global head: serve the global one
    serve_naive: bool = False  # naive_prior: seasonal naive validated better than both (a random walk): serve it
    serve_prior: bool = False  # track record: the prior (shipped) head has forecast this device's new data best
    combo: dict[str, float] | None = None  # track record with combine: serve this weighted mean of the candidates
    val_personal_mse: float = float("nan")
    val_global_mse: float = float("nan")
    val_naive_mse: float = float("nan")

    def personal_forecast(self, w: Windows) -> tuple[np.ndarray, np.ndarray]:
        """Personal model, gated with global/prior when there is a gate, then rule guards (point only)."""
        point, quant = params_forecast(self.personal, w.x)
        if self.gate is not None:
            glob, prior = params_forecast(self.glob, w.x), self.prior_forecast(w)
            stats = PZ.gate_stats(w.x, point, glob[0], w.miss)
            point, quant = self.gate.mix(stats, (point, quant), glob, prior)
        if self.guard is not None:
            point = self.guard.correct(point, w.last, w.phase)
        return point, quant

    def prior_forecast(self, w: Windows) -> tuple[np.ndarray, np.ndarray]:
        """The gate's prior: the prior head, or (naive_prior) the seasonal-naive forecast for every quantile, a
        model-free forecaster that a random walk or a fresh level shift favour and no head can imitate."""
        if self.naive_prior and w.naive is not None:
            return self.naive_forecast(w)
        return params_forecast(self.prior, w.x)

    def naive_forecast(self, w: Windows) -> tuple[np.ndarray, np.ndarray]:
        """Seasonal naive as a predictor: its point forecast for every quantile (it has no spread of its own)."""
        q = self.prior["quantile_bias"].shape[0]
        return w.naive, np.repeat(w.naive[:, None, :], q, axis=1)

    def candidate_forecast(self, name: str, w: Windows) -> tuple[np.ndarray, np.ndarray]:
        """One track-record candidate: ``global``, ``prior`` (the prior head), ``personal`` or ``naive``."""
        if name == "naive":
            return self.naive_forecast(w)
        if name == "personal":
            return self.personal_forecast(w)
        return params_forecast(self.glob if name == "global" else self.prior, w.x)

    def forecast(self, w: Windows) -> tuple[np.ndarray, np.ndarray]:
        if self.combo:
            parts = [(v, self.candidate_forecast(k, w)) for k, v in self.combo.items()
                     if k != "naive" or w.naive is not None]
            total = sum(v for v, _ in parts)
            return (sum(v * f[0] for v, f in parts) / total, sum(v * f[1] for v, f in parts) / total)
        if self.serve_naive and w.naive is not None:
            return self.prior_forecast(w)
        if self.serve_prior:
            return params_forecast(self.prior, w.x)
        return params_forecast(self.glob, w.x) if self.fallback else self.personal_forecast(w)

    def metrics(self) -> dict[str, float]:
        out = {"personal_fallback": float(self.fallback), "val_personal_mse": self.val_personal_mse,
               "val_global_mse": self.val_global_mse, "val_naive_mse": self.val_naive_mse}
        if self.naive_prior:
            out["served_naive"] = float(self.serve_naive)
        out["served_prior"] = float(self.serve_prior)
        if self.combo is not None:
            out.update({f"combo_{k}": float(v) for k, v in self.combo.items()})
        if self.gate is not None:
            out.update(gate_c=float(self.gate.c), gate_kappa=float(self.gate.kappa))
        if self.guard is not None:
            out.update(self.guard.report())
        return {k: v for k, v in out.items() if np.isfinite(v)}


def validate(served: ServedModel, val: Windows | None) -> ServedModel:
    """Decide the fallback on held-out windows: the personal predictor is served only if it has strictly lower
    MSE there than the global head. With ``naive_prior``, seasonal naive is a third candidate, served when it
    validates better than both (a device whose series is a random walk: no linear head on the backbone's
    features repeats the last value as well)."""
    if val is None or len(val) == 0:
        served.fallback = True
        return served
    guard_state = None
    if served.guard is not None:  # validation must not count as rule hits of served forecasts
        guard_state = (dict(served.guard.hits), served.guard.checked_values, served.guard.corrected_windows)
    served.val_personal_mse = W.mse(served.personal_forecast(val)[0], val.y)
    served.val_global_mse = W.mse(params_forecast(served.glob, val.x)[0], val.y)
    if guard_state is not None:
        served.guard.hits, served.guard.checked_values, served.guard.corrected_windows = guard_state
    served.fallback = not served.val_personal_mse < served.val_global_mse
    if served.naive_prior and val.naive is not None:
        served.val_naive_mse = W.mse(val.naive, val.y)
        served.serve_naive = served.val_naive_mse < min(served.val_personal_mse, served.val_global_mse)
    return served


@dataclass
class TrackRecord:
    """Prequential choice of what a device serves (``track_record`` = β > 0).

    Why: validation windows cut from the chunk a model trained on flatter it under drift (issue 14: devices fell
    back in 22–55 % of rounds and still ended worse than the global head). Each round, *before* training, the device
    scores last round's personal predictor, the new global head, the prior (shipped) head and, with
    ``naive_prior``, seasonal naive on its newest windows, which none of them trained on, and keeps an
    exponentially weighted MSE per candidate: r ← β r + (1 − β) mse. It then serves the candidate with the lowest
    record, but anything other than the global head only if its record is lower than the global head's by
    ``margin`` (a fraction), after at least ``min_count`` scored rounds, and this round's personal model only if it
    also passed its own validation (else the next best): a device leaves the fleet's head only on evidence from data
    it had not seen. (One scored round was too little: a returning pattern's device served a personal model that had
    won one chunk and lost the next by 3x.)

    ``combine`` adds one more candidate, ``combo``: a weighted mean of the others with the weights that minimise the
    record's error (w ≥ 0, Σw = 1, from an exponentially weighted matrix of the candidates' error cross-products: the
    Bates–Granger combination with correlated errors). Why: under drift no single candidate stays best (a regime
    change favours naive for a while, a faulty sensor the fleet's head), and a combination of forecasters whose errors
    are not perfectly correlated beats each of them (the forecast-combination result, Timmermann 2006). The
    combination is held to the same rule as every candidate: its *own* record, this round's weights scored on the
    next round's new data before the weights are refit, must beat the global head's by the margin over
    ``min_count`` rounds."""

    beta: float
    margin: float
    scores: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    min_count: int = 2  # scored rounds before a candidate may replace the global head
    combine: bool = False  # also keep the error cross-products and offer the best convex combination (``combo``)
    gram: dict[tuple[str, str], float] = field(default_factory=dict)  # EW mean of e_a·e_b over windows and steps
    weights: dict[str, float] = field(default_factory=dict)  # the combination fit on the record so far

    def update(self, mse: Mapping[str, float]) -> None:
        for name, v in mse.items():
            if np.isfinite(v):
                old = self.scores.get(name)
                self.scores[name] = float(v) if old is None else self.beta * old + (1 - self.beta) * float(v)
                self.counts[name] = self.counts.get(name, 0) + 1

    def choose(self, exclude: frozenset[str] = frozenset()) -> str | None:
        """The candidate to serve; None while there is no record of the global head (first round)."""
        if "global" not in self.scores:
            return None
        scores = {k: v for k, v in self.scores.items() if k not in exclude
                  and (k == "global" or self.counts.get(k, 0) >= self.min_count)}
        best = min(scores, key=scores.__getitem__)
        return best if scores[best] < (1 - self.margin) * scores["global"] else "global"

    def score(self, last: ServedModel | None, glob: Params, prior: Params | None, w: Windows) -> None:
        """Record how last round's personal predictor and the current heads forecast windows none trained on."""
        if len(w) == 0:
            return
        preds = {"global": params_forecast(glob, w.x)[0]}
        if prior is not None:
            preds["prior"] = params_forecast(prior, w.x)[0]
        if last is not None:
            preds["personal"] = last.personal_forecast(w)[0]
        if last is not None and last.naive_prior and w.naive is not None:
            preds["naive"] = w.naive
        mse = {k: W.mse(p, w.y) for k, p in preds.items()}
        if self.combine and self.weights and set(self.weights) <= set(preds):
            mse["combo"] = W.mse(sum(v * preds[k] for k, v in self.weights.items()), w.y)
        self.update(mse)
        if self.combine:
            self._refit({k: (np.asarray(p, np.float64) - w.y).ravel() for k, p in preds.items()})

    def _refit(self, errors: Mapping[str, np.ndarray]) -> None:
        """Update the error cross-products with this round's errors and refit the combination weights over the
        candidates scored this round (a candidate missing now, e.g. no personal model yet, is left out)."""
        names = sorted(errors)
        for i, a in enumerate(names):
            for b in names[i:]:
                v = float(np.mean(errors[a] * errors[b]))
                old = self.gram.get((a, b))
                self.gram[(a, b)] = v if old is None else self.beta * old + (1 - self.beta) * v
        g = np.array([[self.gram[(min(a, b), max(a, b))] for b in names] for a in names])
        self.weights = {k: float(v) for k, v in zip(names, simplex_min(g), strict=True) if v > 1e-6}

    def apply(self, served: ServedModel) -> ServedModel:
        """Override the in-chunk validation's decision with the record's choice (kept when there is no record)."""
        choice = self.choose()
        failed = served.fallback  # this round's personal model failed its own validation
        if choice == "personal" and failed:  # not it, then
            choice = self.choose(frozenset({"personal"}))
        if choice is not None:
            served.fallback = choice != "personal"
            served.serve_prior = choice == "prior"
            served.serve_naive = choice == "naive"
            served.combo = None
            if choice == "combo":  # with the global head in place of a personal model that failed its validation
                combo = dict(self.weights)
                if failed and "personal" in combo:
                    combo["global"] = combo.get("global", 0.0) + combo.pop("personal")
                served.combo = combo
                served.fallback = True  # not the personal model alone (what the fallback share counts)
        return served


def simplex_min(g: np.ndarray, iters: int = 500) -> np.ndarray:
    """argmin wᵀ G w over the probability simplex (w ≥ 0, Σw = 1) for a small PSD G: projected gradient with step
    1/λ_max, from equal weights (a handful of candidates: a closed form over active sets is not worth its code)."""
    k = len(g)
    w = np.full(k, 1.0 / k)
    step = 1.0 / max(float(np.linalg.eigvalsh(g).max()), 1e-12)
    for _ in range(iters):
        w = _project_simplex(w - step * (g @ w))  # ∇ = 2Gw, Lipschitz 2λ_max
    return w


def _project_simplex(v: np.ndarray) -> np.ndarray:
    """Euclidean projection onto the probability simplex (Duchi et al. 2008)."""
    u = np.sort(v)[::-1]
    css = np.cumsum(u) - 1.0
    rho = np.flatnonzero(u - css / np.arange(1, len(v) + 1) > 0)[-1]
    return np.maximum(v - css[rho] / (rho + 1), 0.0)
