"""`fedge demo`: broker, coordinator and simulated devices end to end on real data.

One process plays every part, but through the real interfaces: a real MQTT broker (Mosquitto, or
the embedded rumqttd), the coordinator's MQTT round loop with its SQLite state, and K edge
clients each running the exported ONNX backbone in ONNX Runtime and training its head in numpy.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from coordinator.fleet.broker import RunningBroker, start_broker
from coordinator.fleet.privacy import DPConfig, PrivacyBudgetSpent
from coordinator.fleet.server import FleetConfig, FleetCoordinator, RoundResult
from coordinator.fleet.simulation import carve_devices, slice_overlaps, start_devices
from coordinator.fleet.state import FleetState
from edge_client.learning.head import slice_head
from edge_client.wire.mqtt import BrokerAddress

if TYPE_CHECKING:
    from coordinator.models.tsfm import TSFM

log = logging.getLogger("fedge.demo")

DEFAULT_CACHE = Path(os.environ.get("FEDGE_CACHE", Path.home() / ".cache" / "fedge"))


@dataclass(frozen=True)
class DemoConfig:
    devices: int = 6
    rounds: int = 5
    horizon: int = 24
    local_epochs: int = 2
    lr: float = 3e-3
    batch_size: int = 64
    strategy: str = "fedavg"
    prox_mu: float = 0.0
    data_dir: str | None = None
    out_dir: Path = Path("runs/demo")
    cache_dir: Path = DEFAULT_CACHE
    broker: str = "auto"  # "auto" | "mosquitto" | "embedded" | "host:port"
    deadline_s: float = 300.0
    seed: int = 0
    quick: bool = False  # a smaller backbone and budget: a smoke run in well under a minute
    # a fleet CA, one certificate per device, Mosquitto with TLS, client certificates and the ACL of
    # `fedge broker config`, and signed control messages (docs/security.md); default: anonymous on loopback
    secure: bool = False
    personalize: tuple[tuple[str, float], ...] = ()  # device-side methods (edge_client.learning.personalize)
    # "shipped": the pretrained model inside the package (no pretraining); "auto": train the strategy
    # benchmarks/pretrain.py ranked best (coordinator.pretrain.backbone); or
    # "etth1" (central, ETTh1 only) or one of the silo strategies
    pretrain_strategy: str = "shipped"
    ui: bool = True  # the fleet dashboard on 127.0.0.1 while the demo runs (its address is printed)
    dp: DPConfig | None = None  # user-level differential privacy (coordinator.fleet.privacy); ε shows in the table
    secagg: bool = False  # secure aggregation (SecAgg+): the coordinator sees only each round's sum


@dataclass
class DemoResult:
    rows: list[dict] = field(default_factory=list)
    devices: list[dict] = field(default_factory=list)
    parity: dict = field(default_factory=dict)
    backbone: dict = field(default_factory=dict)
    broker: str = ""
    out_dir: str = ""


METRICS = ("global_mse", "global_mae", "personal_mse", "personal_mae", "naive_mse", "naive_mae")


def summarise(result: RoundResult, label: str) -> dict:
    """Mean over devices of each metric, plus traffic and time."""
    row: dict = {"round": label, "devices": f"{len(result.metrics)}/{len(result.selected)}",
                 "up_kb": result.bytes_up / 1024, "down_kb": result.bytes_down / 1024, "wall_s": result.seconds,
                 "epsilon": result.epsilon}
    for m in METRICS:
        vals = [d[m] for d in result.metrics.values() if m in d]
        row[m] = float(np.mean(vals)) if vals else float("nan")
    return row


def results_table(rows: list[dict], title: str = "fedge demo — mean over devices (scaled units)") -> Table:
    t = Table(title=title, header_style="bold", caption="global = the head each round started from; personal = "
              "after the device's local training; all on each device's held-back window")
    for col in ("round", "devices", "up KB", "down KB", "global MSE / MAE", "personal MSE / MAE",
                "seasonal naive MSE / MAE", "ε (DP)", "wall s"):
        t.add_column(col, justify="right")

    def pair(r: dict, who: str) -> str:
        mse, mae = r[f"{who}_mse"], r[f"{who}_mae"]
        return "—" if mse != mse else f"{mse:.3f} / {mae:.3f}"

    for r in rows:
        t.add_row(str(r["round"]), r["devices"], f"{r['up_kb']:.1f}", f"{r['down_kb']:.1f}", pair(r, "global"),
                  pair(r, "personal"), pair(r, "naive"),
                  "—" if r.get("epsilon") is None else f"{r['epsilon']:.3g}", f"{r['wall_s']:.1f}")
    return t


def device_table(devices: list[dict]) -> Table:
    t = Table(title="per device, final (MSE on each device's held-back window)", header_style="bold")
    for col in ("device", "domain", "windows", "naive", "global", "personal", "best"):
        t.add_column(col, justify="right" if col not in ("device", "domain", "best") else "left")
    for d in devices:
        scores = {"naive": d["naive_mse"], "global": d["global_mse"], "personal": d.get("personal_mse", np.nan)}
        best = min((v, k) for k, v in scores.items() if v == v)[1]
        t.add_row(d["device"], d["domain"], str(d["n_train"]), f"{d['naive_mse']:.3f}", f"{d['global_mse']:.3f}",
                  f"{d.get('personal_mse', float('nan')):.3f}", best)
    return t


def markdown_report(cfg: DemoConfig, result: DemoResult) -> str:
    """The two tables as Markdown, for docs/results and for people reading a run folder."""
    def cell(v: float) -> str:
        return "—" if v != v else f"{v:.3f}"

    lines = [f"# fedge demo: {cfg.devices} devices, {cfg.rounds} rounds, {cfg.strategy}, horizon {cfg.horizon}\n",
             f"Broker: {result.broker}. MSE/MAE on each device's held-back window, in its own scaled units; "
             "mean over devices. *global* = the head each round started from, *personal* = after local training "
             "(the device keeps the best of its epochs on its newest windows).\n",
             f"Backbone: {result.backbone.get('description', '—')}.\n",
             "| round | devices | up KB | down KB | global MSE | global MAE | personal MSE | personal MAE | "
             "naive MSE | naive MAE | ε (DP) | wall s |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['round']} | {r['devices']} | {r['up_kb']:.1f} | {r['down_kb']:.1f} | "
              + " | ".join(cell(r[m]) for m in METRICS)
              + f" | {'—' if r.get('epsilon') is None else format(r['epsilon'], '.3g')} | {r['wall_s']:.1f} |"
              for r in result.rows]
    lines += ["\n| device | domain | naive MSE | global MSE | personal MSE |", "|---|---|---:|---:|---:|"]
    lines += [f"| {d['device']} | {d['domain']} | {cell(d['naive_mse'])} | {cell(d['global_mse'])} | "
              f"{cell(d.get('personal_mse', float('nan')))} |" for d in result.devices]
    return "\n".join(lines) + "\n"


def save_plot(rows: list[dict], devices: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train_rows = [r for r in rows if isinstance(r["round"], int)]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
    x = [r["round"] for r in train_rows]
    for key, label, style in (("global_mse", "global head (start of round)", "o-"),
                              ("personal_mse", "personalised (after local training)", "s-"),
                              ("naive_mse", "seasonal naive", "k--")):
        ax1.plot(x, [r[key] for r in train_rows], style, label=label)
    final = rows[-1]
    if final["round"] == "final":
        ax1.axhline(final["global_mse"], color="C0", alpha=0.4, lw=1, label="final global")
    ax1.set_xlabel("round")
    ax1.set_xticks(x)
    ax1.set_ylabel("mean MSE over devices (scaled)")
    ax1.set_title("Federated rounds")
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    names = [d["device"] for d in devices]
    idx = np.arange(len(names))
    for i, (key, label) in enumerate((("naive_mse", "naive"), ("global_mse", "global"), ("personal_mse", "personal"))):
        ax2.bar(idx + (i - 1) * 0.27, [d.get(key, np.nan) for d in devices], 0.27, label=label)
    ax2.set_xticks(idx, names, rotation=30, ha="right", fontsize=7)
    ax2.set_ylabel("MSE (scaled)")
    ax2.set_title("Final, per device")
    ax2.legend(fontsize=8)
    ax2.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def start_demo_broker(spec: str) -> tuple[RunningBroker | None, BrokerAddress, str]:
    """(broker we started or None, its address, a label): ``auto|mosquitto|embedded`` start one that
    both demos stop afterwards; ``host:port`` uses a broker someone else runs."""
    if spec in ("auto", "mosquitto", "embedded"):
        b = start_broker(spec)
        return b, b.address, b.kind
    addr = BrokerAddress.parse(spec)
    return None, addr, f"external {addr.host}:{addr.port}"


def secure_fleet(folder: Path, fleet: str, device_ids: list[str]):  # type: ignore[no-untyped-def]
    """`fedge fleet init`, `fedge fleet enroll` for every device and `fedge broker config`, then that broker: the
    demo's fleet as it would run on a real network. Returns (registry, device identities, running broker)."""
    from coordinator.fleet.broker import start_fleet_broker
    from coordinator.fleet.registry import DeviceRegistry
    from edge_client.identity import Identity

    broker, bundles = start_fleet_broker(folder, fleet, device_ids)
    return DeviceRegistry(folder), [Identity.load(bundles[d], d) for d in device_ids], broker


def demo_backbone(cfg: DemoConfig) -> tuple[TSFM, dict]:
    """The backbone the demo exports (see coordinator.pretrain.backbone for the selection rule) and a
    description of it for the output. By default the shipped model (no pretraining); --quick keeps
    its 150-step ETTh1 pretraining of a smaller model unless a strategy is asked for, and then runs
    it on a small budget."""
    from coordinator.models.tsfm import TSFMConfig
    from coordinator.pretrain.backbone import (
        ETTH1_ONLY,
        SHIPPED,
        BackboneBudget,
        BackboneChoice,
        choose_backbone,
        pretrained_backbone,
    )

    if cfg.pretrain_strategy == SHIPPED and not cfg.quick:
        from coordinator.pretrain import shipped

        try:
            model, meta = shipped.load_shipped()
        except (shipped.ShippedModelMissing, ValueError) as exc:
            log.warning("%s; pretraining instead (--pretrain-strategy auto)", exc)
            return demo_backbone(replace(cfg, pretrain_strategy="auto"))
        return model, {"strategy": SHIPPED, "reason": "the pretrained model shipped with fedge (default)",
                       "datasets": list(meta.get("recipe", {}).get("domains", [])),
                       "held_out": list(shipped.HELD_OUT), "val_mse": meta.get("val_mse"),
                       "description": f"{shipped.VERSION}, shipped with fedge (docs/model-card.md): centralized "
                                      "over the training splits of five real domains + synthetic series; "
                                      "held out: finance"}
    if cfg.quick:
        mcfg = TSFMConfig(context=256, horizon=max(cfg.horizon, 24), d_model=32, n_layers=2, d_ff=64,
                          feature_dim=32)
        budget, etth1_args = BackboneBudget(rounds=2, local_steps=5), {"steps": 150}
    else:
        mcfg, budget, etth1_args = TSFMConfig.tiny(), BackboneBudget(), {}
    if cfg.quick and cfg.pretrain_strategy == SHIPPED:
        choice = BackboneChoice(ETTH1_ONLY, "--quick (give --pretrain-strategy for another)")
    else:
        choice = choose_backbone(cfg.pretrain_strategy, data_dir=cfg.data_dir)
    model, meta = pretrained_backbone(choice, mcfg, cfg.cache_dir, data_dir=cfg.data_dir, budget=budget,
                                      etth1_args=etth1_args, progress=True)
    return model, {"strategy": choice.strategy, "reason": choice.reason, "datasets": list(choice.datasets),
                   "held_out": list(choice.held_out), "description": choice.describe(),
                   "val_mse": meta.get("val_mse")}


def demo_dashboard(db: Path, coordinator: FleetCoordinator):  # type: ignore[no-untyped-def]
    """The dashboard on 127.0.0.1:8750, or on a free port when another program holds that one."""
    import socket

    from coordinator.dashboard.app import start_dashboard

    with socket.socket() as probe:
        port = 8750 if probe.connect_ex(("127.0.0.1", 8750)) != 0 else 0
    return start_dashboard(db, "127.0.0.1", port, live=coordinator)


def run_demo(cfg: DemoConfig, console: Console | None = None) -> DemoResult:
    from export.onnx_export import export_model

    console = console or Console()
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = DemoResult(out_dir=str(out))

    console.rule("[bold]1. the TSFM backbone: the shipped model, or pretrain one (training splits only, cached)")
    model, result.backbone = demo_backbone(cfg)
    console.print(f"backbone: {result.backbone['description']}")
    console.print(f"model {model.model_id()} — {model.n_params():,} parameters, context {model.config.context}")

    console.rule("[bold]2. export backbone + head to ONNX, check parity against torch")
    exported = export_model(model, out / "model")
    result.parity = asdict(exported.parity)
    p = exported.parity
    console.print(f"backbone.onnx {exported.backbone.stat().st_size / 1024:.0f} KB, exporter "
                  f"{exported.spec['exporter']['backbone']}; parity vs torch at batch {p.batch_sizes}: features max "
                  f"|Δ| {p.backbone_max_abs_err:.1e}, forecast max |Δ| {p.forecast_max_abs_err:.1e}, numpy head "
                  f"max |Δ| {p.numpy_head_max_abs_err:.1e}")

    console.rule("[bold]3. broker, coordinator and simulated devices")
    fleet = f"demo-{os.getpid()}"
    sims = carve_devices(cfg.devices, cfg.data_dir, seed=cfg.seed)
    registry, identities = None, None
    if cfg.secure:
        registry, identities, broker = secure_fleet(out / "fleet", fleet, [s.device_id for s in sims])
        address, kind = broker.address, "mosquitto with TLS, client certificates and ACL"
    else:
        broker, address, kind = start_demo_broker(cfg.broker)
    result.broker = kind
    console.print(f"MQTT broker: {kind} on {address}")
    db = out / "fleet.sqlite"
    for stale in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
        stale.unlink(missing_ok=True)
    coordinator = FleetCoordinator(
        FleetConfig(fleet=fleet, deadline_s=cfg.deadline_s, local_epochs=cfg.local_epochs, lr=cfg.lr,
                    batch_size=cfg.batch_size, strategy=cfg.strategy, prox_mu=cfg.prox_mu, seed=cfg.seed,
                    min_devices=cfg.devices, personalize=cfg.personalize, dp=cfg.dp,
                    secagg=cfg.secagg),
        address, FleetState(db), registry=registry)
    clients = []
    dashboard = None
    try:
        if cfg.ui:
            dashboard = demo_dashboard(db, coordinator)
            console.print(f"dashboard (live while the demo runs): [link={dashboard.url}]{dashboard.url}[/link]")
        coordinator.start()
        initial = slice_head(model.head_state(), cfg.horizon)
        coordinator.ensure_model(initial, {"backbone_sha256": exported.spec["files"]["backbone.onnx"]["sha256"],
                                           "backbone_id": exported.spec["model_id"]})
        with console.status("starting devices (ONNX Runtime sessions, backbone features of local data)"):
            clients = start_devices(sims, exported.backbone, address, fleet, horizon=cfg.horizon, seed=cfg.seed,
                                    identities=identities)
        online = coordinator.wait_for_devices(cfg.devices, timeout_s=30)
        dev_table = Table(title=f"{len(online)} devices online", header_style="bold")
        for col in ("device", "domain", "dataset", "column", "rows", "slice", "train windows", "eval windows"):
            dev_table.add_column(col)
        overlaps = slice_overlaps(sims)
        for sim, client in zip(sims, clients, strict=True):
            src = sim.source
            dev_table.add_row(sim.device_id, sim.domain, src.dataset, src.column, f"{src.start}–{src.stop}",
                              "overlaps another device's" if overlaps[sim.device_id] else "its own",
                              str(client.learner.n_train), str(client.learner.n_eval))
        console.print(dev_table)

        console.rule(f"[bold]4. {cfg.rounds} federated rounds ({cfg.strategy}) + a final evaluation")
        status = Text("")
        with Live(Group(results_table(result.rows), status), console=console, refresh_per_second=4) as live:
            def progress(done: int, total: int, label: str) -> None:
                status.plain = f"round {label}: {done}/{total} devices reported"
                live.update(Group(results_table(result.rows), status))

            for r in range(1, cfg.rounds + 1):
                try:
                    res = coordinator.run_round("train", on_progress=lambda d, t, r=r: progress(d, t, str(r)))
                except PrivacyBudgetSpent as exc:
                    status.plain = str(exc)
                    break
                result.rows.append(summarise(res, r))
                live.update(Group(results_table(result.rows), status))
            res = coordinator.run_round("evaluate", on_progress=lambda d, t: progress(d, t, "final"))
            result.rows.append(summarise(res, "final"))
            status.plain = ""
            live.update(Group(results_table(result.rows), status))
        for sim, client in zip(sims, clients, strict=True):
            metrics = res.metrics.get(sim.device_id, {})
            if metrics:
                result.devices.append({"device": sim.device_id, "domain": sim.domain,
                                       "n_train": client.learner.n_train, **metrics})
        console.print(device_table(result.devices))
        rejected = dict(coordinator.receiver.rejected)
        console.print(f"coordinator rejected messages: {rejected or 'none'}; duplicates ignored: "
                      f"{coordinator.duplicates}")
    finally:
        for c in clients:
            c.stop()
        if dashboard is not None:
            dashboard.stop()
        coordinator.stop()
        if broker is not None:
            broker.stop()

    save_plot(result.rows, result.devices, out / "demo.png")
    (out / "demo.json").write_text(json.dumps(asdict(result), indent=2, default=str))
    (out / "demo.md").write_text(markdown_report(cfg, result))
    console.print(f"results: {out / 'demo.json'}, {out / 'demo.md'}, curves: {out / 'demo.png'}")
    if cfg.ui:
        console.print(f"the dashboard again, for this run's database: fedge dashboard --db {db}")
    return result
