"""The feature bank of an emulated fleet: backbone features of every window of the real series, computed once.

Why: a real device runs the frozen backbone over its own history once (``DeviceLearner``) and then trains only
the head. Ten thousand emulated devices on one machine cannot each hold an ONNX Runtime session and run their
own feature pass, but they need not: the features of a window do not depend on which device holds it. So one
backbone runner computes features for every window of the real series (ETTh1 after its pretraining split,
electricity, Beijing PM2.5, I-94 traffic, exchange rates), the bank is stored as ``.npy`` files that every
device process memory-maps, and device ``i`` gets a contiguous slice of windows of one series as its history:
``n_train`` training windows, then (after a gap of one horizon, so no training target reaches into them)
``n_eval`` held-back windows. With more devices than distinct slices, slices overlap; :meth:`FeatureBank.plan`
says how much (the load test reports it).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from edge_client.data.datasets import DatasetNotFound, load_series, longest_finite_run
from edge_client.learning import windows as W
from edge_client.learning.head import Features
from edge_client.runtime.backbone import BackboneRunner, sha256_file

log = logging.getLogger("fedge.loadtest")

# (dataset, columns or None for all, first row): ETTh1 only after the 12-month split the backbone pretrained on
BANK_SOURCES: tuple[tuple[str, tuple[str, ...] | None, int], ...] = (
    ("etth1", None, W.ETT_TRAIN_END),
    ("electricity", None, 0),
    ("pollution", ("pm2.5", "DEWP", "TEMP"), 0),
    ("traffic", ("traffic_volume",), 0),
    ("exchange_rate", None, 0),
)
MAX_WINDOWS_PER_SERIES = 6000  # bounds the one-off feature pass (~20 series x 6,000 windows)


@dataclass(frozen=True)
class BankSeries:
    name: str  # dataset/column
    domain: str
    season: int
    lo: int  # its windows are rows [lo, hi) of the bank arrays, in time order, stride 1
    hi: int


@dataclass(frozen=True)
class DeviceSlice:
    series: int  # index into FeatureBank.series
    train: tuple[int, int]  # [lo, hi) rows of the bank
    eval: tuple[int, int, int]  # lo, hi, step


@dataclass
class FeatureBank:
    """Arrays (memory-mapped when loaded) + the series they come from."""

    feats: np.ndarray  # (W, D) float32
    loc: np.ndarray  # (W, 1)
    scale: np.ndarray  # (W, 1)
    y: np.ndarray  # (W, H) targets, scaled per series
    naive: np.ndarray  # (W, H) seasonal-naive forecasts of the same windows
    series: list[BankSeries]
    meta: dict

    @classmethod
    def load(cls, folder: str | Path) -> FeatureBank:
        folder = Path(folder)
        meta = json.loads((folder / "bank.json").read_text())
        arrays = {k: np.asarray(np.load(folder / f"{k}.npy", mmap_mode="r"))  # plain views of the shared pages
                  for k in ("feats", "loc", "scale", "y", "naive")}
        return cls(**arrays, series=[BankSeries(**s) for s in meta["series"]], meta=meta)

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        for k in ("feats", "loc", "scale", "y", "naive"):
            np.save(folder / f"{k}.npy", np.ascontiguousarray(getattr(self, k)))
        (folder / "bank.json").write_text(json.dumps({**self.meta, "series": [asdict(s) for s in self.series]}))

    def plan(self, n_devices: int, n_train: int, n_eval: int, eval_step: int = 4) -> tuple[list[DeviceSlice], float]:
        """Slices for `n_devices`, spread evenly over every series' possible start positions, and the overlap
        factor (windows handed out / distinct windows in the bank; ≤ 1 means disjoint slices)."""
        horizon = self.y.shape[1]
        span = n_train + horizon + n_eval * eval_step
        starts = [(i, s.lo + k) for i, s in enumerate(self.series) for k in range(max(0, s.hi - s.lo - span + 1))]
        if not starts:
            raise ValueError(f"no series in the bank has {span} windows for one device")
        out = []
        for d in range(n_devices):
            i, lo = starts[(d * len(starts)) // n_devices]
            ev = lo + n_train + horizon
            out.append(DeviceSlice(i, (lo, lo + n_train), (ev, ev + n_eval * eval_step, eval_step)))
        return out, n_devices * (n_train + n_eval) / len(self.feats)

    def device_data(self, sl: DeviceSlice) -> dict:
        """Keyword arguments for :meth:`DeviceLearner.from_features` (views into the bank, no copies)."""
        (a, b), (c, d, step) = sl.train, sl.eval
        return {"f_train": Features(self.feats[a:b], self.loc[a:b], self.scale[a:b]), "y_train": self.y[a:b],
                "f_eval": Features(self.feats[c:d:step], self.loc[c:d:step], self.scale[c:d:step]),
                "y_eval": self.y[c:d:step], "naive_eval": self.naive[c:d:step],
                "season": self.series[sl.series].season}


def build_bank(backbone: str | Path, horizon: int, cache_dir: str | Path, data_dir: str | None = None,
               threads: int = 2, max_windows: int = MAX_WINDOWS_PER_SERIES) -> Path:
    """Compute (or find in `cache_dir`) the bank for this backbone file and horizon; returns its folder."""
    key = hashlib.sha256(f"{sha256_file(backbone)}:{horizon}:{BANK_SOURCES}:{max_windows}".encode())
    folder = Path(cache_dir) / f"bank-{key.hexdigest()[:16]}"
    if (folder / "bank.json").is_file():
        return folder
    runner = BackboneRunner(backbone, threads=threads)
    context = runner.spec.context
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("feats", "loc", "scale", "y", "naive")}
    series: list[BankSeries] = []
    rows = 0
    for name, columns, first in BANK_SOURCES:
        try:
            data = load_series(name, data_dir)
        except DatasetNotFound:
            log.warning("feature bank: %s not found, left out", name)
            continue
        for col in columns or data.columns:
            values = data.column(col)[first:]
            start, stop = longest_finite_run(values)
            values = values[start:stop][-(max_windows + context + horizon - 1):]
            scaled = W.Scaler.fit(values[:, None]).transform(values[:, None])[:, 0]
            x, y = W.make_windows(scaled, context, horizon)
            if len(x) < min(256, max_windows):
                continue
            f = runner.features(x, batch_size=256)
            for k, v in (("feats", f.feats), ("loc", f.loc), ("scale", f.scale), ("y", y),
                         ("naive", W.seasonal_naive(x, horizon, data.season_length))):
                parts[k].append(np.asarray(v, np.float32))
            series.append(BankSeries(f"{name}/{col}", data.domain, data.season_length, rows, rows + len(x)))
            rows += len(x)
            log.info("feature bank: %s/%s, %d windows", name, col, len(x))
    if not series:
        raise ValueError("no dataset for the feature bank was found")
    bank = FeatureBank(**{k: np.concatenate(v) for k, v in parts.items()}, series=series,
                       meta={"backbone_sha256": runner.sha256, "horizon": horizon, "context": context,
                             "model_id": runner.spec.model_id})
    tmp = folder.with_name(folder.name + ".tmp")
    bank.save(tmp)
    tmp.rename(folder)
    return folder
