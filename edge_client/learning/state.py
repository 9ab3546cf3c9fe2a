"""A device's on-device learning state as one versioned blob: what a :class:`DeviceLearner` carries from round to
round, so that a restarted daemon continues exactly where it stopped.

Why: the learner keeps, between rounds, the personal model (adapter + head, next round's self-distillation
teacher), the FVG-PT gate's prior (the first global head it trained from), the served predictor (gate, learned
rule guards with their hit counters, fallback and track-record choices), last round's predictor that the track
record scores next, the track record itself and top-k's error-feedback residual. A restart that drops any of them
changes what the device forecasts and uploads: a lost residual silently drops the part of earlier deltas top-k
held back (compression is then biased), a lost prior re-anchors the gate on a later global head, a lost track record
sends a device that had earned its personal model back to the global head for two rounds.

Format (numpy only, no pickle): an ``.npz`` whose ``__header__`` entry is UTF-8 JSON (format name, version, the
backbone's sha256 and the head's dimensions, every scalar) and whose other entries are the arrays, each parameter set
stored once even when several parts share it (the served model's personal parameters are the personal model's).
:func:`decode_learner_state` refuses with :class:`StateRefused` (and nothing else) a blob that is not this format,
another version, another backbone or head, or has arrays of the wrong shape or non-finite values; the caller logs
the reason and starts fresh.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from edge_client.learning import personalize as PZ
from edge_client.learning import rules as RL
from edge_client.learning.head import HEAD_KEYS, Params, head_shapes
from edge_client.learning.repair import SensorRepair
from edge_client.learning.serving import ServedModel, TrackRecord

LEARNER_STATE_FORMAT = "fedge-learner-state"
STATE_VERSION = 1
HEADER = "__header__"
_SERVED_FLAGS = ("naive_prior", "fallback", "serve_naive", "serve_prior")
TRACK_CANDIDATES = frozenset({"global", "prior", "personal", "naive"})  # what a forecast combination may weigh
_SERVED_FLOATS = ("val_personal_mse", "val_global_mse", "val_naive_mse")


class StateRefused(ValueError):
    """A stored learning state that cannot be used (corrupt, another version, backbone or head); says why."""


@dataclass
class LearnerState:
    """The parts of a :class:`~edge_client.learning.learner.DeviceLearner` that outlive its windows (the one list
    of them: the daemon's rebuild between rounds and its restart both go through here)."""

    personal_model: PZ.PersonalModel | None = None
    prior: Params | None = None
    served: ServedModel | None = None
    last_served: ServedModel | None = None
    track: TrackRecord | None = None
    upload_residual: Params | None = None
    repair: SensorRepair | None = None  # the fault detector, learned once (raw units): the learner is *built* with it

    @classmethod
    def of(cls, learner: Any) -> LearnerState:
        return cls(learner.personal_model, learner.prior, learner.served, learner.last_served, learner.track,
                   learner.upload_residual, getattr(learner, "repair", None))

    def apply(self, learner: Any) -> None:
        """Everything but ``repair``, which a learner is constructed with (its windows are built from the repaired
        record): pass ``repair=state.repair`` to ``DeviceLearner``."""
        learner.personal_model, learner.prior, learner.served = self.personal_model, self.prior, self.served
        learner.last_served, learner.track, learner.upload_residual = self.last_served, self.track, \
            self.upload_residual

    @property
    def empty(self) -> bool:
        return all(v is None for v in (self.personal_model, self.prior, self.served, self.last_served, self.track,
                                       self.upload_residual, self.repair))


@dataclass(frozen=True)
class HeadSpec:
    """What the state must fit: the backbone it was trained on and the head's dimensions."""

    backbone_sha256: str
    feature_dim: int
    horizon: int
    n_quantiles: int


# ------------------------------------------------------------------------------------------------ encode

class _Writer:
    def __init__(self) -> None:
        self.arrays: dict[str, np.ndarray] = {}
        self._sets: dict[int, str] = {}

    def params(self, p: Mapping[str, np.ndarray] | None) -> str | None:
        """Store a parameter set once (by identity); returns its reference."""
        if p is None:
            return None
        ref = self._sets.get(id(p))
        if ref is None:
            ref = self._sets[id(p)] = f"p{len(self._sets)}"
            for k, v in p.items():
                self.arrays[f"{ref}.{k}"] = np.asarray(v)
        return ref

    def array(self, name: str, a: np.ndarray) -> str:
        self.arrays[name] = np.asarray(a)
        return name


def _gate(w: _Writer, g: PZ.Gate | None, prefix: str) -> dict[str, Any] | None:
    if g is None:
        return None
    return {"b": float(g.b), "c": float(g.c), "kappa": float(g.kappa), "w": w.array(f"{prefix}.gate_w", g.w),
            "mean": w.array(f"{prefix}.gate_mean", g.stat_mean), "std": w.array(f"{prefix}.gate_std", g.stat_std)}


def _rule(w: _Writer, r: RL.Rule, prefix: str) -> dict[str, Any]:
    if isinstance(r, RL.SignRule):
        return {"kind": "sign"}
    if isinstance(r, RL.RangeRule):
        return {"kind": "range", "lo": float(r.lo), "hi": float(r.hi)}
    if isinstance(r, RL.RateRule):
        return {"kind": "rate", "max_step": float(r.max_step)}
    if isinstance(r, RL.EnvelopeRule):
        return {"kind": "envelope", "lo": w.array(f"{prefix}.lo", r.lo), "hi": w.array(f"{prefix}.hi", r.hi)}
    raise TypeError(f"no stored form for rule {type(r).__name__}")


def _guard(w: _Writer, g: RL.RuleGuard | None, prefix: str) -> dict[str, Any] | None:
    if g is None:
        return None
    return {"rules": [_rule(w, r, f"{prefix}.rule{i}") for i, r in enumerate(g.rules)],
            "hits": {k: int(v) for k, v in g.hits.items()}, "checked_values": int(g.checked_values),
            "corrected_windows": int(g.corrected_windows)}


def _served(w: _Writer, s: ServedModel | None, prefix: str) -> dict[str, Any] | None:
    if s is None:
        return None
    return {"personal": w.params(s.personal), "glob": w.params(s.glob), "prior": w.params(s.prior),
            "gate": _gate(w, s.gate, prefix), "guard": _guard(w, s.guard, prefix),
            **{k: bool(getattr(s, k)) for k in _SERVED_FLAGS}, **{k: float(getattr(s, k)) for k in _SERVED_FLOATS},
            "combo": None if s.combo is None else {k: float(v) for k, v in s.combo.items()}}


def encode_learner_state(state: LearnerState, spec: HeadSpec) -> bytes:
    """The state as bytes (the ``.npz`` described above)."""
    w = _Writer()
    pm = state.personal_model
    header: dict[str, Any] = {
        "format": LEARNER_STATE_FORMAT, "version": STATE_VERSION, "backbone_sha256": spec.backbone_sha256,
        "feature_dim": spec.feature_dim, "horizon": spec.horizon, "n_quantiles": spec.n_quantiles,
        "personal_model": None if pm is None else {"params": w.params(pm.params), "trained_at_day": pm.trained_at_day},
        "prior": w.params(state.prior),
        "served": _served(w, state.served, "served"),
        # last round's predictor is usually the served one itself: stored once
        "last_served": "served" if state.last_served is not None and state.last_served is state.served
        else _served(w, state.last_served, "last_served"),
        "track": None if state.track is None else {
            "beta": state.track.beta, "margin": state.track.margin, "min_count": state.track.min_count,
            "scores": dict(state.track.scores), "counts": dict(state.track.counts),
            "combine": state.track.combine, "gram": [[a, b, v] for (a, b), v in state.track.gram.items()],
            "weights": dict(state.track.weights)},
        "upload_residual": w.params(state.upload_residual),
        "repair": None if state.repair is None else {
            "season": state.repair.season, "max_run": state.repair.max_run,
            "spike_limit": state.repair.spike_limit if math.isfinite(state.repair.spike_limit) else None},
    }
    buf = io.BytesIO()
    np.savez(buf, **{HEADER: np.frombuffer(json.dumps(header).encode(), np.uint8)}, **w.arrays)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------ decode

class _Reader:
    def __init__(self, arrays: Mapping[str, np.ndarray], spec: HeadSpec) -> None:
        self.arrays, self.spec = arrays, spec
        self._sets: dict[str, Params] = {}

    def array(self, name: Any, shape: tuple[int, ...] | None = None, ndim: int | None = None) -> np.ndarray:
        if not isinstance(name, str) or name not in self.arrays:
            raise StateRefused(f"missing array {name!r}")
        a = self.arrays[name]
        if (shape is not None and a.shape != shape) or (ndim is not None and a.ndim != ndim):
            raise StateRefused(f"array {name!r} has shape {a.shape}")
        if a.dtype.kind != "f" or not np.all(np.isfinite(a)):
            raise StateRefused(f"array {name!r} is not finite floats")
        return a

    def params(self, ref: Any, *, adapter: bool = False) -> Params | None:
        """A stored parameter set, checked against the head (and, for a personal model, a consistent adapter)."""
        if ref is None:
            return None
        if ref in self._sets:
            return self._sets[ref]
        if not isinstance(ref, str):
            raise StateRefused(f"bad parameter reference {ref!r}")
        s = self.spec
        expected: dict[str, tuple[int, ...] | None] = dict(head_shapes(s.feature_dim, s.horizon, s.n_quantiles))
        keys = {k[len(ref) + 1:] for k in self.arrays if k.startswith(ref + ".")}
        if adapter or PZ.ADAPTER_KEYS[0] in keys:
            expected.update(dict.fromkeys(PZ.ADAPTER_KEYS))
        if keys != set(expected):
            raise StateRefused(f"parameter set {ref} has keys {sorted(keys)}, expected {sorted(expected)}")
        out = {k: self.array(f"{ref}.{k}", shape) for k, shape in expected.items()}
        if PZ.ADAPTER_KEYS[0] in out:
            a, b = out["adapter_A"], out["adapter_B"]
            if a.ndim != 2 or a.shape[0] != s.feature_dim or b.shape != (a.shape[1], s.feature_dim):
                raise StateRefused(f"adapter of {ref} has shapes {a.shape}, {b.shape}")
        self._sets[ref] = out
        return out


def _f(x: Any, what: str) -> float:
    if isinstance(x, bool) or not isinstance(x, int | float) or not math.isfinite(x):
        raise StateRefused(f"{what} is not a number: {x!r}")
    return float(x)


def _read_gate(r: _Reader, g: Any) -> PZ.Gate | None:
    if g is None:
        return None
    n = (PZ.N_GATE_STATS,)
    return PZ.Gate(w=r.array(g["w"], n), b=_f(g["b"], "gate b"), c=_f(g["c"], "gate c"),
                   kappa=_f(g["kappa"], "gate kappa"), stat_mean=r.array(g["mean"], n), stat_std=r.array(g["std"], n))


def _read_rule(r: _Reader, d: Any) -> RL.Rule:
    kind = d["kind"]
    if kind == "sign":
        return RL.SignRule()
    if kind == "range":
        return RL.RangeRule(_f(d["lo"], "range lo"), _f(d["hi"], "range hi"))
    if kind == "rate":
        return RL.RateRule(_f(d["max_step"], "max step"))
    if kind == "envelope":
        lo = r.array(d["lo"], ndim=1)
        return RL.EnvelopeRule(lo, r.array(d["hi"], lo.shape))
    raise StateRefused(f"unknown rule kind {kind!r}")


def _read_guard(r: _Reader, g: Any) -> RL.RuleGuard | None:
    if g is None:
        return None
    hits = {str(k): int(v) for k, v in g["hits"].items()}
    return RL.RuleGuard([_read_rule(r, d) for d in g["rules"]], hits, int(g["checked_values"]),
                        int(g["corrected_windows"]))


def _read_served(r: _Reader, d: Any) -> ServedModel | None:
    if d is None:
        return None
    personal, glob, prior = r.params(d["personal"]), r.params(d["glob"]), r.params(d["prior"])
    if personal is None or glob is None or prior is None:
        raise StateRefused("a served model lacks its personal, global or prior parameters")
    flags = {k: d[k] for k in _SERVED_FLAGS}
    if not all(isinstance(v, bool) for v in flags.values()):
        raise StateRefused(f"served flags are not booleans: {flags}")
    vals = {k: float(d[k]) for k in _SERVED_FLOATS}  # NaN allowed: not validated
    combo = d.get("combo")
    if combo is not None:
        combo = {str(k): _f(v, "combination weight") for k, v in combo.items()}
        if not set(combo) <= TRACK_CANDIDATES:
            raise StateRefused(f"combination of unknown candidates {sorted(combo)}")
    return ServedModel(personal, glob, prior, gate=_read_gate(r, d["gate"]), guard=_read_guard(r, d["guard"]),
                       **flags, **vals, combo=combo)


def _read_track(t: Any) -> TrackRecord | None:
    if t is None:
        return None
    beta, margin = _f(t["beta"], "track beta"), _f(t["margin"], "track margin")
    if not (0 <= beta < 1 and 0 <= margin < 1):
        raise StateRefused(f"track record β {beta}, margin {margin} outside [0, 1)")
    scores = {str(k): _f(v, "track score") for k, v in t["scores"].items()}
    counts = {str(k): int(v) for k, v in t["counts"].items()}
    gram = {(str(a), str(b)): _f(v, "track cross-product") for a, b, v in t.get("gram", [])}
    weights = {str(k): _f(v, "combination weight") for k, v in t.get("weights", {}).items()}
    if not {n for pair in gram for n in pair} | set(weights) <= TRACK_CANDIDATES:
        raise StateRefused("track record combination of unknown candidates")
    return TrackRecord(beta, margin, scores, counts, int(t["min_count"]), bool(t.get("combine", False)), gram, weights)


def _read_repair(d: Any) -> SensorRepair | None:
    if d is None:
        return None
    limit = math.inf if d["spike_limit"] is None else _f(d["spike_limit"], "spike limit")
    season, max_run = int(d["season"]), int(d["max_run"])
    if season < 1 or max_run < 1 or limit <= 0:
        raise StateRefused(f"repair limits season {season}, run {max_run}, spike {limit}")
    return SensorRepair(season, max_run, limit)


def decode_learner_state(blob: bytes, spec: HeadSpec) -> LearnerState:
    """The state in `blob`, checked against the backbone and head it must fit; :class:`StateRefused` otherwise."""
    try:
        with np.load(io.BytesIO(blob), allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
        header = json.loads(arrays.pop(HEADER).tobytes().decode())
    except Exception as exc:  # whatever a damaged file raises, the answer is a refusal, not a crash
        raise StateRefused(f"not a readable learning state ({type(exc).__name__}: {exc})") from None
    if not isinstance(header, dict) or header.get("format") != LEARNER_STATE_FORMAT:
        raise StateRefused("not a fedge learning state")
    if header.get("version") != STATE_VERSION:
        raise StateRefused(f"learning state version {header.get('version')!r}, this device reads {STATE_VERSION}")
    if header.get("backbone_sha256") != spec.backbone_sha256:
        raise StateRefused("learning state trained on another backbone")
    dims = (header.get("feature_dim"), header.get("horizon"), header.get("n_quantiles"))
    if dims != (spec.feature_dim, spec.horizon, spec.n_quantiles):
        raise StateRefused(f"learning state for head {dims}, this device's is "
                           f"{(spec.feature_dim, spec.horizon, spec.n_quantiles)}")
    r = _Reader(arrays, spec)
    try:
        pm = header["personal_model"]
        model = None
        if pm is not None:
            day = pm["trained_at_day"]
            model = PZ.PersonalModel(r.params(pm["params"], adapter=True) or {}, PZ.PersonalConfig(),
                                     trained_at_day=None if day is None else _f(day, "trained_at_day"))
        served = _read_served(r, header["served"])
        last = served if header["last_served"] == "served" else _read_served(r, header["last_served"])
        residual = r.params(header["upload_residual"])
        if residual is not None and set(residual) != set(HEAD_KEYS):
            raise StateRefused(f"residual has keys {sorted(residual)}")
        return LearnerState(model, r.params(header["prior"]), served, last, _read_track(header["track"]), residual,
                            _read_repair(header.get("repair")))
    except StateRefused:
        raise
    except Exception as exc:  # a malformed header is refused, never a crash of the daemon
        raise StateRefused(f"malformed learning state ({type(exc).__name__}: {exc})") from None
