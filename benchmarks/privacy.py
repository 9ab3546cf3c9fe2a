"""Privacy benchmark (issue 16): what user-level differential privacy costs the forecasting fleet, and what secure
aggregation (SecAgg+) costs per device and on the coordinator against a plain round.

    nice -n 10 python benchmarks/privacy.py [--devices 200] [--rounds 20] [--seeds 0 1 2] [--out docs/results]

Utility cells (ε x seed): tsfm-tiny-v1, the backbone fedge shipped when they ran (benchmarks/models/), and its
head; N devices carved from the real datasets (ETTh1 and exchange rates; beyond 38 devices slices of the same
series overlap); each round samples q·N devices, each trains its head one epoch on its own windows, and the
server runs DP-FedAvg exactly as
`fedge serve --dp central` does (coordinator.fleet.privacy: clip to C, one Gaussian noise of std z·C on the sum,
divide by the devices asked), z calibrated by dp-accounting's RDP accountant so the R rounds spend ε at δ = 1/N.
In-process (no broker: the broker moves the same bytes whatever the noise). Reported: mean global MSE over all N
devices' held-back windows after the last round, against the shipped head untouched and plain FedAvg.

Cost cells (devices n): one SecAgg+ round over the same head size, in one process (edge_client.secagg.local: every
device and the server run the real protocol code; messages are passed by hand), against a plain round's encoded
float16 Update and its FedAvg sum. Bytes per device are what the device sends; CPU is process time. MQTT cells
(10 and 100 devices): a plain and a secure round of real EdgeClients and FleetCoordinator over a private Mosquitto,
bytes per device and round wall time (CPU is not separable there: everything shares one process). Flower cells
(10 and 100 clients; needs fedge[bench]): Flower's own SecAgg+ against its plain FedAvg on the same head and inputs
(benchmarks/flower_secagg.py, in a subprocess), for the secure / plain ratios next to fedge's.

Recommender cells (ε x seed, --rec-seeds): FedAvg of the shared adapter on MovieLens-100K, plain or DP-FedAvg.

Writes privacy.json (checkpointed cells, skipped on rerun), privacy.md (hand-written notes below the marker line are
kept) and privacy.png.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from rich.console import Console  # noqa: E402

from coordinator.fleet.aggregation import RunningSum, apply  # noqa: E402
from coordinator.fleet.privacy import Charge, calibrate_noise, dp_sum, epsilon  # noqa: E402
from coordinator.fleet.simulation import carve_devices  # noqa: E402
from edge_client.learning.head import HEAD_KEYS, slice_head  # noqa: E402
from edge_client.learning.learner import DeviceLearner, SplitConfig  # noqa: E402
from edge_client.runtime.backbone import BackboneRunner  # noqa: E402
from edge_client.secagg.local import run_local  # noqa: E402
from edge_client.secagg.masking import max_bits  # noqa: E402
from edge_client.secagg.protocol import RoundSpec  # noqa: E402
from edge_client.wire import Update, encode  # noqa: E402

NOTES_MARKER = "<!-- hand-written notes below: kept when the benchmark rewrites the table above -->"
EPSILONS = (1.0, 3.0, 8.0, math.inf)
HORIZON = 24
# The backbone the forecasting cells were measured on (shipped until tsfm-tiny-v2; benchmarks/models/README.md)
MEASURED_ON = Path(__file__).resolve().parent / "models" / "tsfm-tiny-v1"


def learners(n: int, data_dir: str | None, backbone: Path) -> list[DeviceLearner]:
    runner = BackboneRunner(backbone, threads=1)
    out = []
    for dev in carve_devices(n, data_dir, seed=0):
        series, season, _ = dev.source.load()
        out.append(DeviceLearner(runner, series, season=season, split=SplitConfig(horizon=HORIZON)))
    return out


def fleet_mse(devices: list[DeviceLearner], params: dict) -> float:
    return float(np.mean([d.evaluate(params, "global")["global_mse"] for d in devices]))


def utility_cell(devices: list[DeviceLearner], initial: dict, eps: float | None, seed: int, args) -> dict:  # type: ignore[no-untyped-def]
    """One training run. eps None: plain FedAvg (sample-weighted, unclipped); inf: clipped, no noise."""
    n, m = len(devices), max(1, round(args.q * len(devices)))
    q, delta = m / n, 1.0 / n
    z = 0.0 if eps is None else calibrate_noise(eps, delta, q, args.rounds)
    rng = np.random.default_rng(seed)
    params = {k: np.asarray(v, np.float32) for k, v in initial.items()}
    t0 = time.process_time()
    for r in range(args.rounds):
        asked = sorted(rng.choice(n, m, replace=False).tolist())
        deltas, counts = [], []
        for i in asked:
            out = devices[i].run_round(params, epochs=1, lr=args.lr, batch_size=64, seed=seed * 100_003 + r * 1000 + i,
                                       upload_dtype="float32")
            deltas.append(out.delta)
            counts.append(out.n_samples)
        if eps is None:
            running = RunningSum()
            for d, c in zip(deltas, counts, strict=True):
                running.add(d, c)
            step = running.mean()
        else:
            sums, _ = dp_sum(deltas, args.clip, z * args.clip, rng)
            step = {k: v / m for k, v in sums.items()}
        params = apply(params, step)
    spent = epsilon([Charge(q, z)] * args.rounds, delta) if eps is not None else math.inf
    return {"eps_target": "none" if eps is None else eps, "seed": seed, "noise_multiplier": z, "epsilon": spent,
            "delta": delta, "q": q, "mse": fleet_mse(devices, params), "cpu_s": time.process_time() - t0}


def cost_cell(n: int, size: int, seed: int) -> dict:
    """One SecAgg+ round of n devices in-process against a plain round's bytes and server CPU."""
    rng = np.random.default_rng(seed)
    vectors = {f"d{i:05d}": rng.normal(0, 0.05, size) for i in range(n)}
    t0 = time.perf_counter()
    out = run_local(vectors, RoundSpec("bench", 1, size, 0.5, max_bits(n)), seed=seed, rng=rng)
    wall = time.perf_counter() - t0
    assert not out.aborted, out.aborted
    plain = [encode(Update(fleet="bench", device_id=d, round_id=1, base_version=0, n_samples=100,
                           delta={"w": v.astype(np.float16)})) for d, v in vectors.items()]
    t1 = time.process_time()
    running = RunningSum()
    for v in vectors.values():
        running.add({"w": v.astype(np.float16)}, 100.0)
    plain_server = time.process_time() - t1
    return {"devices": n, "size": size, "secagg_bytes_per_device": float(np.mean(list(out.bytes_up.values()))),
            "plain_bytes_per_device": float(np.mean([len(p) for p in plain])),
            "secagg_device_cpu_s": out.device_s / n, "secagg_server_cpu_s": out.server_s,
            "plain_server_cpu_s": plain_server, "secagg_wall_s": wall, "transport": "in-process"}


def mqtt_cost_cell(n: int, backbone: Path, initial: dict, data_dir: str | None, seed: int) -> dict:
    """A plain round and a secure round of n real EdgeClients (shipped backbone, one epoch) over a private Mosquitto:
    bytes each device sent (update payloads; for SecAgg+ all four stages) and the round's wall time."""
    import tempfile

    from coordinator.fleet.broker import start_mosquitto
    from coordinator.fleet.server import FleetConfig, FleetCoordinator
    from coordinator.fleet.simulation import start_devices
    from coordinator.fleet.state import FleetState

    broker = start_mosquitto()
    fleet = f"privacy-cost-{n}"
    clients = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            state = FleetState(Path(tmp) / "fleet.sqlite")
            out: dict = {"devices": n, "transport": "MQTT (Mosquitto, one process)"}
            for secure in (False, True):
                cfg = FleetConfig(fleet=fleet, deadline_s=600, local_epochs=1, lr=3e-3, min_devices=n,
                                  secagg=secure, secagg_stage_s=120, seed=seed)
                coord = FleetCoordinator(cfg, broker.address, state).start()
                try:
                    coord.ensure_model(initial)
                    if not clients:
                        clients = start_devices(carve_devices(n, data_dir, seed=0), backbone, broker.address, fleet,
                                                horizon=HORIZON)
                    if len(coord.wait_for_devices(n, 120)) < n:
                        raise RuntimeError(f"only some of {n} devices said hello")
                    t0 = time.perf_counter()
                    res = coord.run_round("train")
                    wall = time.perf_counter() - t0
                    assert res.state == "closed", res.state
                    key = "secagg" if secure else "plain"
                    out[f"{key}_bytes_per_device"] = res.bytes_up / n
                    out[f"{key}_round_s"] = wall
                finally:
                    coord.stop()
            state.close()
            return out
    finally:
        for c in clients:
            c.stop()
        broker.stop()


def flower_cell(n: int, model: Path, rounds: int = 3) -> dict:
    """Flower's SecAgg+ and its plain FedAvg at n clients (benchmarks/flower_secagg.py, one subprocess each: Ray),
    the same head size and the same random-delta clients as ``cost_cell``. The first fit round starts Ray's actors,
    so the warm rounds after it are reported (mean)."""
    import subprocess
    import sys
    import tempfile

    out: dict = {"devices": n, "transport": "Flower simulation (Ray, 2 CPUs)", "rounds_timed": rounds - 1}
    with tempfile.TemporaryDirectory() as tmp:
        for secure in (False, True):
            res = Path(tmp) / f"{secure}.json"
            cmd = [sys.executable, str(Path(__file__).with_name("flower_secagg.py")), "--clients", str(n),
                   "--rounds", str(rounds), "--model", str(model), "--out", str(res)] + (["--secagg"] if secure else [])
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"Flower {n} clients secagg={secure} failed:\n{proc.stdout[-2000:]}"
                                   f"{proc.stderr[-3000:]}")
            data = json.loads(res.read_text())
            warm = data["rounds"][1:]
            key = "secagg" if secure else "plain"
            out[f"{key}_round_s"] = float(np.mean([r["round_s"] for r in warm]))
            out[f"{key}_server_cpu_s"] = float(np.mean([r["server_cpu_s"] for r in warm]))
            out[f"{key}_bytes_per_device"] = float(np.mean([r["bytes_per_client"] for r in warm]))
            out["flwr"] = data["flwr"]
    return out


def rec_world(data_dir: str | None) -> dict:
    """MovieLens-100K in 4 periods, the demo's SASRec (pretrained on period 0, cached), its ONNX encoder, the test
    sets and the configuration benchmarks/recommender.py chose for FedAvg."""
    from dataclasses import replace

    from coordinator.demo import DEFAULT_CACHE
    from coordinator.models.recommender import SASRecConfig
    from coordinator.recsys.data import continual_split, load_ml100k
    from coordinator.recsys.demo import BENCHMARK_RESULTS
    from coordinator.recsys.simulation import RecSimConfig, build_test_sets
    from coordinator.recsys.training import RecTrainSettings, pretrained_sasrec
    from edge_client.recsys.encoder import load_encoder
    from export.recommender_export import export_recommender

    cache = DEFAULT_CACHE / "recommender"
    split = continual_split(load_ml100k(data_dir), n_periods=4, pretrain_frac=0.5)
    model, meta = pretrained_sasrec(split, SASRecConfig(n_items=split.n_items),
                                    RecTrainSettings(epochs=400, patience=20, seed=0, threads=1), cache_dir=cache)
    encoder, items = load_encoder(export_recommender(model, cache / f"export-{meta['key']}").out_dir)
    return {"split": split, "encoder": encoder, "items": items, "tests": build_test_sets(split, encoder),
            "config": replace(RecSimConfig.chosen(BENCHMARK_RESULTS, "fedavg"), seed=0)}


def rec_cell(world: dict, eps: float | None, clip: float | None, seed: int) -> dict:
    """FedAvg of the recommender's shared adapter through the 4 periods, plain (eps None) or user-level DP-FedAvg:
    every user active in a period takes part (q = 1), 4 rounds, δ = 1/users. The seed sets the adapter's
    initialisation, the users' local shuffles and the DP noise (the pretrained SASRec and its encoder are shared)."""
    from dataclasses import replace

    from coordinator.recsys.simulation import run_federated_rec

    split = world["split"]
    n, rounds = len(split.logs), split.n_periods
    z = 0.0 if eps is None else calibrate_noise(eps, 1.0 / n, 1.0, rounds)
    cfg = replace(world["config"], seed=seed)
    cfg = cfg if eps is None else replace(cfg, dp_clip=clip, dp_noise=z)
    res = run_federated_rec("fedavg", split, world["encoder"], world["items"], world["tests"], cfg)
    summary = res.summary()
    return {"eps_target": "none" if eps is None else eps, "seed": seed, "noise_multiplier": z, "clip": clip,
            "epsilon": epsilon([Charge(1.0, z)] * rounds, 1.0 / n) if eps is not None else math.inf,
            "users": n, "next_ndcg": summary["next_ndcg"], "final_ndcg": summary["final_ndcg"],
            "median_update_norm": float(np.median([st.median_update_norm for st in res.stages])),
            "wall_s": summary["wall_s"]}


def markdown(state: dict) -> str:
    util, cost, cfg = state["utility"], state["cost"], state["config"]
    lines = [f"## Privacy–utility: forecasting fleet, shipped backbone, {cfg['devices']} devices, {cfg['rounds']} "
             f"rounds, q = {cfg['q']}, clip C = {cfg['clip']}, δ = 1/N", "",
             f"Shipped head untouched (round 0): mean global MSE **{state['initial_mse']:.4f}**. Mean ± std over "
             "seeds of the mean global MSE over all devices' held-back windows after the last round (lower is "
             "better); ε is what dp-accounting's RDP accountant reports for the rounds run.", "",
             "| server | target ε | noise z | ε spent | global MSE | seeds |", "|---|---:|---:|---:|---:|---:|"]
    for label in ["none", *[str(e) for e in EPSILONS]]:
        rows = [c for c in util.values() if str(c["eps_target"]) == label]
        if not rows:
            continue
        mse = np.array([c["mse"] for c in rows])
        name = "plain FedAvg (no clip, no noise)" if label == "none" else (
            "DP-FedAvg, clipped, no noise" if label == "inf" else "DP-FedAvg (central noise)")
        lines.append(f"| {name} | {'—' if label == 'none' else label} | {rows[0]['noise_multiplier']:.3g} | "
                     f"{rows[0]['epsilon']:.3g} | {mse.mean():.4f} ± {mse.std():.4f} | {len(rows)} |")
    lines += ["", f"## Secure aggregation cost (SecAgg+, head of {cfg['size']} parameters)", "",
              "| devices | transport | bytes sent per device: SecAgg+ | plain Update | device CPU s | coordinator "
              "CPU s: SecAgg+ | plain | round wall s (all in one process) |",
              "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for c in sorted(cost.values(), key=lambda c: c["devices"]):
        lines.append(f"| {c['devices']} | {c['transport']} | {c['secagg_bytes_per_device']:,.0f} | "
                     f"{c['plain_bytes_per_device']:,.0f} | {c['secagg_device_cpu_s']:.4f} | "
                     f"{c['secagg_server_cpu_s']:.3f} | {c['plain_server_cpu_s']:.4f} | {c['secagg_wall_s']:.2f} |")
    rec = state.get("rec", {})
    if rec:
        first = next(iter(rec.values()))
        n_seeds = len({c.get("seed", 0) for c in rec.values()})
        lines += ["", f"## Privacy–utility: recommender (MovieLens-100K, {first['users']} users = devices, FedAvg of "
                  "the shared adapter over 4 periods, every active user each period, δ = 1/users, "
                  f"{n_seeds} seeds)", "",
                  "NDCG@10, full ranking: *next* = each period's model on the next period's test items, *final* = the "
                  "last model on every period's (mean over periods); mean ± std over seeds (the seed sets the "
                  "adapter's initialisation, local shuffles and DP noise; the pretrained SASRec is shared). The clip "
                  "is the median update norm of the plain run of seed 0, fixed for every seed.", "",
                  "| server | target ε | noise z | clip C | ε spent | next NDCG@10 | final NDCG@10 | seeds |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for label in ["none", *[str(e) for e in EPSILONS]]:
            rows = [c for c in rec.values() if str(c["eps_target"]) == label]
            if not rows:
                continue
            c = rows[0]
            nxt, fin = np.array([r["next_ndcg"] for r in rows]), np.array([r["final_ndcg"] for r in rows])
            name = "plain FedAvg" if label == "none" else ("DP-FedAvg, clipped, no noise" if label == "inf"
                                                            else "DP-FedAvg (central noise)")
            lines.append(f"| {name} | {'—' if label == 'none' else label} | {c['noise_multiplier']:.3g} | "
                         f"{'—' if c['clip'] is None else format(c['clip'], '.3g')} | {c['epsilon']:.3g} | "
                         f"{nxt.mean():.4f} ± {nxt.std():.4f} | {fin.mean():.4f} ± {fin.std():.4f} | {len(rows)} |")
    mqtt = sorted(state.get("mqtt", {}).values(), key=lambda c: c["devices"])
    if mqtt:
        lines += ["", "Over a real broker (Mosquitto; devices, coordinator and broker share this machine's 2 cores; "
                  "one epoch of training per device is inside each round's time):", "",
                  "| devices | bytes sent per device: SecAgg+ | plain Update | round wall s: SecAgg+ | plain |",
                  "|---:|---:|---:|---:|---:|"]
        lines += [f"| {c['devices']} | {c['secagg_bytes_per_device']:,.0f} | {c['plain_bytes_per_device']:,.0f} | "
                  f"{c['secagg_round_s']:.2f} | {c['plain_round_s']:.2f} |" for c in mqtt]
    flower = sorted(state.get("flower", {}).values(), key=lambda c: c["devices"])
    if flower:
        lines += ["", "## SecAgg+ overhead: fedge against Flower's SecAgg+, both measured here", "",
                  f"Flower {flower[0]['flwr']} (`SecAggPlusWorkflow` + `secaggplus_mod`, simulation over Ray on this "
                  "machine's 2 cores) against its own plain FedAvg on the same path (`benchmarks/flower_secagg.py`), "
                  "the same head size, the same neighbour count and threshold as fedge, clients returning a random "
                  "delta (no training), mean of the warm rounds; fedge's side is the in-process cost cells above "
                  "(same inputs). Ratios are secure / plain of the same framework; bytes are what a client sends "
                  "(Flower: float32 arrays in protobuf; fedge: float16 in msgpack).", "",
                  "| devices | Flower bytes/client: SecAgg+ | plain | ratio | Flower round s: SecAgg+ | plain | ratio "
                  "| Flower server CPU s: SecAgg+ | plain | ratio | fedge bytes ratio | fedge server CPU ratio |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for c in flower:
            f = state["cost"].get(str(c["devices"]))
            fb = f"{f['secagg_bytes_per_device'] / f['plain_bytes_per_device']:.2f}" if f else "—"
            fc = f"{f['secagg_server_cpu_s'] / f['plain_server_cpu_s']:.1f}" if f else "—"
            lines.append(f"| {c['devices']} | {c['secagg_bytes_per_device']:,.0f} | {c['plain_bytes_per_device']:,.0f}"
                         f" | {c['secagg_bytes_per_device'] / c['plain_bytes_per_device']:.2f} | "
                         f"{c['secagg_round_s']:.2f} | {c['plain_round_s']:.2f} | "
                         f"{c['secagg_round_s'] / c['plain_round_s']:.1f} | {c['secagg_server_cpu_s']:.3f} | "
                         f"{c['plain_server_cpu_s']:.3f} | {c['secagg_server_cpu_s'] / c['plain_server_cpu_s']:.1f} "
                         f"| {fb} | {fc} |")
    return "\n".join(lines) + "\n"


def plot(state: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    labels, means, stds = [], [], []
    for label in ["1.0", "3.0", "8.0", "inf", "none"]:
        rows = [c["mse"] for c in state["utility"].values() if str(c["eps_target"]) == label]
        if rows:
            names = {"inf": "ε=∞ (clip)", "none": "plain"}
            labels.append(names[label] if label in names else f"ε={float(label):g}")
            means.append(np.mean(rows))
            stds.append(np.std(rows))
    a.bar(labels, means, yerr=stds, color="#4c72b0")
    a.axhline(state["initial_mse"], color="k", ls="--", label="shipped head, untrained")
    a.set_ylabel("mean global MSE")
    a.set_title("privacy–utility (forecasting fleet)")
    a.legend()
    cost = sorted(state["cost"].values(), key=lambda c: c["devices"])
    ns = [c["devices"] for c in cost]
    b.plot(ns, [c["secagg_bytes_per_device"] / 1024 for c in cost], "o-", label="SecAgg+ bytes/device (KB)")
    b.plot(ns, [c["plain_bytes_per_device"] / 1024 for c in cost], "s--", label="plain bytes/device (KB)")
    b.set_xscale("log")
    b.set_xlabel("devices per round")
    b.set_title("secure aggregation cost")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--q", type=float, default=0.3, help="share of the devices asked per round")
    ap.add_argument("--clip", type=float, default=0.25)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--cost-devices", type=int, nargs="+", default=[10, 100, 1000])
    ap.add_argument("--mqtt-devices", type=int, nargs="*", default=[10, 100])
    ap.add_argument("--rec-seeds", type=int, nargs="*", default=[0, 1, 2], help="the recommender's seeds (none: skip)")
    ap.add_argument("--flower-devices", type=int, nargs="*", default=[10, 100],
                    help="Flower SecAgg+ vs plain FedAvg cells (needs fedge[bench]; none: skip)")
    ap.add_argument("--no-rec", action="store_true", help="skip the recommender's cells")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", type=Path, default=Path("docs/results"))
    args = ap.parse_args()
    console = Console()
    args.out.mkdir(parents=True, exist_ok=True)
    out_json = args.out / "privacy.json"
    config = {"devices": args.devices, "rounds": args.rounds, "q": args.q, "clip": args.clip, "lr": args.lr}
    state = json.loads(out_json.read_text()) if out_json.is_file() else {}
    if state.get("config", {}) | {"size": None} != config | {"size": None}:
        state = {"config": config, "utility": {}, "cost": {}}

    def save() -> None:
        out_json.write_text(json.dumps(state, indent=1, default=str))

    artifacts = MEASURED_ON
    with np.load(artifacts / "head.npz") as data:
        initial = slice_head({k: data[k] for k in HEAD_KEYS}, HORIZON)
    size = sum(v.size for v in initial.values())
    state["config"]["size"] = size
    todo = [(e, s) for e in (None, *EPSILONS) for s in args.seeds if f"{e}|{s}" not in state["utility"]]
    if todo or "initial_mse" not in state:
        with console.status(f"features of {args.devices} devices (shipped backbone in ONNX Runtime)"):
            devices = learners(args.devices, args.data_dir, artifacts / "backbone.onnx")
        state["initial_mse"] = fleet_mse(devices, initial)
        for e, s in todo:
            cell = utility_cell(devices, initial, e, s, args)
            state["utility"][f"{e}|{s}"] = cell
            save()
            console.print(f"ε {cell['eps_target']} seed {s}: z {cell['noise_multiplier']:.3g}, ε spent "
                          f"{cell['epsilon']:.3g}, MSE {cell['mse']:.4f} ({cell['cpu_s']:.0f} s)")
    for n in args.cost_devices:
        if str(n) not in state["cost"]:
            state["cost"][str(n)] = cost_cell(n, size, seed=n)
            save()
            c = state["cost"][str(n)]
            console.print(f"SecAgg+ {n} devices: {c['secagg_bytes_per_device']:,.0f} B/device (plain "
                          f"{c['plain_bytes_per_device']:,.0f}), server CPU {c['secagg_server_cpu_s']:.3f} s")
    state.setdefault("rec", {})
    for key in [k for k in state["rec"] if "|" not in k]:  # cells written before seeds existed were seed 0
        state["rec"][f"{key}|0"] = state["rec"].pop(key) | {"seed": 0}
    rec_todo = [] if args.no_rec else [(e, s) for s in args.rec_seeds for e in (None, *EPSILONS)
                                       if f"{'none' if e is None else e}|{s}" not in state["rec"]]
    if rec_todo:
        with console.status("recommender: MovieLens-100K, SASRec (cached), ONNX encoder"):
            world = rec_world(args.data_dir)
        for e, s in rec_todo:
            label = "none" if e is None else str(e)
            if e is not None and "none|0" not in state["rec"]:
                state["rec"]["none|0"] = rec_cell(world, None, None, 0)
            clip = None if e is None else state["rec"]["none|0"]["median_update_norm"]
            state["rec"][f"{label}|{s}"] = rec_cell(world, e, clip, s)
            save()
            c = state["rec"][f"{label}|{s}"]
            console.print(f"recommender ε {label} seed {s}: z {c['noise_multiplier']:.3g}, next NDCG@10 "
                          f"{c['next_ndcg']:.4f}, final {c['final_ndcg']:.4f} ({c['wall_s']:.0f} s)")
    state.setdefault("mqtt", {})
    for n in args.mqtt_devices:
        if str(n) not in state["mqtt"]:
            state["mqtt"][str(n)] = mqtt_cost_cell(n, artifacts / "backbone.onnx", initial, args.data_dir, seed=n)
            save()
            c = state["mqtt"][str(n)]
            console.print(f"MQTT {n} devices: SecAgg+ {c['secagg_bytes_per_device']:,.0f} B/device in "
                          f"{c['secagg_round_s']:.1f} s, plain {c['plain_bytes_per_device']:,.0f} B in "
                          f"{c['plain_round_s']:.1f} s")
    state.setdefault("flower", {})
    for n in args.flower_devices:
        if str(n) not in state["flower"]:
            state["flower"][str(n)] = flower_cell(n, artifacts)
            save()
            c = state["flower"][str(n)]
            console.print(f"Flower {n} clients: SecAgg+ {c['secagg_round_s']:.2f} s, "
                          f"{c['secagg_bytes_per_device']:,.0f} B/client; plain {c['plain_round_s']:.2f} s, "
                          f"{c['plain_bytes_per_device']:,.0f} B")
    save()
    md = args.out / "privacy.md"
    notes = md.read_text().partition(NOTES_MARKER)[2] if md.is_file() else ""
    text = markdown(state)
    console.print(text)
    md.write_text("# Privacy: differential privacy and secure aggregation, measured\n\n"
                  "Written by `benchmarks/privacy.py`.\n\n" + text + f"\n{NOTES_MARKER}" + (notes or "\n"))
    plot(state, args.out / "privacy.png")


if __name__ == "__main__":
    main()
