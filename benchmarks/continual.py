"""Continual fleet benchmark (issue 14): does a device forecast better after federated rounds and on-device
adaptation than with the shipped model alone, or alone with its own data, when its data drifts?

In-process simulation of the device code the daemon runs (``DeviceLearner.run_round`` with the round's
personalisation config: train_head for the upload, the personal adapter model, gate, rule guards and the fallback
to the global head) and of the coordinator's strategies (``aggregate_round`` of fedavg / task_vector / prototype),
on tsfm-tiny-v1, the backbone ``fedge demo`` shipped when it ran (benchmarks/models/, ONNX Runtime, 1 thread).

Protocol: every device's series is cut into ``--chunks`` consecutive chunks; round t trains on the windows whose
targets lie in chunk t (only the new data: a device keeps no old windows) and is scored on chunk t+1, strictly
later than anything trained on (prequential), with non-overlapping test windows (stride = horizon = 24).
A device trains on what it recorded (injected faults in its contexts *and* targets: it cannot know the truth) and is
scored against the true series (a fleet owner wants the forecast of the quantity, not of the sensor's next fault:
an injected spike in a target is unforecastable noise). Methods with ``repair`` repair their records first
(edge_client.learning.repair, as the daemon does).
Devices: every domain in ../shared/data; in-distribution devices (real series of the pretraining domains, after
the rows the backbone trained on where the split is known, with the real gaps of I-94 traffic and Beijing PM2.5),
drifted devices (a regime change, a seasonal phase shift, injected sensor faults: stuck values, gaps, spikes; a
pattern that leaves and returns, where forgetting is measured) and new-domain devices (exchange rates, which the
shipped backbone never saw). A device that joins late is placed by its prototype before it trains.

    nice -n 10 env OMP_NUM_THREADS=1 python benchmarks/continual.py [--seeds 3] [--out docs/results]

Each (method, seed) cell is checkpointed under runs/continual/ and skipped on a rerun; the results files
(continual.json, .md, .png) are written by this script only; analysis goes below the marker in the .md.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time
import zlib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from coordinator.fleet.aggregation import ClientUpdate
from coordinator.fleet.strategies import RoundInputs, fleet_strategy
from coordinator.fleet.strategies.prototype import place
from edge_client.data.datasets import load_series
from edge_client.learning import distortions as DS
from edge_client.learning import personalize as PZ
from edge_client.learning import windows as W
from edge_client.learning.compress import compress, decompress, nbytes
from edge_client.learning.head import Params, as_float32, head_forecast, slice_head
from edge_client.learning.learner import DeviceLearner, SplitConfig
from edge_client.learning.prototype import feature_prototype
from edge_client.learning.repair import SensorRepair, repaired_windows
from edge_client.learning.serving import Windows
from edge_client.runtime.backbone import BackboneRunner

ROOT = Path(__file__).resolve().parent.parent
# The backbone these results were measured on (the model fedge shipped then; benchmarks/models/README.md)
SHIPPED = ROOT / "benchmarks" / "models" / "tsfm-tiny-v1"
MARKER = "<!-- analysis below this line is written by hand and kept by the script -->"
H = 24


# ----------------------------------------------------------------------------------------- devices

@dataclass(frozen=True)
class DeviceSpec:
    name: str
    dataset: str
    column: str
    kind: str  # in-distribution | drifted | new-domain
    drift: str = ""  # regime | phase | faults | return | "" (real data as it is)
    start: int | None = None  # first row; None: the last rows of the file
    joins: int = 0  # the round it joins the fleet (a late device is placed by its prototype first)


DEVICES = (
    DeviceSpec("etth1-OT", "etth1", "OT", "in-distribution", start=11520 - 512),
    DeviceSpec("etth1-HUFL", "etth1", "HUFL", "in-distribution", start=11520 - 512),
    DeviceSpec("electricity-0", "electricity", "client_0", "in-distribution"),
    DeviceSpec("pm2.5 (real gaps)", "pollution", "pm2.5", "in-distribution"),
    DeviceSpec("traffic (real gaps)", "traffic", "traffic_volume", "in-distribution"),
    DeviceSpec("temperature", "temperature", "temp", "in-distribution"),
    DeviceSpec("sunspots", "sunspots", "sunspots", "in-distribution"),
    DeviceSpec("etth1-MUFL regime", "etth1", "MUFL", "drifted", "regime", start=11520 - 512),
    DeviceSpec("electricity-OT phase", "electricity", "client_OT", "drifted", "phase"),
    DeviceSpec("etth1-LUFL faults", "etth1", "LUFL", "drifted", "faults", start=11520 - 512),
    DeviceSpec("pm2.5-TEMP faults", "pollution", "TEMP", "drifted", "faults"),
    DeviceSpec("etth1-OT returns", "etth1", "OT", "drifted", "return", start=8640 - 512),
    DeviceSpec("fx-AUD", "exchange_rate", "AUD", "new-domain", start=0),
    DeviceSpec("fx-GBP", "exchange_rate", "GBP", "new-domain", start=0),
    DeviceSpec("fx-JPY", "exchange_rate", "JPY", "new-domain", start=0),
    DeviceSpec("fx-CHF (joins late)", "exchange_rate", "CHF", "new-domain", start=0, joins=4),
)


def inject(values: np.ndarray, drift: str, chunk_starts: list[int], season: int, seed: int
           ) -> tuple[np.ndarray, np.ndarray]:
    """(what the device records, the truth it is scored against). Drift starts at the middle chunk."""
    x = values.astype(np.float64).copy()
    truth = x.copy()
    mid = chunk_starts[len(chunk_starts) // 2]
    std = float(np.nanstd(x[:mid]))
    rng = np.random.default_rng(seed)
    if drift == "regime":  # a new load: level +1.5 std and a 1.5x wider daily swing from the middle on
        seg = x[mid:]
        x[mid:] = np.nanmean(seg) + 1.5 * (seg - np.nanmean(seg)) + 1.5 * std
        truth = x.copy()
    elif drift == "phase":  # shift work: the daily pattern moves by 8 hours
        x[mid:] = np.roll(values, 8)[mid:]
        truth = x.copy()
    elif drift == "return":  # pattern B (daily cycle turned upside down around its level) and back to A
        b0, b1 = chunk_starts[len(chunk_starts) // 3], chunk_starts[2 * len(chunk_starts) // 3]
        level = np.nanmean(x[b0:b1])
        x[b0:b1] = 2 * level - x[b0:b1]
        truth = x.copy()
    elif drift == "faults":  # the sensor fails from the middle on: stuck runs, gaps, spikes (truth stays clean)
        n = len(x)
        for _ in range(int((n - mid) / 150)):
            a = int(rng.integers(mid, n - 72))
            kind = rng.choice(["stuck", "gap", "spikes"])
            length = int(rng.integers(12, 72))
            if kind == "stuck":
                x[a : a + length] = x[a - 1]
            elif kind == "gap":
                x[a : a + length] = np.nan
            else:
                hit = a + rng.choice(length, max(1, length // 8), replace=False)
                x[hit] += rng.choice([-1.0, 1.0], len(hit)) * rng.uniform(3, 5, len(hit)) * std
    return x, truth


@dataclass
class Chunk:
    train: Windows
    test: Windows
    x_train: np.ndarray  # filled training contexts (distortion consistency)
    x_test: np.ndarray  # filled test contexts (AutoETS refits on each)
    history: np.ndarray  # the recorded series up to the end of this chunk (rule guards)
    naive: np.ndarray  # seasonal-naive forecasts of the test windows


@dataclass
class Device:
    spec: DeviceSpec
    season: int
    chunks: list[Chunk] = field(default_factory=list)
    repaired: list[Chunk] = field(default_factory=list)  # the same chunks, faults repaired on the device (repair)


def _windows(runner: BackboneRunner, rec: np.ndarray, truth: np.ndarray, a: int, b: int, stride: int,
             season: int, repair: SensorRepair | None = None) -> tuple[Windows, np.ndarray]:
    """Windows whose targets lie in [a, b): contexts from the recorded series (at least half present; gaps
    forward-filled, or with `repair` every fault the device finds imputed), targets from `truth` (finite only) for
    test windows; training windows pass the recorded series as `truth` (a device fits what it recorded, faults
    included, or with `repair` its repaired record: ``repaired_windows``, the daemon's code)."""
    ctx_len = runner.spec.context
    if repair is not None and truth is rec:
        filled, y, idx, miss = repaired_windows(rec[:b], repair, ctx_len, H, stride=stride, start=a, stop=b)
        return Windows(runner.features(filled), y, filled[:, -1], idx % season, miss,
                       W.seasonal_naive(filled, H, season)), filled
    starts = np.arange(max(a - ctx_len, 0), b - ctx_len - H + 1, stride)
    ctx = rec[starts[:, None] + np.arange(ctx_len)[None, :]]
    y = truth[starts[:, None] + ctx_len + np.arange(H)[None, :]]
    keep = np.isfinite(y).all(axis=1) & (np.isfinite(ctx).mean(axis=1) >= 0.5)
    filled, miss = DS.fill_missing(ctx[keep]) if repair is None else repair.repair(ctx[keep])
    phase = (starts[keep] + ctx_len) % season
    return Windows(runner.features(filled), y[keep].astype(np.float32), filled[:, -1], phase, miss,
                   W.seasonal_naive(filled, H, season)), filled


def build_device(runner: BackboneRunner, spec: DeviceSpec, n_chunks: int, chunk_len: int) -> Device:
    s = load_series(spec.dataset)
    season = s.season_length if s.season_length * 2 <= runner.spec.context else 1
    ctx_len = runner.spec.context
    clen = min(chunk_len, (len(s.values) - ctx_len) // n_chunks)
    span = ctx_len + n_chunks * clen
    first = len(s.values) - span if spec.start is None else spec.start
    raw = s.column(spec.column)[first : first + span]
    starts = [ctx_len + c * clen for c in range(n_chunks)]
    rec, truth = inject(raw, spec.drift, starts, season, seed=zlib.crc32(spec.name.encode()))
    scaler = W.Scaler.fit(rec[: starts[0] + clen, None])  # what the device knows after its first chunk
    rec, truth = scaler.transform(rec[:, None])[:, 0], scaler.transform(truth[:, None])[:, 0]
    dev = Device(spec, season)
    repair = SensorRepair.fit(rec[: starts[0] + clen], season)  # learned, like the scaler, from the first chunk
    for c in range(n_chunks):
        a, b = starts[c], starts[c] + clen
        train, x_tr = _windows(runner, rec, rec, a, b, 2, season)
        test, x_te = _windows(runner, rec, truth, a, b, H, season)
        dev.chunks.append(Chunk(train, test, x_tr, x_te, rec[:b], W.seasonal_naive(x_te, H, season)))
        train, x_tr = _windows(runner, rec, rec, a, b, 2, season, repair)
        test, x_te = _windows(runner, rec, truth, a, b, H, season, repair)
        dev.repaired.append(Chunk(train, test, x_tr, x_te, repair.repair(rec[None, :b])[0][0],
                                  W.seasonal_naive(x_te, H, season)))
    return dev


# ----------------------------------------------------------------------------------------- methods

@dataclass(frozen=True)
class Method:
    name: str
    fed: str = "fedavg"  # none | fedavg | task_vector | prototype
    train: bool = True
    personal: PZ.PersonalConfig | None = None  # None: the plain head fine-tune (train_head, best on validation)
    serve_global: bool = False  # FedAvg baseline: the device serves the new global head, not its own
    compression: str = "none"  # none | int8 | topk (error feedback)
    note: str = ""

    @property
    def repair(self) -> bool:
        """Devices repair faults in their records (PersonalConfig.repair; the daemon's learner does the same)."""
        return self.personal is not None and self.personal.repair


def methods(base: PZ.PersonalConfig) -> list[Method]:
    sd, fo = dict(self_distill=1.0), dict(feature_distance=0.5)
    naive_gate = dict(gate=True, naive_prior=True, gate_prior_count=20.0)
    best = replace(base, **sd, **fo, **naive_gate, rules=True)
    track = dict(track_record=0.5, track_margin=0.02)
    return [
        Method("shipped", "none", train=False, note="the shipped model's head, no training"),
        Method("local", "none", personal=base, note="local-only continual adapter + head, no federation"),
        Method("fedavg", serve_global=True, note="FedAvg global head (what a device gets from the fleet)"),
        Method("fedavg_ft", note="FedAvg + local head fine-tune (best of start/epochs on validation)"),
        Method("fedavg_ft_int8", compression="int8", note="fedavg_ft, int8 uploads"),
        Method("fedavg_ft_topk", compression="topk", note="fedavg_ft, top-20 % int8 uploads with error feedback"),
        Method("adapter", personal=base, note="FedAvg + personal rank-4 adapter + head (served only if it "
               "validates better than the global head)"),
        Method("self_distill", personal=replace(base, **sd), note="adapter + time-aware self-distillation"),
        Method("fedoa", personal=replace(base, **fo), note="adapter + FedOA feature distance"),
        Method("gate", personal=replace(base, gate=True), note="adapter + FVG-PT gate (prior: the first global head)"),
        Method("gate_naive", personal=replace(base, **naive_gate),
               note="adapter + FVG-PT gate whose prior is the seasonal-naive forecast (n₀ = 20)"),
        Method("consistency", personal=replace(base, consistency=0.1, meta=True),
               note="adapter + Meta-FC distortion consistency"),
        Method("rules", personal=replace(base, rules=True), note="adapter + learned rule guards"),
        Method("task_vector", "task_vector", personal=base, note="task-vector aggregation + adapter"),
        Method("prototype", "prototype", personal=base, note="prototype-weighted heads + adapter"),
        Method("prototype_best", "prototype", personal=best,
               note="prototype + self-distillation + FedOA + gate (naive prior) + rules"),
        Method("fedavg_best", personal=best, note="FedAvg + self-distillation + FedOA + gate (naive prior) + rules"),
        Method("gate_track", personal=replace(base, gate=True, **track),
               note="gate, served predictor chosen by a prequential track record (β 0.5, margin 2 %; candidates: "
                    "last round's personal predictor, global head, shipped head)"),
        Method("best_track", personal=replace(best, **track),
               note="fedavg_best, served predictor chosen by the track record (naive a candidate too)"),
        Method("best_combo", personal=replace(best, **track, track_combine=True),
               note="best_track + the track record's convex combination of its candidates as one more candidate"),
        Method("fedavg_repair", serve_global=True, personal=replace(base, repair=True),
               note="the FedAvg global head on contexts the device repaired (stuck runs, spikes, gaps), "
                    "no personal model served"),
        Method("best_track_repair", personal=replace(best, **track, repair=True),
               note="best_track on repaired records (contexts and training targets)"),
        Method("best_combo_repair", personal=replace(best, **track, track_combine=True, repair=True),
               note="best_combo on repaired records"),
        Method("best_combo_huber", personal=replace(best, **track, track_combine=True, repair=True, huber=0.5),
               note="best_combo_repair, personal model and gate fit with a Huber point loss (δ 0.5 scaled units)"),
        Method("best_combo_huber_d03", personal=replace(best, **track, track_combine=True, repair=True, huber=0.3),
               note="best_combo_huber with δ 0.3"),
    ]


def _learner(runner: BackboneRunner, dev: Device, c: int) -> DeviceLearner:
    """The daemon's learner on chunk c's training windows, scored on chunk c+1 (features computed once)."""
    tr, te = dev.chunks[c].train, dev.chunks[c + 1].test
    lrn = DeviceLearner.from_features(runner, f_train=tr.x, y_train=tr.y, f_eval=te.x, y_eval=te.y,
                                      naive_eval=dev.chunks[c + 1].naive, season=dev.season,
                                      split=SplitConfig(horizon=H))
    lrn.w_train, lrn.w_eval = tr, te
    lrn.x_train, lrn.history = dev.chunks[c].x_train, dev.chunks[c].history
    return lrn


def run_cell(method: Method, runner: BackboneRunner, devs: list[Device], pre: Params, seed: int,
             epochs: int) -> dict:
    """All rounds of one method with one seed: per device and round, the served model's MSE on the next chunk."""
    if method.repair:  # every device of the fleet runs the method: all see their repaired records
        devs = [replace(d, chunks=d.repaired) for d in devs]
    n_rounds = len(devs[0].chunks) - 1
    mse = np.full((len(devs), n_rounds), np.nan)
    fallback = np.full_like(mse, np.nan)
    glob = as_float32(pre)
    starts: dict[str, Params] = {}  # personalised strategies: each device's own next start
    carried: dict[str, tuple] = {}  # what stays on a device between rounds: personal model, gate prior
    residual: dict[str, Params] = {}
    up_bytes: list[int] = []
    fleet_heads: list[tuple[np.ndarray, Params]] = []  # (prototype, head) of the last round's devices
    strategy = fleet_strategy(method.fed if method.fed != "none" else "fedavg", tv_temperature=0.1)
    placement: dict[str, float] = {}
    ret = next(i for i, d in enumerate(devs) if d.spec.drift == "return")
    leave, back = len(devs[0].chunks) // 3 - 1, 2 * len(devs[0].chunks) // 3 - 1
    snapshot: object = None  # the return device's served model after its last pattern-A round
    model_snapshot: Params | None = None  # and its personal model (adapter + head), served or not
    forgetting: dict[str, float] = {}
    for t in range(n_rounds):
        updates = []
        for k, dev in enumerate(devs):
            if t < dev.spec.joins:
                continue
            name, lrn = dev.spec.name, _learner(runner, dev, t)
            if t == dev.spec.joins and t > 0 and method.name == "prototype":  # a late device, before it trains
                placement = _placement(dev, t, glob, fleet_heads, lrn)
            if not method.train:
                mse[k, t] = lrn.evaluate(glob, "x")["x_mse"]
                if k == ret and t == back:
                    forgetting = {"after_mse": mse[k, t], "snapshot_mse": mse[k, t]}
                continue
            lrn.personal_model, lrn.prior, lrn.track, lrn.last_served = carried.get(name, (None,) * 4)
            lrn.fresh = np.arange(lrn.n_train)  # a round's windows are all new (the chunk after the last one)
            if method.fed == "none":  # local only: continue from the device's own head
                own = lrn.personal_model.params if lrn.personal_model is not None else glob
                start = {key: own[key] for key in glob}
            else:
                start = starts.get(name, glob)
            personal = replace(method.personal, seed=seed) if method.personal is not None else None
            out = lrn.run_round(start, epochs=epochs, lr=3e-3, batch_size=32, seed=seed * 1000 + 17 * t + k,
                                personal=personal, now_day=float(t))
            carried[name] = (lrn.personal_model, lrn.prior, lrn.track, lrn.last_served)
            delta = out.delta
            if method.compression != "none":
                packed, residual[name] = compress(delta, method.compression, 0.2,
                                                  residual.get(name) if method.compression == "topk" else None)
                up_bytes.append(nbytes(packed))
                delta = decompress(packed)
            else:
                up_bytes.append(int(sum(v.nbytes for v in delta.values())))
            updates.append(ClientUpdate(name, out.n_samples, delta,
                                        prototype=feature_prototype(dev.chunks[t].train.x.feats)))
            if not method.serve_global:
                mse[k, t] = out.metrics["personal_mse"]
                fallback[k, t] = out.metrics.get("personal_fallback", np.nan)
                if k == ret and t == leave:  # pattern A is about to leave: keep what the device serves now
                    snapshot = copy.deepcopy(lrn.served) if lrn.served is not None else out.personal
                    model_snapshot = dict(lrn.personal_model.params) if lrn.personal_model is not None else None
                if k == ret and t == back:  # pattern A is back (chunk t+1): the snapshot vs the model after B
                    forgetting = {"after_mse": mse[k, t], "snapshot_mse": lrn.evaluate(snapshot, "x")["x_mse"]}
                    if model_snapshot is not None and lrn.personal_model is not None:  # the personal model itself,
                        forgetting.update(  # served or not (what self-distillation protects)
                            model_after_mse=lrn.evaluate(lrn.personal_model.params, "x")["x_mse"],
                            model_snapshot_mse=lrn.evaluate(model_snapshot, "x")["x_mse"])
        if method.fed != "none" and updates:
            agg = strategy.aggregate_round(RoundInputs(glob, updates, lambda: as_float32(pre),
                                                       lambda d: starts.get(d)))
            glob = agg.global_params
            starts.update(agg.personal)
            fleet_heads = [(u.prototype, agg.personal.get(u.device_id, glob)) for u in updates]
            if method.serve_global:
                for k, dev in enumerate(devs):
                    if t >= dev.spec.joins:
                        test = dev.chunks[t + 1].test
                        mse[k, t] = W.mse(head_forecast(glob, test.x)[0], test.y)
                if t == leave:
                    snapshot = glob
                if t == back:
                    test = devs[ret].chunks[t + 1].test
                    forgetting = {"after_mse": mse[ret, t], "snapshot_mse": W.mse(head_forecast(snapshot, test.x)[0],
                                                                                 test.y)}
    return {"mse": mse.tolist(), "fallback": fallback.tolist(), "forgetting": forgetting,
            "upload_bytes": float(np.mean(up_bytes)) if up_bytes else 0.0, "placement": placement}


def _placement(dev: Device, t: int, glob: Params, fleet_heads: list, lrn: DeviceLearner) -> dict[str, float]:
    """A device joining at round t, before it trains: the global head's and the prototype-placed head's MSE on
    its next chunk (its prototype comes from the data it already has)."""
    out = {"global_mse": lrn.evaluate(glob, "x")["x_mse"], "round": t}
    if fleet_heads:
        protos = np.stack([p for p, _ in fleet_heads])
        head = place(feature_prototype(dev.chunks[t].train.x.feats), protos, [h for _, h in fleet_heads])
        out["prototype_mse"] = lrn.evaluate(head, "x")["x_mse"]
    return out


def reference_cell(devs: list[Device]) -> dict:
    """Seasonal naive and AutoETS (statsforecast, model chosen by AICc) refit on every test window's context."""
    from statsforecast.models import AutoETS

    n_rounds = len(devs[0].chunks) - 1
    ets = np.full((len(devs), n_rounds), np.nan)
    naive = np.full_like(ets, np.nan)
    for k, dev in enumerate(devs):
        for t in range(dev.spec.joins, n_rounds):
            nxt = dev.chunks[t + 1]
            preds = []
            for x in nxt.x_test:
                try:
                    preds.append(AutoETS(season_length=dev.season).forecast(y=x.astype(np.float64), h=H)["mean"])
                except Exception:  # a degenerate context AutoETS cannot fit: the last value
                    preds.append(np.repeat(x[-1], H))
            ets[k, t] = W.mse(np.asarray(preds), nxt.test.y)
            naive[k, t] = W.mse(nxt.naive, nxt.test.y)
    return {"autoets": ets.tolist(), "naive": naive.tolist()}


# ----------------------------------------------------------------------------------------- summary

KINDS = ("in-distribution", "drifted", "new-domain")


def summarise(cells: dict[str, list[dict]], ref: dict, devs: list[Device]) -> dict:
    """Per method: mean ± std over seeds of the mean device MSE (over rounds) per kind; per device means;
    forgetting on the returning device; share of devices more than 2 % worse than the FedAvg global head."""
    kinds = np.array([d.spec.kind for d in devs])
    per_method: dict[str, dict] = {}
    glob_dev = np.mean([np.nanmean(np.array(c["mse"]), axis=1) for c in cells["fedavg"]], axis=0)
    rows = {name: [np.array(c["mse"]) for c in cs] for name, cs in cells.items()}
    rows["seasonal naive"] = [np.array(ref["naive"])]
    rows["AutoETS"] = [np.array(ref["autoets"])]
    for name, mats in rows.items():
        dev_means = np.array([np.nanmean(m, axis=1) for m in mats])  # (seeds, devices)
        out: dict = {"seeds": len(mats)}
        for kind in (*KINDS, "all"):
            sel = kinds == kind if kind != "all" else np.ones(len(devs), bool)
            v = dev_means[:, sel].mean(axis=1)
            out[kind] = (float(v.mean()), float(v.std()))
        out["per_device"] = dev_means.mean(axis=0).tolist()
        out["worse_than_global_2pct"] = [devs[i].spec.name for i in range(len(devs))
                                         if dev_means[:, i].mean() > 1.02 * glob_dev[i]]
        if name in cells:  # the model after pattern B minus the snapshot from A's last round, on A's return
            f = np.array([c["forgetting"]["after_mse"] - c["forgetting"]["snapshot_mse"] for c in cells[name]])
            out["forgetting"] = (float(f.mean()), float(f.std()))
            out["return_mse"] = float(np.mean([c["forgetting"]["after_mse"] for c in cells[name]]))
            mf = [c["forgetting"]["model_after_mse"] - c["forgetting"]["model_snapshot_mse"] for c in cells[name]
                  if "model_after_mse" in c["forgetting"]]
            out["model_forgetting"] = (float(np.mean(mf)), float(np.std(mf))) if mf else None
        else:
            out["forgetting"] = (float("nan"), float("nan"))
        if name in cells:
            out["upload_bytes"] = cells[name][0]["upload_bytes"]
            fb = np.array([c["fallback"] for c in cells[name]], float)
            out["fallback_rate"] = float(np.nanmean(fb)) if np.isfinite(fb).any() else None
            pl = [c["placement"] for c in cells[name] if c["placement"]]
            if pl:
                out["placement"] = {k: float(np.mean([p[k] for p in pl])) for k in pl[0]}
        per_method[name] = out
    return per_method


def prototype_reveals(devs: list[Device]) -> dict[str, float]:
    """What a coordinator can read from prototypes: how often the nearest other device-chunk prototype (cosine)
    comes from the same dataset (domain identification), and whether the same device's own earlier chunk is the
    nearest (linking a device across rounds), against chance."""
    protos, dom, owner = [], [], []
    for i, d in enumerate(devs):
        for c in d.chunks:
            if len(c.train):
                protos.append(feature_prototype(c.train.x.feats))
                dom.append(d.spec.dataset)
                owner.append(i)
    p = np.asarray(protos, np.float64)
    p = p - p.mean(axis=0)
    p /= np.maximum(np.linalg.norm(p, axis=1, keepdims=True), 1e-12)
    sim = p @ p.T
    np.fill_diagonal(sim, -np.inf)
    nn = sim.argmax(axis=1)
    dom_a, own_a = np.array(dom), np.array(owner)
    same_dom = float(np.mean(dom_a[nn] == dom_a))
    same_dev = float(np.mean(own_a[nn] == own_a))
    chance_dom = float(np.mean([(np.sum(dom_a == x) - 1) / (len(dom_a) - 1) for x in dom_a]))
    chance_dev = float(np.mean([(np.sum(own_a == x) - 1) / (len(own_a) - 1) for x in own_a]))
    return {"nearest_same_dataset": same_dom, "chance_same_dataset": chance_dom,
            "nearest_same_device": same_dev, "chance_same_device": chance_dev, "n": len(p)}


def _fg(v: tuple[float, float] | None) -> str:
    return "–" if v is None else f"{v[0]:+.4f} ± {v[1]:.4f}"


def _pm(v: tuple[float, float]) -> str:
    return f"{v[0]:.4f} ± {v[1]:.4f}"


def markdown(summary: dict, meta: dict, notes: dict[str, str], verdicts: list[str], devs: list[Device],
             old: str) -> str:
    lines = ["| method | in-distribution | drifted | new domain | all | forgetting (Δ MSE at return) | "
             "personal-model forgetting | upload B/round | fallback | what |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for name, r in summary.items():
        fb = r.get("fallback_rate")
        lines.append(f"| {name} | {_pm(r['in-distribution'])} | {_pm(r['drifted'])} | {_pm(r['new-domain'])} | "
                     f"{_pm(r['all'])} | {r['forgetting'][0]:+.4f} | {_fg(r.get('model_forgetting'))} | "
                     f"{r.get('upload_bytes', 0):.0f} | "
                     f"{'–' if fb is None else f'{fb:.0%}'} | {notes.get(name, '')} |")
    names = list(summary)
    dev_lines = ["| device | kind | " + " | ".join(names) + " |", "|---|---|" + "---:|" * len(names)]
    for i, d in enumerate(devs):
        dev_lines.append(f"| {d.spec.name} | {d.spec.kind} | "
                         + " | ".join(f"{summary[n]['per_device'][i]:.3f}" for n in names) + " |")
    pl = next((r["placement"] for r in summary.values() if "placement" in r), None)
    rv = meta["prototype_reveals"]
    text = [
        "# Continual fleet benchmark (issue 14)", "",
        f"Generated by `benchmarks/continual.py` on {meta['machine']} in {meta['wall_s']:.0f} s "
        f"(cells computed in this run: {meta['cells_run']}, resumed: {meta['cells_resumed']}).", "",
        f"Backbone: {meta['backbone']}. {len(devs)} devices, {meta['chunks']} chunks of up to {meta['chunk_len']} "
        f"steps each (round t trains on chunk t's windows, stride 2, and is scored on chunk t+1 with non-overlapping "
        f"windows: {meta['rounds']} rounds), horizon {H}, {meta['seeds']} seeds (mean ± std over seeds of the mean "
        f"device MSE over rounds; scaled units). Personal training: {meta['personal']}.", "",
        "Forgetting: on the device whose pattern leaves and returns (`etth1-OT returns`: pattern A, then three chunks "
        "of pattern B, then A again), MSE on the first chunk after A returns of the model the device serves after "
        "the B rounds minus that of the model it served after A's last round (both scored on the same later "
        "windows; > 0: B erased something A needed); `personal-model forgetting`: the same for the device's personal "
        "adapter + head, whether or not it was served. `fallback`: share of device-rounds in "
        "which the personal predictor validated no better than the global head and the global head was served.",
        "", *lines, "",
        "## Targets", "", *[f"- {v}" for v in verdicts], "",
        "## New device placed by its prototype", "",
        (f"`fx-CHF` joins at round {pl['round']:.0f} with data but no training: FedAvg global head MSE "
         f"{pl['global_mse']:.4f}, prototype-placed head {pl.get('prototype_mse', float('nan')):.4f} (its next "
         "chunk)." if pl else "no placement measured"), "",
        "## What a prototype reveals", "",
        f"Over {rv['n']} device-chunk prototypes, the nearest other prototype comes from the same dataset "
        f"{rv['nearest_same_dataset']:.0%} of the time (chance {rv['chance_same_dataset']:.0%}) and from the same "
        f"device {rv['nearest_same_device']:.0%} (chance {rv['chance_same_device']:.0%}): "
        "a prototype tells the coordinator what kind of series a device has and links its rounds "
        "(docs/privacy.md).", "",
        "## Per device (mean MSE over rounds and seeds)", "", *dev_lines, "",
        "![per-device MSE relative to the FedAvg global head](continual.png)", "", MARKER, old,
    ]
    return "\n".join(text)


def verdicts(summary: dict) -> list[str]:
    g, loc = summary["fedavg"], summary["local"]
    candidates = [n for n in summary if n not in ("shipped", "local", "fedavg", "seasonal naive", "AutoETS")
                  and not n.startswith("fedavg_ft_")]
    out = []
    for kind in ("drifted", "new-domain"):
        best = min(candidates, key=lambda n: summary[n][kind][0])
        b = summary[best][kind]
        gain = 1 - b[0] / g[kind][0]
        beyond = b[0] + b[1] < g[kind][0] - g[kind][1] and b[0] + b[1] < loc[kind][0] - loc[kind][1]
        met = gain >= 0.10 and b[0] < loc[kind][0] and beyond
        out.append(f"{kind}: best personalised `{best}` {_pm(b)} vs FedAvg global {_pm(g[kind])} "
                   f"({100 * gain:+.1f} % lower) and local-only {_pm(loc[kind])}: "
                   f"{'MET' if met else 'NOT met'} (≥ 10 % lower than global, lower than local, beyond seed spread)")
    best_all = min(candidates, key=lambda n: summary[n]["all"][0])
    best_drift = min(candidates, key=lambda n: summary[n]["drifted"][0])
    for name, why in ((best_all, "best overall"), (best_drift, "best on drifted devices")):
        if why != "best overall" and name == best_all:
            continue
        worse = summary[name]["worse_than_global_2pct"]
        out.append(f"no device > 2 % worse than the global head with `{name}` ({why}): "
                   f"{'MET' if not worse else 'NOT met: ' + ', '.join(worse)}")
    sd, base = summary.get("self_distill"), summary.get("adapter")
    if sd and base and sd.get("model_forgetting") and base.get("model_forgetting"):
        b, d = base["model_forgetting"], sd["model_forgetting"]
        ok = b[0] > 0 and d[0] + d[1] < b[0] - b[1]
        out.append(f"personal-model forgetting (the adapter + head itself, served or not): adapter {_fg(b)}, with "
                   f"self-distillation {_fg(d)}: {'MET' if ok else 'NOT met'} (forgetting occurs and "
                   "self-distillation reduces it beyond seed spread)")
    if sd and base:
        occurs = base["forgetting"][0] > 0
        reduces = sd["forgetting"][0] < base["forgetting"][0]
        out.append(f"forgetting (Δ MSE at return): adapter {base['forgetting'][0]:+.4f}, with self-distillation "
                   f"{sd['forgetting'][0]:+.4f}; forgetting {'occurs' if occurs else 'does not occur'} and "
                   f"self-distillation {'reduces' if reduces else 'does not reduce'} it: "
                   f"{'MET' if occurs and reduces else 'NOT met'}")
    ft = summary["fedavg_ft"]
    for comp in ("fedavg_ft_int8", "fedavg_ft_topk"):
        if comp not in summary:
            continue
        c = summary[comp]
        cost = 100 * (c["all"][0] / ft["all"][0] - 1)
        ok = c["upload_bytes"] <= 4096 and cost < 1.0
        out.append(f"`{comp}`: {c['upload_bytes']:.0f} B per device and round (float16: {ft['upload_bytes']:.0f}), "
                   f"MSE {cost:+.2f} % vs fedavg_ft: {'MET' if ok else 'NOT met'} (≤ 4 KB at < 1 % cost)")
    return out


def plot(summary: dict, devs: list[Device], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    show = [n for n in ("local", "fedavg_ft", "adapter", "task_vector", "prototype", "prototype_best",
                        "fedavg_best", "best_track", "best_combo_repair", "seasonal naive", "AutoETS", "shipped")
            if n in summary]
    g = np.array(summary["fedavg"]["per_device"])
    fig, ax = plt.subplots(figsize=(14, 6))
    x = np.arange(len(devs))
    width = 0.8 / len(show)
    for i, n in enumerate(show):
        rel = np.array(summary[n]["per_device"]) / g - 1
        ax.bar(x + i * width, 100 * np.clip(rel, -1, 1.5), width, label=n)
    ax.axhline(0, color="k", lw=0.8)
    ax.axhline(2, color="r", lw=0.6, ls="--")
    ax.set_xticks(x + 0.4, [f"{d.spec.name}\n({d.spec.kind})" for d in devs], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("MSE vs FedAvg global head, % (clipped at +150)")
    ax.legend(fontsize=7, ncol=5)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--chunks", type=int, default=9)
    ap.add_argument("--chunk-len", type=int, default=336)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--only", nargs="*", help="run only these methods (the baselines always run)")
    ap.add_argument("--cache", default=str(ROOT / "runs" / "continual"))
    ap.add_argument("--out", default=str(ROOT / "docs" / "results"))
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    runner = BackboneRunner(SHIPPED / "backbone.onnx", threads=1)
    pre_head = slice_head(dict(np.load(SHIPPED / "head.npz")), H)
    devs = [build_device(runner, s, args.chunks, args.chunk_len) for s in DEVICES]
    print(f"devices and features: {time.perf_counter() - t0:.0f} s", flush=True)
    base = PZ.PersonalConfig(rank=4, epochs=args.epochs, lr=3e-3, batch_size=32)
    chosen = methods(base)
    if args.only:
        chosen = [m for m in chosen if m.name in {"shipped", "local", "fedavg", "fedavg_ft", *args.only}]
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    tag = f"c{args.chunks}-l{args.chunk_len}-e{args.epochs}"
    ran = resumed = 0
    ref_path = cache / f"{tag}-reference.json"
    if ref_path.exists():
        ref, resumed = json.loads(ref_path.read_text()), resumed + 1
    else:
        t1 = time.perf_counter()
        ref = reference_cell(devs)
        ref_path.write_text(json.dumps(ref))
        ran += 1
        print(f"reference (naive, AutoETS): {time.perf_counter() - t1:.0f} s", flush=True)
    cells: dict[str, list[dict]] = {}
    for m in chosen:
        for seed in range(args.seeds):
            path = cache / f"{tag}-{m.name}-s{seed}.json"
            if path.exists():
                cell, resumed = json.loads(path.read_text()), resumed + 1
            else:
                t1 = time.perf_counter()
                cell = run_cell(m, runner, devs, pre_head, seed, args.epochs)
                path.write_text(json.dumps(cell))
                ran += 1
                print(f"{m.name:>16} seed {seed}: {time.perf_counter() - t1:.1f} s, mean MSE "
                      f"{np.nanmean(np.array(cell['mse'])):.4f}", flush=True)
            cells.setdefault(m.name, []).append(cell)
    summary = summarise(cells, ref, devs)
    reveals = prototype_reveals(devs)
    meta = {
        "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} cores (shared), 1 ORT/BLAS thread",
        "wall_s": time.perf_counter() - t0, "cells_run": ran, "cells_resumed": resumed,
        "backbone": "tsfm-tiny-v1 (benchmarks/models/, shipped until v2; context 512, feature_dim 64), ONNX Runtime "
                    "fp32, its pretrained head sliced to horizon 24",
        "chunks": args.chunks, "chunk_len": args.chunk_len, "rounds": args.chunks - 1, "seeds": args.seeds,
        "personal": f"rank-4 adapter + head, Adam lr 3e-3, {args.epochs} epochs, batch 32; the upload is the plain "
                    f"head fine-tune's float16 delta",
        "devices": [asdict(d.spec) for d in devs], "config": asdict(base), "prototype_reveals": reveals,
    }
    notes = {m.name: m.note for m in chosen} | {
        "seasonal naive": "repeat the last season", "AutoETS": "statsforecast AutoETS refit on each test context"}
    found = verdicts(summary)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    md = out / "continual.md"
    old = md.read_text().split(MARKER, 1)[1] if md.exists() and MARKER in md.read_text() else "\n"
    (out / "continual.json").write_text(json.dumps({"meta": meta, "summary": summary}, indent=1) + "\n")
    md.write_text(markdown(summary, meta, notes, found, devs, old))
    plot(summary, devs, out / "continual.png")
    for name, r in summary.items():
        print(f"{name:>16}: drifted {_pm(r['drifted'])}  new {_pm(r['new-domain'])}  all {_pm(r['all'])}  "
              f"forgetting {r['forgetting'][0]:+.4f}")
    for v in found:
        print("-", v)
    return summary


if __name__ == "__main__":
    main()
