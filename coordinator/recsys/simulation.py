"""Federated continual recommendation, simulated in one process: every user is a :class:`RecDevice`
(numpy + ONNX Runtime, the same code a phone or Pi runs), the coordinator aggregates adapters
(:class:`coordinator.fleet.strategies.fedavg.FedAvg`) and mixes prototypes (:class:`PrototypeServer`).

Protocol (``edge_client.recsys.data`` has the split): period 0 pretrains SASRec centrally; for
each later period t = 1..P every user active in t receives their new interactions on the device,
(FCUCR) uploads a prototype and gets the neighbours' p̃ back, trains the adapter on their period-t
targets, uploads the shared-part delta; the coordinator averages and broadcasts. Then every method
is evaluated on the held-out item of every user for every period s ≤ t+1:

* ``A[t][s]`` = HR@10 / NDCG@10 after stage t on period s's test items (full ranking over all
  items, the user's earlier items excluded);
* **next** = mean_t A[t][t+1] -- predicting the next period (the primary continual metric);
* **final avg** = mean_s A[P][s] -- how good the final models are on every period seen;
* **forgetting** = mean_{s<P} (A[s][s] − A[P][s]) -- the drop on a period's items after later
  updates (negative = later updates helped the earlier period).

Methods (same users, same frozen encoder, same seeds): most-popular; central SASRec (the frozen
pretrained model, no personalisation); central fine-tune (the whole SASRec fine-tuned on all users'
raw period-t data each period: a non-private reference and the "plain fine-tuning" forgetting
comparator); local-only adapters; FedAvg of the adapters; FCUCR and its two ablations.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from coordinator.fleet.aggregation import ClientUpdate
from coordinator.fleet.strategies.fedavg import FedAvg
from coordinator.models.recommender import SASRec, encode_prefixes
from coordinator.recsys.data import ContinualSplit, hit_ndcg, ranks
from coordinator.recsys.training import RecTrainSettings, train_sasrec, windows_for
from edge_client.recsys.adapter import RecAdapterConfig, full_scores, init_adapter, represent
from edge_client.recsys.client import K  # HR/NDCG cut-off: the same K as the devices
from edge_client.recsys.data import prefix_batch
from edge_client.recsys.device import METHODS, RecDevice
from edge_client.recsys.encoder import SequenceEncoder

BASELINES = ("most-popular", "central-sasrec", "central-finetune")


# ------------------------------------------------------------------------------ prototypes


@dataclass
class PrototypeServer:
    """Keeps each user's latest prototype (d floats; no ids of items) and returns, per user, the
    softmax(cos/T)-weighted mean of the top-M most similar *other* users' prototypes."""

    top_m: int = 10
    temperature: float = 0.1
    protos: dict[str, np.ndarray] = field(default_factory=dict)

    def submit(self, user: str, prototype: np.ndarray) -> None:
        self.protos[user] = np.asarray(prototype, np.float64)

    def neighbours(self, users: list[str]) -> dict[str, np.ndarray]:
        ids = list(self.protos)
        if len(ids) < 2:
            return {}
        mat = np.stack([self.protos[u] for u in ids])
        unit = mat / np.maximum(np.linalg.norm(mat, axis=1, keepdims=True), 1e-12)
        index = {u: i for i, u in enumerate(ids)}
        out = {}
        for user in users:
            if user not in index:
                continue
            cos = unit @ unit[index[user]]
            cos[index[user]] = -np.inf  # never one's own prototype
            m = min(self.top_m, len(ids) - 1)
            top = np.argpartition(-cos, m - 1)[:m]
            w = np.exp((cos[top] - cos[top].max()) / self.temperature)
            out[user] = (w / w.sum()) @ mat[top]
        return out


# ------------------------------------------------------------------------------ evaluation


@dataclass
class TestSet:
    """Held-out item of every user for one period, with the frozen encoder's h of its history."""

    users: list[str]
    h: np.ndarray  # (N, d)
    targets: np.ndarray  # (N,)
    exclude: list[np.ndarray]  # history before the target

    def metrics(self, z: np.ndarray, items: np.ndarray) -> tuple[float, float]:
        return hit_ndcg(ranks(full_scores(z, items), self.targets, self.exclude), K)


def build_test_sets(split: ContinualSplit, encoder: SequenceEncoder) -> dict[int, TestSet]:
    sets = {}
    for s in range(1, split.n_periods + 1):
        users, pos = [], []
        for uid, log in split.logs.items():
            j = log.test_position(s)
            if j is not None:
                users.append(uid)
                pos.append(j)
        x = np.concatenate([prefix_batch(split.logs[u].items, np.array([j]), encoder.max_len)
                            for u, j in zip(users, pos, strict=True)]) if users else np.zeros((0, encoder.max_len))
        sets[s] = TestSet([str(u) for u in users], encoder.encode(x),
                          np.array([split.logs[u].items[j] for u, j in zip(users, pos, strict=True)], np.int64),
                          [split.logs[u].items[:j] for u, j in zip(users, pos, strict=True)])
    return sets


@dataclass
class StageLog:
    """What one period did for one method (the demo's live table and the JSON's per-stage rows)."""

    period: int
    trained_users: int = 0
    skipped_users: int = 0  # active in the period but no training target (only the test item)
    bytes_up: int = 0
    bytes_down: int = 0
    wall_s: float = 0.0
    mean_distill_weight: float = 0.0
    scores: dict[int, tuple[float, float]] = field(default_factory=dict)  # s -> (HR, NDCG)


@dataclass
class MethodResult:
    name: str
    stages: list[StageLog] = field(default_factory=list)
    final_global: dict[str, np.ndarray] = field(default_factory=dict)  # the shared adapter after the last period

    def matrix(self, metric: int) -> dict[int, dict[int, float]]:
        return {st.period: {s: v[metric] for s, v in st.scores.items()} for st in self.stages}

    def summary(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for metric, name in ((0, "hr"), (1, "ndcg")):
            a = self.matrix(metric)
            last = max(a)
            out[f"next_{name}"] = float(np.nanmean([a[t][t + 1] for t in a if t + 1 in a[t]]))
            out[f"final_{name}"] = float(np.nanmean(list(a[last].values())))
            out[f"forget_{name}"] = float(np.nanmean([a[s][s] - a[last][s] for s in a if s < last]))
        ups = [st.bytes_up / max(st.trained_users, 1) for st in self.stages]
        downs = [st.bytes_down / max(st.trained_users, 1) for st in self.stages]
        out["bytes_up_per_device"] = float(np.mean(ups))
        out["bytes_down_per_device"] = float(np.mean(downs))
        out["wall_s"] = float(sum(st.wall_s for st in self.stages))
        return out


# ------------------------------------------------------------------------------ config


@dataclass(frozen=True)
class RecSimConfig:
    adapter: RecAdapterConfig = field(default_factory=RecAdapterConfig)
    top_m: int = 10
    proto_temperature: float = 0.1
    finetune: RecTrainSettings = field(default_factory=lambda: RecTrainSettings(epochs=3))
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


StageCallback = Callable[[str, StageLog], None]


def _nbytes(arrays: dict[str, Any]) -> int:
    total = 0
    for v in arrays.values():
        total += _nbytes(v) if isinstance(v, dict) else (np.asarray(v).nbytes if not isinstance(v, int) else 8)
    return total


# ------------------------------------------------------------------------------ federated methods


def run_federated_rec(
    name: str,
    split: ContinualSplit,
    encoder: SequenceEncoder,
    items: np.ndarray,
    tests: dict[int, TestSet],
    cfg: RecSimConfig,
    on_stage: StageCallback | None = None,
) -> MethodResult:
    """One federated (or local-only) method through every period; returns A[t][s] per stage."""
    spec = METHODS[name]
    d = items.shape[1]
    init = init_adapter(d, cfg.adapter, np.random.default_rng(cfg.seed))
    global_shared = {k: init[k].astype(np.float32) for k in spec.shared}
    devices: dict[str, RecDevice] = {}
    for i, (uid, log) in enumerate(sorted(split.logs.items())):
        dev = RecDevice(str(uid), encoder, items, cfg.adapter, shared_keys=spec.shared, use_gate=spec.gate,
                        seed=cfg.seed * 100_003 + i)
        dev.set_shared(global_shared)
        p0 = log.period == 0
        dev.receive(log.items[p0], log.ts[p0])  # the user's own past, already on the device
        devices[str(uid)] = dev
    server = PrototypeServer(cfg.top_m, cfg.proto_temperature)
    strategy = FedAvg()
    result = MethodResult(name)
    for t in range(1, split.n_periods + 1):
        start = time.perf_counter()
        stage = StageLog(t)
        active = [uid for uid, log in split.logs.items() if log.active(t)]
        for uid in active:
            log = split.logs[uid]
            sel = log.period == t
            devices[str(uid)].receive(log.items[sel], log.ts[sel])
        if spec.prototypes:
            for uid in active:  # float32 both ways: exactly what the MQTT path carries
                p = devices[str(uid)].prototype().astype(np.float32)
                server.submit(str(uid), p)
                stage.bytes_up += p.nbytes
            for uid, p_tilde in server.neighbours([str(u) for u in active]).items():
                devices[uid].p_tilde = p_tilde.astype(np.float32)
                stage.bytes_down += devices[uid].p_tilde.nbytes
        updates, weights = [], []
        for uid in active:
            dev, log = devices[str(uid)], split.logs[uid]
            pos = log.train_positions(t)
            if len(pos) == 0:
                stage.skipped_users += 1
                continue
            stats = dev.train(pos, distill=spec.distill)
            weights.append(stats.distill_weight)
            stage.trained_users += 1
            if spec.federated:
                msg = dev.upload(with_prototype=False)
                stage.bytes_up += _nbytes(msg)
                updates.append(ClientUpdate(str(uid), msg["n_samples"], msg["delta"]))
        stage.mean_distill_weight = float(np.mean(weights)) if weights else 0.0
        if spec.federated and updates:
            global_shared = strategy.aggregate(global_shared, updates)
            for dev in devices.values():
                dev.set_shared(global_shared)
            stage.bytes_down += _nbytes(global_shared) * len(updates)  # counted for the devices that trained
        for s in range(1, min(t + 1, split.n_periods) + 1):
            ts = tests[s]
            z = np.stack([represent(devices[u].params(), ts.h[i : i + 1], devices[u].p_tilde)[0]
                          for i, u in enumerate(ts.users)]) if ts.users else np.zeros((0, d))
            stage.scores[s] = ts.metrics(z, items)
        stage.wall_s = time.perf_counter() - start
        result.stages.append(stage)
        if on_stage:
            on_stage(name, stage)
    result.final_global = global_shared
    return result


# ------------------------------------------------------------------------------ baselines


def run_most_popular(split: ContinualSplit, tests: dict[int, TestSet], on_stage: StageCallback | None = None
                     ) -> MethodResult:
    """Item counts over all training targets seen up to period t (period 0: every interaction)."""
    counts = np.zeros(split.n_items + 1)
    for log in split.logs.values():
        np.add.at(counts, log.items[log.period == 0], 1.0)
    result = MethodResult("most-popular")
    for t in range(1, split.n_periods + 1):
        start = time.perf_counter()
        for log in split.logs.values():
            np.add.at(counts, log.items[log.train_positions(t)], 1.0)
        stage = StageLog(t)
        for s in range(1, min(t + 1, split.n_periods) + 1):
            ts = tests[s]
            scores = np.tile(counts, (len(ts.users), 1))
            stage.scores[s] = hit_ndcg(ranks(scores, ts.targets, ts.exclude), K)
        stage.wall_s = time.perf_counter() - start
        result.stages.append(stage)
        if on_stage:
            on_stage(result.name, stage)
    return result


def run_central_frozen(split: ContinualSplit, items: np.ndarray, tests: dict[int, TestSet],
                       on_stage: StageCallback | None = None) -> MethodResult:
    """The pretrained SASRec as is: identical for everyone, never updated (what the device runs
    before any adapter exists)."""
    result = MethodResult("central-sasrec")
    for t in range(1, split.n_periods + 1):
        stage = StageLog(t)
        for s in range(1, min(t + 1, split.n_periods) + 1):
            stage.scores[s] = tests[s].metrics(tests[s].h, items)
        result.stages.append(stage)
        if on_stage:
            on_stage(result.name, stage)
    return result


def run_central_finetune(split: ContinualSplit, model: SASRec, cfg: RecSimConfig,
                         on_stage: StageCallback | None = None) -> MethodResult:
    """Fine-tune the whole SASRec on all users' raw period-t data, period after period. Not private
    (the raw sequences are pooled); the reference for accuracy and for plain fine-tuning's forgetting."""
    model = copy.deepcopy(model)
    result = MethodResult("central-finetune")
    test_pos = {s: [(log, log.test_position(s)) for log in split.logs.values() if log.test_position(s) is not None]
                for s in range(1, split.n_periods + 1)}
    for t in range(1, split.n_periods + 1):
        start = time.perf_counter()
        x, y = windows_for(split, t, model.config.max_len)
        if len(x):
            train_sasrec(model, x, y, replace(cfg.finetune, seed=cfg.seed * 1000 + t))
        items = model.item_table()
        stage = StageLog(t, trained_users=len(split.users(t)))
        for s in range(1, min(t + 1, split.n_periods) + 1):
            pairs = test_pos[s]
            h = np.concatenate([encode_prefixes(model, log.items, np.array([j])) for log, j in pairs])
            targets = np.array([log.items[j] for log, j in pairs])
            stage.scores[s] = hit_ndcg(ranks(full_scores(h, items), targets, [log.items[:j] for log, j in pairs]), K)
        stage.wall_s = time.perf_counter() - start
        result.stages.append(stage)
        if on_stage:
            on_stage(result.name, stage)
    return result


def run_all(
    split: ContinualSplit,
    model: SASRec,
    encoder: SequenceEncoder,
    items: np.ndarray,
    cfg: RecSimConfig,
    methods: tuple[str, ...] = (*BASELINES, *METHODS),
    on_stage: StageCallback | None = None,
) -> dict[str, MethodResult]:
    tests = build_test_sets(split, encoder)
    out: dict[str, MethodResult] = {}
    for name in methods:
        if name == "most-popular":
            out[name] = run_most_popular(split, tests, on_stage)
        elif name == "central-sasrec":
            out[name] = run_central_frozen(split, items, tests, on_stage)
        elif name == "central-finetune":
            out[name] = run_central_finetune(split, model, cfg, on_stage)
        elif name in METHODS:
            out[name] = run_federated_rec(name, split, encoder, items, tests, cfg, on_stage)
        else:
            raise ValueError(f"unknown method {name!r}; known: {', '.join((*BASELINES, *METHODS))}")
    return out
