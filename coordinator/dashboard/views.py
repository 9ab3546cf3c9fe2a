"""What the dashboard shows, as plain dicts: built from the fleet state's read-only queries (so any state
backend that answers them can be shown) and, when the dashboard runs inside ``fedge serve``, from the live
coordinator's counters (rejects by reason and traffic live only in that process).

Why a cache: a finished round's update count, bytes and errors never change, but computing them reads
every update of that round; at 1,000 devices and 50 rounds shown that is 50,000 rows per refresh. They
are kept while the round's state is unchanged, so a refresh reads only the open round; each device's
newest metrics are read again only when an update was stored or deleted (benchmarks/observe_cost.py).
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from coordinator.fleet.metrics import FLEET_MSE, fleet_means
from coordinator.fleet.state import FleetState, RoundRow

if TYPE_CHECKING:
    from coordinator.fleet.server import FleetCoordinator

ONLINE = frozenset({"online", "idle", "training"})


def gain_pct(metrics: dict[str, float]) -> float | None:
    """How much lower the personal model's error is than the global head's, in percent of the latter
    (positive: the device gained from personalisation)."""
    g, p = metrics.get("global_mse"), metrics.get("personal_mse")
    if g is None or p is None or not (math.isfinite(g) and math.isfinite(p)) or g <= 0:
        return None
    return 100.0 * (g - p) / g


@dataclass
class FleetView:
    state: FleetState
    task: str = "tsfm"
    fleet: str = ""
    live: FleetCoordinator | None = None
    rounds_shown: int = 50
    devices_shown: int = 100  # a larger fleet shows the devices that need attention first, and a filter
    # round -> (state, updates, bytes, means) of finished rounds, kept while the round's state is unchanged
    _finished: dict[int, tuple[str, int, int, dict[str, float]]] = field(default_factory=dict)
    _latest: tuple[tuple[int, int | None], dict[str, dict[str, float]]] | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # ------------------------------------------------------------------ pieces

    def _round_numbers(self, rows: list[RoundRow]) -> dict[int, tuple[int, int, dict[str, float]]]:
        """round -> (updates, bytes, fleet means): the open round's read again, finished ones from the cache."""
        with self._lock:
            cached = {r.round_id: self._finished[r.round_id] for r in rows
                      if r.round_id in self._finished and self._finished[r.round_id][0] == r.state}
        todo = [r for r in rows if r.round_id not in cached]
        totals = self.state.round_totals([r.round_id for r in todo])
        out = {rid: (n, b, means) for rid, (_, n, b, means) in cached.items()}
        for r in todo:
            n, b = totals.get(r.round_id, (0, 0))
            out[r.round_id] = (n, b, fleet_means(self.state.round_metrics(r.round_id)) if n else {})
            if r.state != "open":
                with self._lock:
                    self._finished[r.round_id] = (r.state, *out[r.round_id])
        return out

    def rounds(self, now: float) -> list[dict]:
        """Oldest first (charts read left to right)."""
        rows = list(reversed(self.state.round_rows(self.rounds_shown)))
        numbers = self._round_numbers(rows)
        out = []
        for row in rows:
            n, nbytes, means = numbers[row.round_id]
            end = row.closed if row.closed is not None else now
            out.append({"round_id": row.round_id, "kind": row.kind, "state": row.state,
                        "base_version": row.base_version, "new_version": row.new_version,
                        "selected": row.n_selected, "reported": n, "quorum": row.quorum,
                        "participation": n / row.n_selected if row.n_selected else 0.0,
                        "seconds": max(0.0, end - row.opened), "opened": row.opened,
                        "deadline_in": max(0.0, row.deadline - now) if row.state == "open" else None,
                        # retention (FleetState.prune) drops old payloads: their size is no longer known
                        "kb_up": nbytes / 1024 if nbytes or not n else None,
                        **{f"{m}_mse": v for m, v in means.items()}})
        return out

    def _latest_metrics(self) -> dict[str, dict[str, float]]:
        """Each device's newest metrics, read again only when an update was stored or deleted."""
        stamp = self.state.update_stamp()
        with self._lock:
            if self._latest is not None and self._latest[0] == stamp:
                return self._latest[1]
        latest = self.state.latest_device_metrics()
        with self._lock:
            self._latest = (stamp, latest)
        return latest

    def devices(self, now: float) -> list[dict]:
        latest = self._latest_metrics()
        out = []
        for device_id, info in self.state.devices().items():
            m = latest.get(device_id, {})
            out.append({"device_id": device_id, **info, "online": info["state"] in ONLINE,
                        "seen_ago": max(0.0, now - info["last_seen"]), "backbone": (info["backbone_sha256"] or "")[:12],
                        **{k: m[k] for k in FLEET_MSE.values() if k in m}, "gain_pct": gain_pct(m)})
        return out

    def rejects(self) -> dict[str, int] | None:
        """Refusals by reason since this coordinator started; None when not running inside it."""
        return None if self.live is None else dict(sorted(self.live.receiver.rejected.items()))

    def rollout(self, n_devices: int) -> dict:
        counts = self.state.bundle_versions()
        versions = sorted(v for v in counts if v is not None)
        newest = versions[-1] if versions else None
        on_newest = counts.get(newest, 0) if newest is not None else 0
        return {"newest": newest, "on_newest": on_newest, "fraction": on_newest / n_devices if n_devices else 0.0,
                "versions": [{"version": "none" if v is None else v, "devices": n}
                             for v, n in sorted(counts.items(), key=lambda kv: (kv[0] is None, kv[0] or 0))]}

    # ------------------------------------------------------------------ pages

    def shown_devices(self, devices: list[dict], query: str = "") -> list[dict]:
        """The table's rows: all of a small fleet, by id; of a large one (or a filtered one) at most
        `devices_shown`, offline ones first, then those personalisation helped least."""
        if query:
            devices = [d for d in devices if query.lower() in d["device_id"].lower()]
        if len(devices) <= self.devices_shown:
            return devices
        def attention(d: dict) -> tuple:
            return (d["online"], d["gain_pct"] if d["gain_pct"] is not None else math.inf, d["device_id"])
        return sorted(sorted(devices, key=attention)[: self.devices_shown], key=lambda d: d["device_id"])

    def overview(self, query: str = "") -> dict:
        now = time.time()
        every = self.devices(now)
        devices = self.shown_devices(every, query)
        rounds = self.rounds(now)
        model = self.state.latest_model_meta(self.task)
        counts = self.state.round_counts()
        open_rounds = [r for r in rounds if r["state"] == "open"]
        traffic = None
        if self.live is not None:
            traffic = {"kb_in": sum(self.live.traffic.up.values()) / 1024,
                       "kb_out": sum(self.live.traffic.down.values()) / 1024}
        return {
            "fleet": self.fleet, "task": self.task, "now": now, "live": self.live is not None,
            "model_version": model[0] if model else None,
            "dp_epsilon": model[1].get("dp_epsilon") if model else None,
            "n_devices": len(every), "n_online": sum(d["online"] for d in every), "query": query,
            "limit": self.devices_shown,
            "devices": devices, "rounds": rounds, "recent_rounds": list(reversed(rounds[-15:])),
            "open_round": open_rounds[-1] if open_rounds else None,
            **{f"n_{s}": sum(n for (_, st), n in counts.items() if st == s) for s in ("closed", "failed")},
            "rejects": self.rejects(), "traffic": traffic, "rollout": self.rollout(len(every)),
            "charts": self.charts(rounds, devices),
        }

    @staticmethod
    def charts(rounds: list[dict], devices: list[dict]) -> dict:
        """Columns for the page's charts (uPlot takes one x array and one array per series; null = gap)."""
        def col(rows: list[dict], key: str) -> list[float | None]:
            return [r.get(key) for r in rows]

        train = [r for r in rounds if r["kind"] == "train"] or rounds
        return {
            "error": {"x": col(train, "round_id"), "global": col(train, "global_mse"),
                      "personal": col(train, "personal_mse"), "naive": col(train, "naive_mse")},
            "participation": {"x": col(rounds, "round_id"), "reported": col(rounds, "reported"),
                              "selected": col(rounds, "selected")},
            "duration": {"x": col(rounds, "round_id"), "seconds": col(rounds, "seconds")},
            "devices": {"names": [d["device_id"] for d in devices], "global": col(devices, "global_mse"),
                        "personal": col(devices, "personal_mse"), "naive": col(devices, "naive_mse")},
        }

    def device(self, device_id: str) -> dict | None:
        """One device's card and history; None for a device the state does not know."""
        now = time.time()
        card = next((d for d in self.devices(now) if d["device_id"] == device_id), None)
        history = self.state.device_history(device_id)
        if card is None and not history:
            return None
        rows = [{**{k: v for k, v in h.items() if k != "metrics"}, **h["metrics"],
                 "gain_pct": gain_pct(h["metrics"]), "kb": h["bytes"] / 1024} for h in history]
        ordered = list(reversed(rows))
        return {"fleet": self.fleet, "now": now, "device_id": device_id, "card": card, "history": rows,
                "charts": {"error": {"x": [r["round_id"] for r in ordered],
                                     **{m: [r.get(k) for r in ordered] for m, k in FLEET_MSE.items()}}}}
