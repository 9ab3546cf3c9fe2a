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
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from coordinator.fleet.aggregation import ClientUpdate, apply, global_norm
from coordinator.fleet.privacy import dp_sum
from coordinator.fleet.strategies.fedavg import FedAvg
from coordinator.models.recommender import SASRec, encode_prefixes
from coordinator.recsys.data import ContinualSplit, UserLog, hit_ndcg, ranks
from coordinator.recsys.training import RecTrainSettings, train_sasrec, windows_for
from edge_client.recsys.adapter import RecAdapterConfig, full_scores, init_adapter, represent
from edge_client.recsys.client import K  # HR/NDCG cut-off: the same K as the devices
from edge_client.recsys.data import prefix_batch, prequential_totals
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
    """Held-out item of every user for one period, with the frozen encoder's h of its history and what
    the per-group breakdowns need: the history length before the target and whether the user was
    active before this period (returning) or not (new)."""

    users: list[str]
    h: np.ndarray  # (N, d)
    targets: np.ndarray  # (N,)
    exclude: list[np.ndarray]  # history before the target
    history_len: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # (N,)
    returning: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))  # (N,)

    def ranks(self, scores: np.ndarray) -> np.ndarray:
        return ranks(scores, self.targets, self.exclude)


def build_test_sets(split: ContinualSplit, encoder: SequenceEncoder) -> dict[int, TestSet]:
    sets = {}
    for s in range(1, split.n_periods + 1):
        users, pos = [], []
        for uid, log in split.logs.items():
            j = log.test_position(s)
            if j is not None:
                users.append(uid)
                pos.append(j)
        pairs = list(zip(users, pos, strict=True))
        x = np.concatenate([prefix_batch(split.logs[u].items, np.array([j]), encoder.max_len)
                            for u, j in pairs]) if users else np.zeros((0, encoder.max_len))
        sets[s] = TestSet([str(u) for u in users], encoder.encode(x),
                          np.array([split.logs[u].items[j] for u, j in pairs], np.int64),
                          [split.logs[u].items[:j] for u, j in pairs],
                          np.array([j for _, j in pairs], np.int64),
                          np.array([bool(np.any(split.logs[u].period < s)) for u, _ in pairs], bool))
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
    median_update_norm: float = 0.0  # L2 norm of the uploaded shared-adapter deltas (what a DP clip is set from)
    scores: dict[int, tuple[float, float]] = field(default_factory=dict)  # s -> (HR, NDCG)
    ranks: dict[int, np.ndarray] = field(default_factory=dict)  # s -> rank of each TestSet user's target
    preq: Prequential | None = None  # this period's interactions scored by the models of the previous period

    def score(self, s: int, r: np.ndarray) -> None:
        """Record period s's per-user ranks and their HR@10 / NDCG@10."""
        self.ranks[s] = np.asarray(r, np.int64)
        self.scores[s] = hit_ndcg(self.ranks[s], K)


@dataclass
class Prequential:
    """"Test, then train": every interaction of a period (after a user's first) ranked by the models as they
    were when the period began, before any training on it -- the whole period is the test set, so the
    continual comparison does not rest on one held-out item per user. The MQTT path knows only the totals
    each device reports (n, hits, NDCG sum); the simulation also keeps every case for the breakdowns."""

    n: int
    hits: float
    ndcg_sum: float
    users: np.ndarray | None = None  # str, per case
    positions: np.ndarray | None = None  # history length before the interaction
    ranks: np.ndarray | None = None
    returning: np.ndarray | None = None  # the user had interactions before this period

    @classmethod
    def of(cls, users: list[str], positions: list[np.ndarray], ranks_: list[np.ndarray],
           returning: list[bool]) -> Prequential:
        r = np.concatenate(ranks_) if ranks_ else np.zeros(0, np.int64)
        hits, ndcg = 0.0, 0.0
        for user_ranks in ranks_:  # user by user, as the coordinator adds up what devices report
            h, g = prequential_totals(user_ranks)
            hits, ndcg = hits + h, ndcg + g
        return cls(len(r), hits, ndcg, np.concatenate([np.full(len(p), u) for u, p in zip(users, positions,
                                                                                            strict=True)])
                   if users else np.zeros(0, str), np.concatenate(positions) if positions else np.zeros(0, np.int64),
                   r, np.concatenate([np.full(len(p), ret) for p, ret in zip(positions, returning, strict=True)])
                   if positions else np.zeros(0, bool))

    @property
    def hr(self) -> float:
        return self.hits / self.n if self.n else float("nan")

    @property
    def ndcg(self) -> float:
        return self.ndcg_sum / self.n if self.n else float("nan")


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
    # user-level DP-FedAvg on the shared adapter (coordinator.fleet.privacy): clip each user's delta to dp_clip, add
    # N(0, (dp_noise·dp_clip)²) to the period's sum, divide by the users who trained; None: plain FedAvg
    dp_clip: float | None = None
    dp_noise: float = 0.0
    # the Gaussian mechanism on each uploaded prototype (edge_client.learning.dp.privatize_prototype): clip to
    # proto_clip, add N(0, (proto_noise·proto_clip)²) per coordinate on the device; None: exact prototypes
    proto_clip: float | None = None
    proto_noise: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """The config as stored with results; without DP exactly as before DP existed (cached cells stay valid)."""
        out = asdict(self)
        if self.dp_clip is None:
            del out["dp_clip"], out["dp_noise"]
        if self.proto_clip is None:
            del out["proto_clip"], out["proto_noise"]
        return out

    @property
    def proto_dp(self) -> tuple[float, float] | None:
        """What RecDevice.proto_dp takes, and the MQTT path's task options (prototype_options)."""
        return None if self.proto_clip is None else (self.proto_clip, self.proto_noise)

    def prototype_options(self) -> dict[str, float]:
        """Task options that make the fleet's devices noise their prototypes as this config does (none if exact)."""
        return {} if self.proto_clip is None else {"proto_clip": self.proto_clip, "proto_noise": self.proto_noise}

    @classmethod
    def chosen(cls, results: str | os.PathLike[str], method: str, seed: int = 0) -> RecSimConfig:
        """The configuration benchmarks/recommender.py chose for `method` on its validation users (its
        recommender.json), or the defaults when that file or method is missing."""
        path = Path(results)
        if not path.is_file():
            return cls(seed=seed)
        meta = json.loads(path.read_text()).get("meta", {})
        hp = meta.get("chosen", {}).get(method, {})
        fields = {k: v for k, v in hp.items() if k in RecAdapterConfig.__dataclass_fields__}
        adapter = RecAdapterConfig(tau_days=float(meta.get("tau_days", 7.0)) * hp.get("tau_x", 1.0), **fields)
        return cls(adapter=adapter, top_m=hp.get("top_m", 10), proto_temperature=hp.get("proto_temperature", 0.1),
                   seed=seed)


StageCallback = Callable[[str, StageLog], None]


def _nbytes(arrays: dict[str, Any]) -> int:
    total = 0
    for v in arrays.values():
        total += _nbytes(v) if isinstance(v, dict) else (np.asarray(v).nbytes if not isinstance(v, int) else 8)
    return total


# ------------------------------------------------------------------------------ federated methods


def prequential(split: ContinualSplit, t: int, score: Callable[[str, UserLog, np.ndarray], np.ndarray]
                ) -> Prequential:
    """Rank every period-t interaction of every active user with `score(user, log, positions)` -> (n, n_items + 1)
    scores (the models as they were before period t)."""
    users, positions, ranks_, returning = [], [], [], []
    for uid, log in split.logs.items():
        pos = log.period_positions(t)
        if len(pos):
            users.append(str(uid))
            positions.append(pos)
            ranks_.append(ranks(score(str(uid), log, pos), log.items[pos], [log.items[:j] for j in pos]))
            returning.append(bool(np.any(log.period < t)))
    return Prequential.of(users, positions, ranks_, returning)


def initial_shared(name: str, items: np.ndarray, cfg: RecSimConfig) -> dict[str, np.ndarray]:
    """The federation's first shared adapter for method `name` (float32, what the wire carries)."""
    spec = METHODS[name]
    init = init_adapter(items.shape[1], cfg.adapter, np.random.default_rng(cfg.seed),
                        n_items=len(items) - 1 if spec.item_adapter else 0)
    return {k: init[k].astype(np.float32) for k in spec.shared}


def run_federated_rec(
    name: str,
    split: ContinualSplit,
    encoder: SequenceEncoder,
    items: np.ndarray,
    tests: dict[int, TestSet],
    cfg: RecSimConfig,
    on_stage: StageCallback | None = None,
) -> MethodResult:
    """One federated (or local-only) method through every period; returns A[t][s] per stage.

    Runs with one BLAS thread, as every device of the MQTT path does: a multi-threaded BLAS splits
    the sums of a matrix product differently, and the last bits of the adapters would then depend on
    the machine instead of only on the data and the seed."""
    with threadpool_limits(limits=1):
        return _run_federated_rec(name, split, encoder, items, tests, cfg, on_stage)


def _run_federated_rec(name: str, split: ContinualSplit, encoder: SequenceEncoder, items: np.ndarray,
                       tests: dict[int, TestSet], cfg: RecSimConfig, on_stage: StageCallback | None) -> MethodResult:
    spec = METHODS[name]
    global_shared = initial_shared(name, items, cfg)
    devices: dict[str, RecDevice] = {}
    for i, (uid, log) in enumerate(sorted(split.logs.items())):
        dev = RecDevice(str(uid), encoder, items, cfg.adapter, shared_keys=spec.shared, use_gate=spec.gate,
                        seed=cfg.seed * 100_003 + i, item_adapter=spec.item_adapter, proto_dp=cfg.proto_dp)
        dev.set_shared(global_shared)
        p0 = log.period == 0
        dev.receive(log.items[p0], log.ts[p0])  # the user's own past, already on the device
        devices[str(uid)] = dev
    server = PrototypeServer(cfg.top_m, cfg.proto_temperature)
    strategy = FedAvg()
    dp_rng = np.random.default_rng(cfg.seed * 7919 + 1)  # simulation: seeded DP noise, reproducible cells
    proto_rng = np.random.default_rng(cfg.seed * 7919 + 2)  # and seeded prototype noise, a stream of its own
    result = MethodResult(name)
    for t in range(1, split.n_periods + 1):
        start = time.perf_counter()
        stage = StageLog(t)
        active = [uid for uid, log in split.logs.items() if log.active(t)]
        for uid in active:
            log = split.logs[uid]
            sel = log.period == t
            devices[str(uid)].receive(log.items[sel], log.ts[sel])
        stage.preq = prequential(split, t, lambda u, log, pos: devices[u].scores(pos))
        if spec.prototypes:
            for uid in active:  # float32 both ways: exactly what the MQTT path carries
                p = devices[str(uid)].upload_prototype(proto_rng)
                server.submit(str(uid), p)
                stage.bytes_up += p.nbytes
            for uid, p_tilde in server.neighbours([str(u) for u in active]).items():
                devices[uid].set_p_tilde(p_tilde)
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
        if updates:
            stage.median_update_norm = float(np.median([global_norm(u.delta) for u in updates]))
        if spec.federated and updates:
            if cfg.dp_clip is not None:
                sums, _ = dp_sum([u.delta for u in updates], cfg.dp_clip, cfg.dp_noise * cfg.dp_clip, dp_rng)
                global_shared = apply(global_shared, {k: v / len(updates) for k, v in sums.items()})
            else:
                global_shared = strategy.aggregate(global_shared, updates)
            for dev in devices.values():
                dev.set_shared(global_shared)
            stage.bytes_down += _nbytes(global_shared) * len(updates)  # counted for the devices that trained
        for s in range(1, min(t + 1, split.n_periods) + 1):
            ts = tests[s]
            scores = np.zeros((len(ts.users), len(items)))
            for i, u in enumerate(ts.users):
                params = devices[u].params()
                scores[i] = full_scores(represent(params, ts.h[i : i + 1], devices[u].p_tilde), items, params)[0]
            stage.score(s, ts.ranks(scores))
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
        stage = StageLog(t)
        stage.preq = prequential(split, t, lambda u, log, pos: np.tile(counts, (len(pos), 1)))
        for log in split.logs.values():
            np.add.at(counts, log.items[log.train_positions(t)], 1.0)
        for s in range(1, min(t + 1, split.n_periods) + 1):
            ts = tests[s]
            stage.score(s, ts.ranks(np.tile(counts, (len(ts.users), 1))))
        stage.wall_s = time.perf_counter() - start
        result.stages.append(stage)
        if on_stage:
            on_stage(result.name, stage)
    return result


def run_central_frozen(split: ContinualSplit, encoder: SequenceEncoder, items: np.ndarray,
                       tests: dict[int, TestSet], on_stage: StageCallback | None = None) -> MethodResult:
    """The pretrained SASRec as is: identical for everyone, never updated (what the device runs
    before any adapter exists)."""
    result = MethodResult("central-sasrec")
    for t in range(1, split.n_periods + 1):
        stage = StageLog(t)
        stage.preq = prequential(split, t, lambda u, log, pos: full_scores(
            encoder.encode(prefix_batch(log.items, pos, encoder.max_len)), items))
        for s in range(1, min(t + 1, split.n_periods) + 1):
            stage.score(s, tests[s].ranks(full_scores(tests[s].h, items)))
        result.stages.append(stage)
        if on_stage:
            on_stage(result.name, stage)
    return result


def run_central_finetune(split: ContinualSplit, model: SASRec, tests: dict[int, TestSet], cfg: RecSimConfig,
                         on_stage: StageCallback | None = None) -> MethodResult:
    """Fine-tune the whole SASRec on all users' raw period-t data, period after period. Not private
    (the raw sequences are pooled); the reference for accuracy and for plain fine-tuning's forgetting."""
    model = copy.deepcopy(model)
    result = MethodResult("central-finetune")
    for t in range(1, split.n_periods + 1):
        start = time.perf_counter()
        table = model.item_table()
        preq = prequential(split, t, lambda u, log, pos, table=table: full_scores(
            encode_prefixes(model, log.items, pos), table))
        x, y = windows_for(split, t, model.config.max_len)
        if len(x):
            train_sasrec(model, x, y, replace(cfg.finetune, seed=cfg.seed * 1000 + t))
        items = model.item_table()
        stage = StageLog(t, trained_users=len(split.users(t)), preq=preq)
        for s in range(1, min(t + 1, split.n_periods) + 1):
            ts = tests[s]
            h = np.concatenate([encode_prefixes(model, hist, np.array([len(hist)])) for hist in ts.exclude])
            stage.score(s, ts.ranks(full_scores(h, items)))
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
            out[name] = run_central_frozen(split, encoder, items, tests, on_stage)
        elif name == "central-finetune":
            out[name] = run_central_finetune(split, model, tests, cfg, on_stage)
        elif name in METHODS:
            out[name] = run_federated_rec(name, split, encoder, items, tests, cfg, on_stage)
        else:
            raise ValueError(f"unknown method {name!r}; known: {', '.join((*BASELINES, *METHODS))}")
    return out
