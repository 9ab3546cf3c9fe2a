"""What a device does in a round, with no I/O: turn its own series into windows, compute backbone
features once, fine-tune the head from the global one, and measure before/after on a held-back
window that never enters training.

The raw series stays inside this object; only parameter deltas and metrics leave it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, replace

import numpy as np

from edge_client.learning import distortions as DS
from edge_client.learning import personalize as PZ
from edge_client.learning import windows as W
from edge_client.learning.head import Features, LossConfig, Params, as_float32, param_delta, train_head
from edge_client.learning.repair import SensorRepair, repaired_windows
from edge_client.learning.rules import RuleGuard
from edge_client.learning.serving import ServedModel, TrackRecord, Windows, params_forecast, validate
from edge_client.runtime.backbone import BackboneRunner


@dataclass(frozen=True)
class SplitConfig:
    horizon: int = 24
    eval_fraction: float = 0.2  # the most recent part of the history is held back for evaluation
    max_train_windows: int = 1024  # bounds feature memory and round time on a Pi
    eval_stride: int = 4
    val_fraction: float = 0.15  # newest training windows, held out to choose the personal model


@dataclass(frozen=True)
class RoundOutcome:
    delta: Params
    n_samples: int
    metrics: dict[str, float]
    seconds: float
    personal: Params


class DeviceLearner:
    """Local training and evaluation for one device's series."""

    def __init__(self, backbone: BackboneRunner, series: np.ndarray, *, season: int, split: SplitConfig,
                 repair: SensorRepair | None = None) -> None:
        """`repair` (fit on raw readings: ``SensorRepair.fit``): build the windows from the record with its stuck runs,
        spikes and gaps repaired (``repaired_windows``) instead of dropping every window with a gap."""
        series = np.asarray(series, dtype=np.float64).ravel()
        self.raw_series, self.repair = series, repair  # kept to rebuild repaired when a round asks (use_repair)
        context, horizon = backbone.spec.context, split.horizon
        if horizon > backbone.spec.horizon:
            raise ValueError(f"horizon {horizon} exceeds the model's {backbone.spec.horizon}")
        eval_start = int(len(series) * (1 - split.eval_fraction))
        if eval_start < context + horizon + 1:
            raise ValueError(f"series of {len(series)} steps is too short for context {context} + horizon {horizon}")
        self.backbone = backbone
        self.split = split
        self.season = season
        self.quantiles = np.asarray(backbone.spec.quantiles)
        self.scaler = W.Scaler.fit(series[:eval_start, None])
        scaled = self.scaler.transform(series[:, None])[:, 0]
        n_possible = max(eval_start - context - horizon + 1, 1)
        stride = max(1, -(-n_possible // split.max_train_windows))
        history = scaled[:eval_start]
        if repair is not None:  # thresholds in the scaled units of this learner; targets repaired on the record
            rep = replace(repair, spike_limit=repair.spike_limit / float(self.scaler.std[0]))
            x_tr, y_tr, i_tr, imputed = repaired_windows(history, rep, context, horizon, stride=stride)
            x_ev, y_ev, i_ev, _ = repaired_windows(scaled, rep, context, horizon, stride=split.eval_stride,
                                                   start=eval_start)
            history = rep.repair(history[None])[0][0]
        else:
            x_tr, y_tr, i_tr = W.make_windows(scaled, context, horizon, stride=stride, stop=eval_start,
                                              with_index=True)
            imputed = np.zeros(len(y_tr))
            x_ev, y_ev, i_ev = W.make_windows(scaled, context, horizon, stride=split.eval_stride, start=eval_start,
                                              with_index=True)
        if len(y_tr) == 0 or len(y_ev) == 0:
            raise ValueError("no complete (NaN-free) windows for training or evaluation")
        t0 = time.perf_counter()
        f_train, f_eval = backbone.features(x_tr), backbone.features(x_ev)
        self._set_data(f_train, y_tr, f_eval, y_ev, W.seasonal_naive(x_ev, horizon, season))
        self.feature_seconds = time.perf_counter() - t0
        # what distortion consistency and rule guards need besides features (a from_features learner lacks them)
        self.x_train, self.history = x_tr, history
        self.w_train = Windows(f_train, y_tr, x_tr[:, -1], i_tr % season, imputed,  # the gate's missing-rate cue
                               W.seasonal_naive(x_tr, horizon, season))
        self.w_eval = Windows(f_eval, y_ev, x_ev[:, -1], i_ev % season, np.zeros(len(y_ev)), self.naive_eval)

    @classmethod
    def from_features(cls, backbone: BackboneRunner, *, f_train: Features, y_train: np.ndarray, f_eval: Features,
                      y_eval: np.ndarray, naive_eval: np.ndarray, season: int, split: SplitConfig) -> DeviceLearner:
        """A learner on backbone features computed elsewhere: a fleet emulator runs the backbone once over a
        series and hands each emulated device the windows of its own slice (``fedge loadtest``), instead
        of one ONNX Runtime session and one feature pass per device. Training and evaluation are the same."""
        self = cls.__new__(cls)
        self.backbone, self.split, self.season = backbone, split, season
        self.raw_series, self.repair = None, None
        self.quantiles = np.asarray(backbone.spec.quantiles)
        self._set_data(f_train, y_train, f_eval, y_eval, naive_eval)
        self.feature_seconds = 0.0
        return self

    def _set_data(self, f_train: Features, y_train: np.ndarray, f_eval: Features, y_eval: np.ndarray,
                  naive_eval: np.ndarray) -> None:
        self.f_train, self.y_train, self.f_eval, self.y_eval = f_train, y_train, f_eval, y_eval
        self.naive_eval = naive_eval
        self.personal_model: PZ.PersonalModel | None = None  # survives rounds: the self-distillation teacher
        self.prior: Params | None = None  # the FVG-PT gate's prior: the first global head this learner trained from
        self.served: ServedModel | None = None  # what the device forecasts with after a personalised round
        self.upload_residual: Params | None = None  # top-k error feedback: what earlier uploads left out
        self.track: TrackRecord | None = None  # track_record: how each candidate forecast data it never trained on
        self.last_served: ServedModel | None = None  # last round's predictor, scored by the track record
        self.fresh: np.ndarray | None = None  # training windows no earlier round saw (None: the validation windows)
        self.x_train: np.ndarray | None = None
        self.history: np.ndarray | None = None
        nan = np.full(len(y_train), np.nan)
        self.w_train = Windows(f_train, y_train, nan, np.zeros(len(y_train), int), np.zeros(len(y_train)))
        nan = np.full(len(y_eval), np.nan)
        self.w_eval = Windows(f_eval, y_eval, nan, np.zeros(len(y_eval), int), np.zeros(len(y_eval)), naive_eval)

    def use_repair(self) -> None:
        """Rebuild the windows from the record with its faults repaired (a round or device.toml asked for ``repair``),
        keeping what the device learned; the detector is fit on the record the first time and kept after."""
        if self.repair is not None or self.raw_series is None:
            return
        kept = {k: getattr(self, k) for k in ("personal_model", "prior", "served", "upload_residual", "track",
                                              "last_served", "fresh")}
        self.__init__(self.backbone, self.raw_series, season=self.season, split=self.split,  # type: ignore[misc]
                      repair=SensorRepair.fit(self.raw_series, self.season))
        for k, v in kept.items():
            setattr(self, k, v)

    @property
    def n_train(self) -> int:
        return len(self.y_train)

    @property
    def n_eval(self) -> int:
        return len(self.y_eval)

    def evaluate(self, params: Mapping[str, np.ndarray] | ServedModel, prefix: str) -> dict[str, float]:
        """Scores of a head, of a personal model with an adapter (edge_client.learning.personalize), or of the
        served predictor of a personalised round (gate, rules, fallback: edge_client.learning.serving)."""
        if isinstance(params, ServedModel):
            point, quant = params.forecast(self.w_eval)
        else:
            point, quant = params_forecast(params, self.f_eval)
        quant = np.sort(quant, axis=1)  # no quantile crossing in reported forecasts
        return {
            f"{prefix}_mse": W.mse(point, self.y_eval),
            f"{prefix}_mae": W.mae(point, self.y_eval),
            f"{prefix}_crps": W.crps_from_quantiles(quant.transpose(1, 0, 2), self.y_eval, self.quantiles),
        }

    def baseline_metrics(self) -> dict[str, float]:
        return {"naive_mse": W.mse(self.naive_eval, self.y_eval), "naive_mae": W.mae(self.naive_eval, self.y_eval)}

    def run_round(
        self,
        global_params: Mapping[str, np.ndarray],
        *,
        epochs: int,
        lr: float,
        batch_size: int,
        prox_mu: float = 0.0,
        seed: int = 0,
        upload_dtype: str = "float16",
        personal: PZ.PersonalConfig | None = None,
        now_day: float = 0.0,
    ) -> RoundOutcome:
        """Fine-tune from the global head; upload the delta of the last epoch (what FedAvg
        averages) and keep as personal model the state that did best on the newest training
        windows (possibly the global head itself).

        Windows are in time order, so the validation part is the most recent history: the
        personal model is chosen for the data the device will forecast next."""
        if personal is not None and personal.repair:
            self.use_repair()
        t0 = time.perf_counter()
        cfg = LossConfig(quantiles=tuple(self.quantiles), prox_mu=prox_mu)
        fit_idx, val_idx = self._fit_val()
        n_val = len(val_idx)
        val = (self.f_train.subset(val_idx), self.y_train[val_idx]) if n_val else None
        result = train_head(global_params, self.f_train.subset(fit_idx), self.y_train[fit_idx], epochs=epochs, lr=lr,
                            batch_size=batch_size, cfg=cfg, seed=seed, val=val)
        metrics = {
            **self.evaluate(global_params, "global"),
            **self.evaluate(result.best, "personal"),
            **self.baseline_metrics(),
            "train_loss": result.losses[-1],
            "personal_kept_global": float(bool(result.val_losses) and int(np.argmin(result.val_losses)) == 0),
        }
        delta = param_delta(result.params, global_params, upload_dtype)
        kept = result.best
        self.served = None
        if personal is not None:  # a personal adapter model with the selected methods replaces the plain head
            self.served = self._fit_personal(global_params, personal, now_day, seed)
            kept = (self.served.prior if self.served.serve_prior else self.served.glob) if self.served.fallback \
                else self.served.personal
            metrics.update(self.evaluate(self.served, "personal"))
            metrics.update(self.served.metrics())
            if self.repair is not None:
                metrics["repair_imputed"] = float(self.w_train.miss.mean()) if self.n_train else 0.0
            if self.track is not None and self.track.combine:
                metrics.update({f"track_w_{k}": v for k, v in self.track.weights.items()})
        return RoundOutcome(delta, len(fit_idx), metrics, time.perf_counter() - t0, kept)

    def _fit_val(self) -> tuple[np.ndarray, np.ndarray]:
        """Training windows to fit on and the newest ones held out to choose/validate the personal model, with a gap
        of `horizon` windows between them so that no validation target was also a training target (at stride 1;
        wider strides leave a wider gap): a validation split that overlaps training flatters the personal model."""
        n_val = int(self.n_train * self.split.val_fraction) if self.n_train >= 40 else 0
        gap = min(self.split.horizon, max(self.n_train - 2 * n_val, 0)) if n_val else 0
        return np.arange(self.n_train - n_val - gap), np.arange(self.n_train - n_val, self.n_train)

    def _fit_personal(self, global_params: Mapping[str, np.ndarray], cfg: PZ.PersonalConfig, now_day: float,
                      seed: int) -> ServedModel:
        """Personal adapter + head from the new global head, keeping the device's own adapter; the
        previous personal model is the self-distillation teacher, the global head (identity adapter)
        the FedOA reference. Trained on the older training windows; the newest ones fit the FVG-PT gate (older
        half) and decide whether the personal predictor is served at all (newer half, or all without a gate)."""
        fit_idx, val_idx = self._fit_val()
        glob = as_float32(global_params)
        if cfg.track_record > 0:  # before training: score last round's candidates on data none trained on
            self.track = self.track or TrackRecord(cfg.track_record, cfg.track_margin, combine=cfg.track_combine)
            fresh = self.fresh if self.fresh is not None else val_idx
            self.track.score(self.last_served, glob, self.prior, self.w_train.subset(fresh))
        start = PZ.init_params(global_params, cfg.rank)
        if self.personal_model is not None:
            start.update({k: v for k, v in self.personal_model.params.items() if k in PZ.ADAPTER_KEYS})
        model = self.personal_model or PZ.PersonalModel.from_head(global_params, cfg)
        model = PZ.PersonalModel(model.params, cfg, model.gate, model.trained_at_day, model.log)
        fit = self.w_train.subset(fit_idx)
        self.personal_model = model.fit(fit.x, fit.y, start=start, now_day=now_day,
                                        global_params=PZ.init_params(global_params, cfg.rank),
                                        distorted=self._distorted_views(fit_idx, cfg, seed), seed=seed)
        if self.prior is None:
            self.prior = glob
        served = ServedModel(self.personal_model.params, glob, self.prior, naive_prior=cfg.naive_prior)
        check = self.w_train.subset(val_idx) if len(val_idx) else None
        if cfg.gate and len(val_idx) >= 4:
            gate_w, check = self.w_train.subset(val_idx[: len(val_idx) // 2]), self.w_train.subset(
                val_idx[len(val_idx) // 2 :])
            p, q = self.personal_model.predict(gate_w.x)
            g, z = params_forecast(glob, gate_w.x), served.prior_forecast(gate_w)
            served.gate = PZ.fit_gate(PZ.gate_stats(gate_w.x, p, g[0], gate_w.miss), (p, q), g, z, gate_w.y,
                                      len(fit_idx), cfg)
        if cfg.rules and self.history is not None:
            served.guard = RuleGuard.fit(self.history, season=self.season)
        served = validate(served, check)
        self.last_served = served
        return self.track.apply(served) if cfg.track_record > 0 and self.track is not None else served

    def _distorted_views(self, idx: np.ndarray, cfg: PZ.PersonalConfig, seed: int) -> tuple[Features, ...]:
        """Backbone features of the training contexts under each training distortion (Meta-FC); none when the
        config does not ask, or the learner was built from features alone (no contexts to distort)."""
        if not cfg.uses_distortions or self.x_train is None:
            return ()
        views = DS.distorted_views(self.x_train[idx], DS.training_distortions(), seed=seed)
        return tuple(self.backbone.features(filled) for filled, _ in views.values())
