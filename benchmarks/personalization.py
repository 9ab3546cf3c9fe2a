"""Personalisation benchmark (issue 4): which on-device method helps which device, and at what cost.

In-process simulation, no broker: devices are carved from several real datasets, each device's data
arrives in time-ordered chunks (one federated round per chunk), and every method sees the same
devices, the same windows, the same distortions and the same seeds. Three devices from domains no
federated device has (weather, sunspots) are held out of federation as new/OOD devices.

    python benchmarks/personalization.py [--chunks 4] [--epochs 8] [--out docs/results]

Per method: mean/median device MSE and MAE (over rounds, each round's test part of the current
chunk), share of devices better than the FedAvg global model and than local-only training,
forgetting (error on earlier chunks at the end minus right after learning them), new-device (OOD)
error, error growth under the held-out distortion, upload bytes per device and round, rule hits.

Backbone: the cached tiny TSFM (context 256, horizon 24, d_model 32, 150 pretraining steps on the
ETTh1 training split, ~45 s to train once on 2 cores) rather than the default 512/96 model, so the
whole benchmark stays well under 10 minutes on 2 shared cores. Writes personalization.{md,json,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from coordinator.fleet.aggregation import ClientUpdate
from coordinator.fleet.strategies.fedavg import FedAvg
from coordinator.fleet.strategies.task_vector import TaskVectorAggregation
from edge_client.data.datasets import load_series
from edge_client.learning import distortions as DS
from edge_client.learning import personalize as P
from edge_client.learning import windows as W
from edge_client.learning.head import Features, param_delta
from edge_client.learning.rules import RuleGuard
from edge_client.runtime.backbone import BackboneRunner

ROOT = Path(__file__).resolve().parent.parent
STEP_DAYS = {"h": 1 / 24, "D": 1.0, "MS": 30.44}
# (dataset, columns, first row of the device's history or None = end of file); devices see only
# rows the backbone never trained on (ETTh1 after its 12-month training split).
FED_DEVICES = (
    ("etth1", ("HUFL", "HULL", "MUFL", "LUFL", "OT"), 8640 - 256),
    ("electricity", ("client_0", "client_OT"), 0),
    ("electricity", ("client_0", "client_OT"), 14000),
    ("pollution", ("pm2.5", "TEMP", "DEWP"), 0),  # pm2.5 has gaps: NaN handling is exercised
    ("traffic", ("traffic_volume",), None),
    ("exchange_rate", ("AUD", "GBP", "JPY"), 0),
)
OOD_DEVICES = (("temperature", "temp", 0), ("temperature", "temp", 1800), ("sunspots", "sunspots", 1000))


# ----------------------------------------------------------------------------------------- data

@dataclass
class Split:
    x: Features
    y: np.ndarray
    ctx: np.ndarray  # filled contexts (for rules and seasonal-naive)
    miss: np.ndarray
    phase: np.ndarray

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class Chunk:
    train: Split
    val: Split
    test: Split
    test_heldout: Split  # test contexts under the held-out distortion
    views: tuple[Features, ...]  # train contexts under each training distortion
    day: float  # time of the chunk's end, in days
    history: np.ndarray  # scaled series up to the end of this chunk's training part (for rules)


@dataclass
class Device:
    name: str
    domain: str
    season: int
    chunks: list[Chunk] = field(default_factory=list)


def _windows(runner: BackboneRunner, s: np.ndarray, a: int, b: int, stride: int, season: int, h: int) -> Split:
    """Windows whose targets lie in [a, b): NaN contexts filled, NaN targets dropped."""
    ctx_len = runner.spec.context
    starts = np.arange(max(a - ctx_len, 0), b - ctx_len - h + 1, stride)
    idx = starts[:, None] + np.arange(ctx_len + h)[None, :]
    win = s[idx] if len(starts) else np.zeros((0, ctx_len + h))
    ctx, y = win[:, :ctx_len], win[:, ctx_len:]
    keep = np.isfinite(y).all(axis=1) & (np.isfinite(ctx).mean(axis=1) >= 0.5)
    filled, miss = DS.fill_missing(ctx[keep]) if keep.any() else (np.zeros((0, ctx_len), np.float32), np.zeros(0))
    return Split(runner.features(filled), y[keep].astype(np.float32), filled, miss, (starts[keep] + ctx_len) % season)


def _distorted(runner: BackboneRunner, split: Split, kind: str, seed: int) -> tuple[Features, np.ndarray, np.ndarray]:
    filled, miss = DS.distorted_views(split.ctx, (kind,), seed=seed)[kind]
    return runner.features(filled), filled, miss


def build_device(runner: BackboneRunner, name: str, domain: str, series: np.ndarray, season: int, freq: str,
                 n_chunks: int, chunk_len: int, seed: int, held_out: str, with_views: bool = True) -> Device:
    """Scale with statistics of the first chunk's training part only (what a device knows then)."""
    ctx_len, h = runner.spec.context, runner.spec.horizon
    scaler = W.Scaler.fit(series[: ctx_len + int(0.7 * chunk_len), None])
    s = scaler.transform(series[:, None])[:, 0]
    dev = Device(name, domain, season)
    for c in range(n_chunks):
        a = ctx_len + c * chunk_len
        tr_end, va_end, end = a + int(0.7 * chunk_len), a + int(0.8 * chunk_len), a + chunk_len
        train = _windows(runner, s, a, tr_end, 4, season, h)
        val = _windows(runner, s, tr_end, va_end, 4, season, h)
        test = _windows(runner, s, va_end, end, 4, season, h)
        hx, hctx, hmiss = _distorted(runner, test, held_out, seed * 1000 + c)
        views = tuple(_distorted(runner, train, k, seed * 1000 + c)[0] for k in DS.training_distortions(held_out)) \
            if with_views else ()
        dev.chunks.append(Chunk(train, val, test, Split(hx, test.y, hctx, hmiss, test.phase), views,
                                end * STEP_DAYS.get(freq, 1.0), s[:tr_end]))
    return dev


def carve(runner: BackboneRunner, n_chunks: int, chunk_len: int, held_out: str) -> tuple[list[Device], list[Device]]:
    span = runner.spec.context + n_chunks * chunk_len
    fed, ood = [], []
    for name, cols, start in FED_DEVICES:
        series = load_series(name)
        first = len(series.values) - span if start is None else start
        for col in cols:
            vals = series.column(col)[first : first + span]
            if len(vals) < span:
                continue
            fed.append(build_device(runner, f"{name}:{col}@{first}", series.domain, vals, series.season_length,
                                    series.freq, n_chunks, chunk_len, len(fed), held_out))
    for name, col, start in OOD_DEVICES:
        series = load_series(name)
        vals = series.column(col)[start : start + runner.spec.context + chunk_len]
        ood.append(build_device(runner, f"{name}:{col}@{start}", series.domain, vals, series.season_length,
                                series.freq, 1, chunk_len, 100 + len(ood), held_out))
    return fed, ood


# ----------------------------------------------------------------------------------------- methods

@dataclass(frozen=True)
class Method:
    name: str
    fed: str = "fedavg"  # none | fedavg | taskvec
    finetune: bool = True
    fedoa: bool = False  # personal adapter persists locally, regularised to the received global's features
    rules: bool = False
    cfg: P.PersonalConfig = field(default_factory=P.PersonalConfig)
    note: str = ""


def methods(base: P.PersonalConfig) -> list[Method]:
    sd = dict(self_distill=1.0)
    fo = dict(feature_distance=1.0)
    fc = dict(consistency=0.1, meta=True)
    all_terms = {**sd, **fo, **fc, "gate": True}
    return [
        Method("pretrained", "none", finetune=False, note="zero-shot pretrained head (the prior)"),
        Method("local", "none", cfg=base, note="local-only continual training, no federation"),
        Method("fedavg_ft", cfg=base, note="FedAvg global + local fine-tune each round (global row = its FedAvg)"),
        Method("self_distill", cfg=replace(base, **sd), note="+ time-aware self-distillation"),
        Method("fedoa", fedoa=True, cfg=replace(base, **fo), note="+ FedOA persistent personal adapter"),
        Method("gate", cfg=replace(base, gate=True), note="+ FVG-PT gate with prior calibration"),
        Method("consistency", cfg=replace(base, **fc), note="+ Meta-FC distortion consistency (meta)"),
        Method("taskvec", "taskvec", cfg=base, note="bi-level task-vector aggregation + fine-tune"),
        Method("rules", rules=True, cfg=base, note="fedavg_ft + learned rule guards"),
        Method("combined", "taskvec", fedoa=True, rules=True, cfg=replace(base, **all_terms), note="all of the above"),
        Method("combined-sd", "taskvec", fedoa=True, rules=True, cfg=replace(base, **{**all_terms, "self_distill": 0}),
               note="ablation: combined without self-distillation"),
        Method("combined-gate", "taskvec", fedoa=True, rules=True, cfg=replace(base, **{**all_terms, "gate": False}),
               note="ablation: combined without the gate"),
        Method("combined-tv", "fedavg", fedoa=True, rules=True, cfg=replace(base, **all_terms),
               note="ablation: combined with FedAvg instead of task vectors"),
    ]


@dataclass
class DeviceState:
    model: P.PersonalModel
    received: dict[str, np.ndarray]
    gate: P.Gate | None = None
    guard: RuleGuard | None = None


def _forecast(method: Method, st: DeviceState, split: Split, prior: dict[str, np.ndarray]) -> np.ndarray:
    """The device's point forecast for a split: personal model, gated mix, then rule guards."""
    point, quant = st.model.predict(split.x)
    if st.gate is not None:
        glob = P.personal_forecast(st.received, split.x)
        pri = P.personal_forecast(prior, split.x)
        stats = P.gate_stats(split.x, point, glob[0], split.miss)
        point, quant = st.gate.mix(stats, (point, quant), glob, pri)
    if st.guard is not None:
        point = st.guard.correct(point, split.ctx[:, -1], split.phase)
    return point


def _personalise(method: Method, st: DeviceState, chunk: Chunk, start: dict[str, np.ndarray],
                 prior: dict[str, np.ndarray], season: int, seed: int) -> tuple[DeviceState, dict[str, np.ndarray]]:
    """One round on one device: train the personal model, fit gate and rules. Returns the new state
    and the parameters whose delta is uploaded (the FedOA global-side model or the personal one)."""
    cfg = method.cfg
    tr = chunk.train
    if not method.finetune:
        return DeviceState(P.PersonalModel(dict(start), cfg), start), start
    upload = None
    if method.fedoa:  # global side: plain task loss from the received model (what FedAvg sees)
        plain = replace(cfg, self_distill=0.0, feature_distance=0.0, consistency=0.0, meta=False)
        upload, _ = P.train(start, P.Batch(tr.x, tr.y), plain, anchor=start, seed=seed)
        personal_start = st.model.params
    else:
        personal_start = start
    model = st.model.fit(tr.x, tr.y, start=personal_start, now_day=chunk.day, global_params=start,
                         distorted=chunk.views, seed=seed)
    new = DeviceState(model, start)
    if cfg.gate and len(chunk.val):
        p, q = model.predict(chunk.val.x)
        glob, pri = P.personal_forecast(start, chunk.val.x), P.personal_forecast(prior, chunk.val.x)
        stats = P.gate_stats(chunk.val.x, p, glob[0], chunk.val.miss)
        new.gate = P.fit_gate(stats, (p, q), glob, pri, chunk.val.y, len(tr), cfg)
    if method.rules:
        new.guard = RuleGuard.fit(chunk.history, season=season)
    return new, upload if upload is not None else model.params


def _upload_bytes(delta: dict[str, np.ndarray]) -> int:
    return int(sum(v.nbytes for v in delta.values()))


def run_method(method: Method, fed: list[Device], ood: list[Device], pre: dict[str, np.ndarray],
               seed: int) -> dict:
    """All rounds of one method; per-device metrics in scaled units."""
    n_chunks = len(fed[0].chunks)
    states = [DeviceState(P.PersonalModel(dict(pre), method.cfg), dict(pre)) for _ in fed]
    glob = dict(pre)
    starts = [dict(pre) for _ in fed]
    cur = np.zeros((len(fed), n_chunks))
    cur_mae = np.zeros_like(cur)
    dist = np.zeros_like(cur)
    glob_mse = np.zeros_like(cur)
    uploads: list[int] = []
    tv = TaskVectorAggregation(temperature=0.1, remove_mean=True)
    last_updates: list[ClientUpdate] = []
    for c in range(n_chunks):
        updates = []
        for k, dev in enumerate(fed):
            start = {"none": states[k].model.params, "fedavg": glob, "taskvec": starts[k]}[method.fed]
            states[k], up = _personalise(method, states[k], dev.chunks[c], start, pre, dev.season, seed + 7 * c + k)
            if method.fed != "none" and method.finetune:
                ref = pre if method.fed == "taskvec" else glob
                delta = param_delta(up, ref)
                uploads.append(_upload_bytes(delta))
                updates.append(ClientUpdate(dev.name, len(dev.chunks[c].train), delta))
            test = dev.chunks[c].test
            point = _forecast(method, states[k], test, pre)
            cur[k, c], cur_mae[k, c] = W.mse(point, test.y), W.mae(point, test.y)
            dist[k, c] = W.mse(_forecast(method, states[k], dev.chunks[c].test_heldout, pre), test.y)
        if method.fed == "fedavg" and updates:
            glob = FedAvg().aggregate(glob, updates)
        elif method.fed == "taskvec" and updates:
            aggs = tv.aggregate_personal(pre, updates)
            starts = [aggs[d.name] for d in fed]
        if method.fed == "fedavg":
            for k, dev in enumerate(fed):
                glob_mse[k, c] = W.mse(P.personal_forecast(glob, dev.chunks[c].test.x)[0], dev.chunks[c].test.y)
        last_updates = updates
    final_earlier = np.array([[W.mse(_forecast(method, st, dev.chunks[c].test, pre), dev.chunks[c].test.y)
                               for c in range(n_chunks - 1)] for st, dev in zip(states, fed, strict=True)])
    forgetting = (final_earlier - cur[:, : n_chunks - 1]).mean(axis=1) if n_chunks > 1 else np.zeros(len(fed))
    ood_mse = [_ood(method, dev, glob, pre, tv, last_updates, seed) for dev in ood]
    hits = [st.guard.report() for st in states if st.guard is not None]
    return {
        "device_mse": cur.mean(axis=1).tolist(), "device_mae": cur_mae.mean(axis=1).tolist(),
        "final_round_mse": cur[:, -1].tolist(), "heldout_mse": dist.mean(axis=1).tolist(),
        "global_mse": glob_mse.mean(axis=1).tolist() if method.fed == "fedavg" else None,
        "forgetting": forgetting.tolist(), "earlier_chunks_mse_end": final_earlier.mean(axis=1).tolist(),
        "ood_mse": ood_mse, "upload_bytes_per_round": float(np.mean(uploads)) if uploads else 0.0,
        "rule_hit_rate": float(np.mean([h["rule_hit_rate"] for h in hits])) if hits else None,
        "rule_hits": {k: float(sum(h.get(k, 0) for h in hits)) for k in sorted({k for h in hits for k in h})
                      if k.startswith("rule_hits_")},
        "mean_gate_r": _mean_gate(states, fed),
    }


def _mean_gate(states: list[DeviceState], fed: list[Device]) -> float | None:
    rs = []
    for st, dev in zip(states, fed, strict=True):
        if st.gate is not None:
            test = dev.chunks[-1].test
            p = st.model.predict(test.x)[0]
            received = P.personal_forecast(st.received, test.x)[0]
            rs.append(float(st.gate.r(P.gate_stats(test.x, p, received, test.miss)).mean()))
    return float(np.mean(rs)) if rs else None


def _ood(method: Method, dev: Device, glob: dict, pre: dict, tv: TaskVectorAggregation,
         updates: list[ClientUpdate], seed: int) -> float:
    """A new device joins after the last round with one chunk of history and personalises once."""
    chunk = dev.chunks[0]
    if method.fed == "fedavg":
        start = glob
    elif method.fed == "taskvec" and updates:
        first, _ = P.train(pre, P.Batch(chunk.train.x, chunk.train.y), method.cfg, seed=seed)
        start = tv.aggregate_for(pre, param_delta(first, pre), updates)
    else:
        start = pre
    st = DeviceState(P.PersonalModel(dict(pre), method.cfg), dict(start))
    st, _ = _personalise(method, st, chunk, dict(start), pre, dev.season, seed)
    return W.mse(_forecast(method, st, chunk.test, pre), chunk.test.y)


# ----------------------------------------------------------------------------------------- summary

def summarise(raw: dict[str, dict], fed: list[Device]) -> dict[str, dict]:
    global_mse = np.array(raw["fedavg_ft"]["global_mse"])
    local = np.array(raw["local"]["device_mse"])
    rows: dict[str, dict] = {}
    for name, r in [("fedavg (global)", {**raw["fedavg_ft"], "device_mse": raw["fedavg_ft"]["global_mse"]}),
                    *raw.items()]:
        mse = np.array(r["device_mse"])
        clean = np.array(r["device_mse"])
        growth = (np.array(r["heldout_mse"]) - clean) / np.maximum(clean, 1e-12) if name != "fedavg (global)" \
            else None
        rows[name] = {
            "mse_mean": float(mse.mean()), "mse_median": float(np.median(mse)),
            "mae_mean": float(np.mean(r["device_mae"])) if name != "fedavg (global)" else None,
            "better_than_global": float(np.mean(mse < global_mse - 1e-12)),
            "better_than_local": float(np.mean(mse < local - 1e-12)),
            "forgetting": float(np.mean(r["forgetting"])) if name != "fedavg (global)" else None,
            "ood_mse": float(np.mean(r["ood_mse"])) if name != "fedavg (global)" else None,
            "heldout_growth_pct": float(100 * growth.mean()) if growth is not None else None,
            "upload_bytes": r["upload_bytes_per_round"],
            "rule_hit_rate": r.get("rule_hit_rate"),
            "gate_r": r.get("mean_gate_r"),
        }
    if rows["fedavg (global)"]["ood_mse"] is None:
        rows["fedavg (global)"]["ood_mse"] = None
    return rows


COLUMNS = (("mse_mean", "MSE mean", "{:.4f}"), ("mse_median", "MSE median", "{:.4f}"), ("mae_mean", "MAE", "{:.4f}"),
           ("better_than_global", ">global", "{:.0%}"), ("better_than_local", ">local", "{:.0%}"),
           ("forgetting", "forgetting", "{:+.4f}"), ("ood_mse", "OOD MSE", "{:.4f}"),
           ("heldout_growth_pct", "held-out dist. Δ%", "{:+.1f}"), ("upload_bytes", "upload B/round", "{:.0f}"),
           ("rule_hit_rate", "rule hits", "{:.2%}"), ("gate_r", "gate r", "{:.2f}"))


def _fmt(v: float | None, f: str) -> str:
    return "–" if v is None else f.format(v)


def markdown(rows: dict[str, dict], meta: dict, notes: dict[str, str], findings: list[str]) -> str:
    head = "| method | " + " | ".join(c[1] for c in COLUMNS) + " | what |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 2)]
    for name, r in rows.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(r[c[0]], c[2]) for c in COLUMNS) + f" | {notes.get(name, '')} |")
    return "\n".join([
        "# Personalisation benchmark (issue 4)", "",
        f"Generated by `benchmarks/personalization.py` on {meta['machine']} in {meta['wall_s']:.0f} s.", "",
        f"{meta['n_devices']} federated devices from {', '.join(meta['datasets'])}; {meta['n_ood']} new (OOD) devices "
        f"from {', '.join(meta['ood_datasets'])} held out of federation. {meta['chunks']} time-ordered chunks of "
        f"{meta['chunk_len']} steps per device, one round per chunk (train 70 % / gate-validation 10 % / test 20 % "
        f"of each chunk, window stride 4). Backbone: {meta['backbone']}. Held-out distortion: "
        f"`{meta['held_out']}` (training distortions: {', '.join(meta['train_distortions'])}). "
        f"Personal training: {meta['personal']}.", "",
        "MSE/MAE on each device's scaled values, averaged over rounds (test part of the current chunk). "
        "`>global`/`>local`: share of devices with lower MSE than the FedAvg global model / local-only training. "
        "`forgetting`: MSE on earlier chunks' test parts at the end minus right after learning them. "
        "`OOD MSE`: mean over the new devices after one chunk of personalisation. `held-out dist. Δ%`: MSE "
        "growth when test contexts carry the held-out distortion. `upload`: float16 delta bytes per device "
        "and round. `rule hits`: share of forecast values the rule guards corrected. `gate r`: mean "
        "personal weight of the FVG-PT gate.", "",
        *lines, "",
        f"Seasonal-naive reference (mean device MSE): {meta['naive_mse']:.4f}.", "",
        "## Findings (computed from the numbers above)", "", *[f"- {f}" for f in findings], "",
        "## How to read this", "", *[f"- {c}" for c in CAVEATS], "",
    ])


CAVEATS = (
    "Differences between the personalised methods are a few per cent of MSE over 16 devices; compare them "
    "with the seed-to-seed spread (rerun with `--seed 1`) before calling one better than another.",
    "Forgetting is negative for every method in this setting: the later models are better on earlier "
    "chunks than the models trained on those chunks were, because the chunks of one device share their "
    "patterns and more rounds mean more (federated) data. Time-aware self-distillation guards against "
    "forgetting that does not occur here, so it cannot show its main benefit; it acts as a regulariser.",
    "The FVG-PT gate's prior is the zero-shot pretrained head, which is poor on the new domains (see the "
    "`pretrained` OOD column); calibrating toward it on a new device with few validation windows raises "
    "the OOD error. It helps in-distribution devices, where the prior is reasonable.",
    "The held-out distortion (a stuck sensor) raises MSE by only ~10 %: RevIN and the forward-filled "
    "contexts already absorb most of it, so distortion consistency has little to remove. It lowered "
    "the new-device error with seed 0 (0.708 vs 0.738) but not with seed 1 (0.673 vs 0.665): no robust gain.",
    "Rule guards rarely fire on clean forecasts (a fraction of a per cent of values): a linear head on "
    "scaled data seldom leaves the learned range; they act on implausible jumps and distorted contexts.",
    "Upload is identical for every federated method: all send the float16 delta of head + rank-4 "
    "adapter; gates, rules and personal adapters stay on the device.",
)


def findings(rows: dict[str, dict]) -> list[str]:
    base = rows["fedavg_ft"]
    out = []
    for name, r in rows.items():
        if name in ("fedavg_ft", "fedavg (global)", "pretrained", "local"):
            continue
        d = 100 * (r["mse_mean"] / base["mse_mean"] - 1)
        word = "better" if d < -0.5 else "worse" if d > 0.5 else "no different (±0.5 %)"
        extra = []
        if r["forgetting"] is not None and base["forgetting"] is not None:
            extra.append(f"forgetting {r['forgetting']:+.4f} vs {base['forgetting']:+.4f}")
        if r["ood_mse"] is not None:
            extra.append(f"OOD {r['ood_mse']:.4f} vs {base['ood_mse']:.4f}")
        if r["heldout_growth_pct"] is not None:
            extra.append(f"held-out distortion growth {r['heldout_growth_pct']:+.1f}% vs "
                         f"{base['heldout_growth_pct']:+.1f}%")
        out.append(f"`{name}`: mean MSE {d:+.1f}% vs fedavg_ft ({word}); " + "; ".join(extra))
    return out


def plot(rows: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    panels = (("mse_mean", "mean device MSE"), ("forgetting", "forgetting (Δ MSE, earlier chunks)"),
              ("ood_mse", "new-device (OOD) MSE"), ("heldout_growth_pct", "held-out distortion MSE growth %"))
    fig, axes = plt.subplots(1, 4, figsize=(20, 5))
    for ax, (key, title) in zip(axes, panels, strict=True):
        vals = [rows[n][key] if rows[n][key] is not None else np.nan for n in names]
        ax.barh(names, vals, color="tab:blue")
        if key in ("mse_mean", "ood_mse"):  # differences are a few %: do not start the axis at 0
            lo, hi = np.nanmin(vals), np.nanmax(vals)
            ax.set_xlim(lo - 0.3 * (hi - lo), hi + 0.1 * (hi - lo))
        ax.set_title(title)
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_table(rows: dict[str, dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="personalisation (scaled units; lower is better)")
    table.add_column("method")
    for _, label, _ in COLUMNS:
        table.add_column(label, justify="right")
    for name, r in rows.items():
        table.add_row(name, *[_fmt(r[c[0]], c[2]) for c in COLUMNS])
    Console(width=200).print(table)


# ----------------------------------------------------------------------------------------- main

def backbone(tmp: Path) -> tuple[BackboneRunner, dict[str, np.ndarray], str]:
    from coordinator.models.tsfm import TSFMConfig
    from coordinator.pretrain.training import pretrained_tsfm
    from export.onnx_export import export_model

    cfg = TSFMConfig(context=256, horizon=24, patch_len=16, stride=8, d_model=32, n_heads=4, n_layers=2, d_ff=64,
                     dropout=0.1, feature_dim=32)
    cache = Path(os.environ.get("FEDGE_CACHE", Path.home() / ".cache" / "fedge"))
    model = pretrained_tsfm(cache, cfg, steps=150, threads=2)
    exported = export_model(model, tmp)
    head = dict(np.load(exported.head_npz))
    desc = (f"tiny TSFM (context {cfg.context}, horizon {cfg.horizon}, d_model {cfg.d_model}, {cfg.n_layers} layers, "
            f"feature_dim {cfg.feature_dim}; 150 pretraining steps on the ETTh1 training split), ONNX Runtime")
    return BackboneRunner(exported.backbone, threads=2), head, desc


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--chunk-len", type=int, default=1200)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--held-out", default=DS.HELD_OUT_DEFAULT, choices=DS.DISTORTIONS)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", nargs="*", help="run only these methods (plus the baselines)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "results"))
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        runner, head, desc = backbone(Path(tmp))
        fed, ood = carve(runner, args.chunks, args.chunk_len, args.held_out)
    t_data = time.perf_counter() - t0
    base = P.PersonalConfig(rank=args.rank, epochs=args.epochs, lr=3e-3, batch_size=32, prox_mu=0.0, seed=args.seed)
    pre = P.init_params(head, args.rank, seed=args.seed)
    chosen = methods(base)
    if args.only:
        chosen = [m for m in chosen if m.name in {"pretrained", "local", "fedavg_ft", *args.only}]
    raw: dict[str, dict] = {}
    timing: dict[str, float] = {}
    for m in chosen:
        t1 = time.perf_counter()
        raw[m.name] = run_method(m, fed, ood, pre, args.seed)
        timing[m.name] = time.perf_counter() - t1
        print(f"{m.name:>14}: {timing[m.name]:.1f} s, mean MSE {np.mean(raw[m.name]['device_mse']):.4f}", flush=True)
    rows = summarise(raw, fed)
    naive = float(np.mean([np.mean([W.mse(W.seasonal_naive(c.test.ctx, c.test.y.shape[1], d.season), c.test.y)
                                    for c in d.chunks]) for d in fed]))
    meta = {
        "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} cores",
        "wall_s": time.perf_counter() - t0, "data_s": t_data, "method_s": timing,
        "n_devices": len(fed), "n_ood": len(ood),
        "datasets": sorted({d.name.split(":")[0] for d in fed}),
        "ood_datasets": sorted({d.name.split(":")[0] for d in ood}),
        "devices": [d.name for d in fed], "ood_devices": [d.name for d in ood], "chunks": args.chunks,
        "chunk_len": args.chunk_len, "backbone": desc, "held_out": args.held_out,
        "train_distortions": list(DS.training_distortions(args.held_out)), "naive_mse": naive,
        "personal": f"rank-{args.rank} adapter + head, Adam lr 3e-3, {args.epochs} epochs, batch 32",
        "config": asdict(base),
    }
    notes = {m.name: m.note for m in chosen} | {"fedavg (global)": "FedAvg global model, no personalisation"}
    found = findings(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "personalization.json").write_text(json.dumps({"meta": meta, "summary": rows, "per_device": raw},
                                                         indent=1, default=float) + "\n")
    (out / "personalization.md").write_text(markdown(rows, meta, notes, found))
    plot(rows, out / "personalization.png")
    print_table(rows)
    for f in found:
        print("-", f)
    return rows


if __name__ == "__main__":
    main()
