"""`fedge`: the coordinator's command line.

    fedge demo       broker + coordinator + simulated devices on real data, one command
    fedge pretrain   pretrain the TSFM (on ETTh1, or across domain silos with a federated strategy)
    fedge export     checkpoint -> backbone.onnx, head.onnx, head.npz, spec.json (+ parity); --format tflite
    fedge serve      run federated rounds for real devices over an MQTT broker (resumable)
    fedge status     rounds, models and devices recorded in a fleet database
    fedge dashboard  the fleet dashboard (read-only web page) for a fleet database
    fedge ingest     one of several update-storing workers beside `fedge serve` (MQTT v5 shared subscription)
    fedge loadtest   N emulated devices (full protocol, many per process) against a real broker and `fedge serve`
    fedge bundle     keygen / publish: signed model bundles that devices fetch, verify and switch to
    fedge fleet      init / enroll / revoke: the fleet CA and device identities
    fedge broker     config: a production Mosquitto configuration (TLS, certificates, ACL)
"""

from __future__ import annotations

import json
import logging
import math
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from coordinator.bundle_cli import bundle_app
from coordinator.fleet_cli import broker_app, fleet_app
from coordinator.pretrain import shipped

app = typer.Typer(help="fedge coordinator: federated learning for foundation models on edge devices.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
console = Console(width=None if sys.stdout.isatty() else 120)  # logs and CI output keep whole tables
app.add_typer(bundle_app, name="bundle")
app.add_typer(fleet_app, name="fleet")
app.add_typer(broker_app, name="broker")


def _logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(name)s: %(message)s",
                        handlers=[RichHandler(console=console, show_path=False, show_time=False)], force=True)


def parse_personalize(text: str) -> tuple[tuple[str, float], ...]:
    """'self_distill=0.5,feature_distance=0.1,rank=4' -> pairs for FleetConfig.personalize."""
    from edge_client.daemon.client import FLEET_PERSONAL_OPTIONS as known
    from edge_client.daemon.client import personal_config
    from edge_client.wire import ProtocolError

    pairs = []
    for item in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = item.partition("=")
        if name not in known:
            raise ValueError(f"unknown personalisation option {name!r}; known: {', '.join(sorted(known))}")
        pairs.append((name, float(value) if sep else 1.0))
    try:  # what a device would refuse is refused here, before any round asks for it
        personal_config({"personalize": True, **dict(pairs)})
    except ProtocolError as exc:
        raise ValueError(str(exc)) from None
    return tuple(pairs)


def parse_hparams(strategy: str, text: str) -> dict[str, float | bool]:
    """'mu=0.1,weight_power=0' -> keyword arguments of the pretraining strategy, checked by building it (a name
    it does not take, or a value it refuses, is an error here rather than after the data has loaded)."""
    from coordinator.pretrain.strategies import make_strategy

    hparams: dict[str, float | bool] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = (part.strip() for part in item.partition("="))
        if not sep:
            raise ValueError(f"--hparam wants NAME=VALUE, not {item!r}")
        if value.lower() in ("true", "false"):
            hparams[name] = value.lower() == "true"
            continue
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"--hparam {name}: {value!r} is not a number or true/false") from None
        if not math.isfinite(number):
            raise ValueError(f"--hparam {name}: {value!r} is not a finite number")
        hparams[name] = int(number) if number.is_integer() and "." not in value else number
    try:
        make_strategy(strategy, **hparams)
    except TypeError as exc:
        raise ValueError(f"strategy {strategy!r} does not take these hyper-parameters ({exc})") from None
    return hparams


def dp_config(mode: str, noise: float | None, clip: float, delta: float | None, budget: float | None,
              adaptive: float | None, rounds: int, fraction: float, devices: int):  # type: ignore[no-untyped-def]
    """The DPConfig the `--dp-…` options describe (None: off). Without --dp-noise the noise multiplier is calibrated
    so that `rounds` rounds at sampling rate `fraction` spend the budget at δ (default 1/`devices`, the fewest the
    fleet runs with: the largest δ the rounds may report)."""
    from coordinator.fleet.privacy import DPConfig, calibrate_noise

    if mode == "off":
        return None
    if noise is None:
        if budget is None:
            raise ValueError("--dp needs --dp-noise or --dp-epsilon-budget (to calibrate the noise from)")
        noise = calibrate_noise(budget, delta or 1.0 / max(devices, 2), fraction, rounds)
    return DPConfig(placement=mode, noise_multiplier=noise, clip=clip, delta=delta, epsilon_budget=budget,
                    adaptive=adaptive is not None, target_quantile=adaptive or 0.5)


def _fail(message: str) -> None:
    console.print(f"[red]error:[/red] {message}")
    raise typer.Exit(2)


@app.command()
def demo(
    task: Annotated[str, typer.Option(help="tsfm: forecasting fleet | rec: MovieLens recommender")] = "tsfm",
    users: Annotated[int, typer.Option(min=10, max=943, help="rec: users (= devices) simulated")] = 943,
    periods: Annotated[int, typer.Option(min=2, max=8, help="rec: time periods after the pretraining period")] = 4,
    devices: Annotated[int, typer.Option(min=1, max=512, help="simulated edge devices (beyond 38, slices of the same "
                                         "series overlap; the device table says which)")] = 6,
    rounds: Annotated[int, typer.Option(min=1, max=200, help="federated training rounds")] = 5,
    horizon: Annotated[int, typer.Option(min=1, max=96, help="forecast horizon of the fleet head")] = 24,
    local_epochs: Annotated[int, typer.Option(min=1, max=50)] = 2,
    lr: Annotated[float, typer.Option(min=1e-6, max=1.0)] = 3e-3,
    strategy: Annotated[str, typer.Option(help="fedavg | fedprox | trimmed_mean | median | krum | task_vector")
                        ] = "fedavg",
    prox_mu: Annotated[float, typer.Option(min=0.0, help="FedProx proximal weight on the device")] = 0.0,
    personalize: Annotated[str, typer.Option(help="device methods, e.g. 'rank=4,self_distill=0.5,feature_distance=0.1'"
                                             )] = "",
    data_dir: Annotated[str | None, typer.Option(help="folder with the shared datasets ($FEDGE_DATA_DIR)")] = None,
    out: Annotated[Path, typer.Option(help="where results, plot, model and fleet DB go")] = Path("runs/demo"),
    broker: Annotated[str, typer.Option(help="auto | mosquitto | embedded | host:port")] = "auto",
    quick: Annotated[bool, typer.Option(help="smaller backbone and budget: a fast smoke run")] = False,
    secure: Annotated[bool, typer.Option(help="TLS, a certificate per device, broker ACLs and signed messages "
                                         "(Mosquitto needed); default: anonymous on loopback")] = False,
    pretrain_strategy: Annotated[str, typer.Option(
        help="backbone: shipped (the pretrained model inside fedge, docs/model-card.md) | auto (train the best in "
             "docs/results/pretrain.json) | etth1 | centralized | fedavg | fedprox | fedadam | scaffold | bilevel | "
             "fedal")] = "shipped",
    seed: int = 0,
    ui: Annotated[bool, typer.Option("--ui/--no-ui", help="serve the fleet dashboard on 127.0.0.1 while it runs")
                  ] = True,
    dp: Annotated[str, typer.Option(help="differential privacy: off | central | distributed (see `fedge serve`)")
                  ] = "off",
    dp_epsilon_budget: Annotated[float | None, typer.Option(min=0.0, help="DP: the fleet's ε budget; the noise is "
                                                            "calibrated so that --rounds rounds spend it")] = None,
    dp_noise: Annotated[float | None, typer.Option(min=0.0, help="DP noise multiplier (instead of calibrating)")
                        ] = None,
    dp_clip: Annotated[float, typer.Option(min=1e-9, help="DP: L2 bound of one device's delta")] = 0.1,
    secagg: Annotated[bool, typer.Option("--secagg/--no-secagg", help="secure aggregation (SecAgg+) of the rounds")
                      ] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Run broker, coordinator and simulated edge devices end to end on real data."""
    from coordinator.demo import DemoConfig, run_demo
    from coordinator.fleet.strategies import fleet_strategy
    from edge_client.data.datasets import DatasetNotFound, resolve_data_dir

    _logging(verbose)
    try:
        fleet_strategy(strategy)
        if pretrain_strategy not in ("auto", "shipped"):  # checked before any work; torch only when needed
            from coordinator.pretrain.backbone import check_requested

            check_requested(pretrain_strategy)
        resolve_data_dir(data_dir)
        personal_pairs = parse_personalize(personalize)
        dp_cfg = dp_config(dp, dp_noise, dp_clip, None, dp_epsilon_budget, None, rounds, 1.0, devices)
        from coordinator.fleet.server import FleetConfig, check_private_strategy

        check_private_strategy(FleetConfig(strategy=strategy, dp=dp_cfg, secagg=secagg))
    except (ValueError, DatasetNotFound) as exc:
        _fail(str(exc))
    if task not in ("tsfm", "rec"):
        _fail(f"--task must be tsfm or rec, not {task!r}")
    if task == "rec":
        from coordinator.demo import DEFAULT_CACHE
        from coordinator.recsys.demo import run_rec_demo

        try:
            run_rec_demo(console, data_dir=data_dir, users=users, periods=periods, seed=seed,
                         cache_dir=DEFAULT_CACHE / "recommender", broker=broker, out_dir=out)
        except (ConnectionError, RuntimeError) as exc:
            _fail(str(exc))
        except (FileNotFoundError, ValueError) as exc:
            _fail(f"{exc} (MovieLens-100K may not be redistributed: point --data-dir at a folder holding "
                  "ml-100k/u.data.gz)")
        return
    try:
        run_demo(DemoConfig(devices=devices, rounds=rounds, horizon=horizon, local_epochs=local_epochs, lr=lr,
                            strategy=strategy, prox_mu=prox_mu, data_dir=data_dir, out_dir=out, broker=broker,
                            quick=quick, seed=seed, personalize=personal_pairs, secure=secure,
                            pretrain_strategy=pretrain_strategy, ui=ui, dp=dp_cfg, secagg=secagg), console)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        _fail(str(exc))


@app.command()
def pretrain(
    strategy: Annotated[str, typer.Option(help="shipped (reproduce the model shipped with fedge from the data) | etth1 "
                                          "(central, ETTh1 only) | centralized | fedavg | fedprox | fedadam | "
                                          "scaffold | bilevel | fedal | fedpm (domain silos)")] = "etth1",
    rounds: Annotated[int, typer.Option(min=1, help="silo strategies: federated rounds")] = 20,
    local_steps: Annotated[int, typer.Option(min=1, help="silo strategies: local steps per round")] = 20,
    batch_size: Annotated[int, typer.Option(min=1, help="silo strategies: windows per local step and client")] = (
        shipped.BATCH),
    lr: Annotated[float, typer.Option(help="silo strategies: peak AdamW lr (reached over the "
                                      "first round, cosine decay after)")] = shipped.LR,
    synthetic_share: Annotated[float, typer.Option(help="silo strategies: share of KernelSynth/TSMixup windows (their "
                                                   "own silo), in [0, 1); 0: real data only")]
    = shipped.SHARE,
    keep_optimizer: Annotated[bool, typer.Option(help="silo strategies: clients keep their AdamW state between rounds "
                                                 "(a cross-silo client can; a device need not)")] = False,
    hparam: Annotated[str, typer.Option(help="silo strategies: the strategy's hyper-parameters, e.g. 'mu=0.1' "
                                        "(fedprox), 'weight_power=0' (any silo strategy: every silo weighted alike), "
                                        "'balanced=true' (centralized)")] = "",
    out: Annotated[Path, typer.Option(help="checkpoint file (etth1) or folder (silo strategies)")] = Path(
        "runs/tsfm.pt"),
    steps: Annotated[int, typer.Option(min=1, help="optimiser steps; validation MSE peaks at 200-500")] = 600,
    size: Annotated[str, typer.Option(help="tiny | small")] = "tiny",
    data_dir: Annotated[str | None, typer.Option()] = None,
    threads: Annotated[int | None, typer.Option(min=1)] = None,
    seed: int = 0,
) -> None:
    """Pretrain the TSFM: centrally on ETTh1's training split, or across domain silos with a federated
    strategy (checkpointed every round, resumed when the checkpoint exists)."""
    from coordinator.models.checkpoints import save_checkpoint
    from coordinator.models.tsfm import TSFMConfig
    from coordinator.pretrain.evaluate import evaluate_ett
    from coordinator.pretrain.training import train_tsfm

    if size not in ("tiny", "small"):
        _fail(f"--size must be tiny or small, not {size!r}")
    if strategy == "shipped":
        folder = out if out.suffix != ".pt" else out.with_suffix("")
        try:
            shipped.reproduce(folder, data_dir=data_dir, threads=threads, console=console)
        except (ValueError, FileNotFoundError) as exc:
            _fail(str(exc))
        return
    if strategy != "etth1":
        from coordinator.pretrain.federated import pretrain_command

        try:
            hparams = parse_hparams(strategy, hparam)  # also refuses an unknown strategy
        except (KeyError, ValueError) as exc:
            _fail(str(exc))
        if not (lr > 0 and math.isfinite(lr)):
            _fail(f"--lr must be a positive number, not {lr}")
        if not 0.0 <= synthetic_share < 1.0:
            _fail(f"--synthetic-share must be in [0, 1), not {synthetic_share}")
        folder = out if out.suffix != ".pt" else out.with_suffix("")
        pretrain_command(strategy, rounds=rounds, local_steps=local_steps, batch_size=batch_size, lr=lr,
                         synthetic_share=synthetic_share, keep_optimizer=keep_optimizer, hparams=hparams, size=size,
                         seed=seed, out_dir=folder, data_dir=data_dir, threads=threads, console=console)
        return
    cfg = TSFMConfig.tiny() if size == "tiny" else TSFMConfig.small()
    result = train_tsfm(cfg, steps=steps, data_dir=data_dir, threads=threads, seed=seed, progress=True)
    save_checkpoint(result.model, out)
    scores = evaluate_ett(result.model, split="test", data_dir=data_dir)
    console.print(f"saved {out}; ETTh1 test (H={cfg.horizon}, L={cfg.context}): "
                  + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))


@app.command()
def export(
    checkpoint: Annotated[Path | None, typer.Argument(
        help="checkpoint written by `fedge pretrain`; omitted: the model shipped with fedge (its ONNX fp32/int8 and "
             "TFLite files are copied, sha256-checked, no conversion needed)")] = None,
    out: Annotated[Path, typer.Option(help="output folder")] = Path("runs/model"),
    fmt: Annotated[str, typer.Option("--format", help="onnx | tflite (adds backbone.tflite and backbone.int8.tflite "
                                     "for LiteRT devices to the ONNX files; builds its conversion env on first use)")]
    = "onnx",
) -> None:
    """Export a checkpoint to ONNX (backbone, head) with a parity check against torch, optionally TFLite too.
    Without a checkpoint, write the shipped model's exported files."""
    if fmt not in ("onnx", "tflite"):
        _fail(f"--format must be onnx or tflite, got {fmt!r}")
    if checkpoint is None:
        try:
            files = shipped.copy_device_files(out)
        except (ValueError, OSError) as exc:
            _fail(str(exc))
        console.print(f"wrote the shipped model {shipped.VERSION} to {out}: "
                      + ", ".join(f"{p.name} ({p.stat().st_size / 1024:.0f} KB)" for p in files))
        return
    from coordinator.models.checkpoints import load_checkpoint
    from export.onnx_export import export_model

    try:
        model = load_checkpoint(checkpoint)
    except (ValueError, FileNotFoundError) as exc:
        _fail(str(exc))
    result = export_model(model, out)
    console.print(f"wrote {out}: parity {result.parity}")
    if fmt == "tflite":
        from export.tflite_export import export_tflite

        try:
            tfl = export_tflite(model, out)
        except RuntimeError as exc:
            _fail(str(exc))
        for name, path in tfl.paths.items():
            console.print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KB): parity {tfl.parity[name]}")


GIL_SWITCH_S = 0.0005


def _short_gil_slices() -> None:
    """A coordinator's network thread and batch writer release the GIL on every socket call and SQLite statement
    and must then wait for the other to hand it back; with Python's default 5 ms switch interval that wait, not
    SQLite, was most of the writer's time at 1,000 devices (4.7 s in transactions over 3 rounds; 2.6 s at 0.5 ms)."""
    sys.setswitchinterval(GIL_SWITCH_S)


@app.command()
def serve(
    init_head: Annotated[Path | None, typer.Option(
        help="head.npz from `fedge export` (the initial global head); default: the shipped model's")] = None,
    db: Annotated[str, typer.Option(help="fleet state: a SQLite file, or a postgresql://user@host/db URL; reuse it "
                                         "to resume")] = "runs/fleet.sqlite",
    broker: Annotated[str, typer.Option(help="host:port, mqtt://…, mqtts://host:8883 (TLS) or "
                                          "mqtt3://… (MQTT 3.1.1)")] = "127.0.0.1:1883",
    fleet: Annotated[str, typer.Option(help="the fleet (default: the fleet folder's, else 'default')")] = "",
    fleet_dir: Annotated[Path | None, typer.Option(help="fleet folder from `fedge fleet init`: TLS with the "
                                                   "coordinator's certificate, enrolled devices only, signed "
                                                   "messages")] = None,
    rounds: Annotated[int, typer.Option(min=1, help="run until this many rounds are closed in the DB")] = 10,
    min_devices: Annotated[int, typer.Option(min=1)] = 2,
    fraction: Annotated[float, typer.Option(min=0.01, max=1.0)] = 1.0,
    deadline: Annotated[float, typer.Option(min=1.0, help="seconds per round")] = 120.0,
    horizon: Annotated[int, typer.Option(min=1)] = 24,
    local_epochs: Annotated[int, typer.Option(min=1)] = 2,
    lr: Annotated[float, typer.Option(min=1e-6, max=1.0)] = 3e-3,
    strategy: Annotated[str, typer.Option(help="fedavg | fedprox | trimmed_mean | median | krum | task_vector | "
                                               "prototype")] = "fedavg",
    personalize: Annotated[str, typer.Option(help="device methods, e.g. 'rank=4,self_distill=0.5,gate,rules'")] = "",
    upload_dtype: Annotated[str, typer.Option(help="how devices send deltas: float16 | float32 | int8 (one scale per "
                                                   "tensor) | topk (top 20 %, int8, error feedback)")] = "float16",
    clip_norm: Annotated[float | None, typer.Option(min=0.0, help="absolute norm bound on top of the adaptive one")
                         ] = None,
    norm_multiple: Annotated[float, typer.Option(min=0.0, help="clip each update to this multiple of the round's "
                                                 "median norm (0: off)")] = 2.0,
    weight_multiple: Annotated[float, typer.Option(min=0.0, help="an update counts at most this multiple of the "
                                                   "round's median sample count (0: off)")] = 2.0,
    max_samples: Annotated[int, typer.Option(min=1, help="the fleet's ceiling on one update's sample count")
                           ] = 1_000_000,
    wait_devices: Annotated[float, typer.Option(help="seconds to wait for min-devices to say hello")] = 60.0,
    metrics_bind: Annotated[str | None, typer.Option(help="host:port for Prometheus metrics (GET /metrics); "
                                                     "off unless given")] = None,
    ui: Annotated[bool, typer.Option("--ui/--no-ui", help="serve the fleet dashboard while the rounds run")] = False,
    ui_bind: Annotated[str, typer.Option(help="host:port of the dashboard; any address but loopback needs a "
                                         "token")] = "127.0.0.1:8750",
    ui_token: Annotated[str | None, typer.Option(envvar="FEDGE_UI_TOKEN", help="the dashboard's token (default: "
                                                 "none on loopback, a random one otherwise)")] = None,
    ingest_workers: Annotated[int, typer.Option(min=0, max=64, help="store updates in this many `fedge ingest` "
                                                "processes (MQTT v5 shared subscription); 0: in this process")] = 0,
    keep_rounds: Annotated[int, typer.Option(min=0, help="retention: keep the device updates' payloads (deltas) of "
                                             "the newest this many finished rounds; older ones keep only their "
                                             "metrics (0: drop each round's payloads once it is aggregated)")] = 1000,
    dp: Annotated[str, typer.Option(help="differential privacy: off | central (the coordinator adds the noise) | "
                                    "distributed (each device adds its share)")] = "off",
    dp_noise: Annotated[float | None, typer.Option(min=0.0, help="DP noise multiplier z (std of the round's noise "
                                                   "= z·clip); default: calibrated so that --rounds rounds spend "
                                                   "--dp-epsilon-budget")] = None,
    dp_clip: Annotated[float, typer.Option(min=1e-9, help="DP: L2 bound of one device's delta (the start value "
                                           "with --dp-adaptive-clip)")] = 0.1,
    dp_delta: Annotated[float | None, typer.Option(min=1e-12, max=0.5, help="DP: δ of the reported ε "
                                                   "(default 1/known devices)")] = None,
    dp_epsilon_budget: Annotated[float | None, typer.Option(min=0.0, help="DP: stop training before ε would "
                                                            "exceed this")] = None,
    dp_adaptive_clip: Annotated[float | None, typer.Option(min=0.01, max=0.99, help="DP (central): adapt the clip "
                                                           "to this quantile of the update norms (Andrew et al.)")
                                ] = None,
    secagg: Annotated[bool, typer.Option("--secagg/--no-secagg", help="secure aggregation (SecAgg+): the "
                                         "coordinator learns only the sum of each round's updates")] = False,
    secagg_range: Annotated[float, typer.Option(min=1e-6, help="secure aggregation: deltas are clipped to ± this "
                                                "per coordinate before the fixed-point encoding")] = 0.5,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = True,
) -> None:
    """Coordinate federated rounds for real devices. Killed and restarted with the same --db, it
    resumes the open round and keeps every update it already had. Ctrl-C or SIGTERM stops it within a
    second: a round that is collecting updates stays open (what arrived is committed) and resumes next time."""
    import numpy as np

    from coordinator.fleet.aggregation import Bounds
    from coordinator.fleet.privacy import PrivacyBudgetSpent
    from coordinator.fleet.registry import DeviceRegistry
    from coordinator.fleet.server import FleetConfig, FleetCoordinator, check_private_strategy
    from coordinator.fleet.state import FleetState
    from coordinator.fleet.strategies import fleet_strategy
    from edge_client.learning.head import HEAD_KEYS, slice_head
    from edge_client.learning.residual import LAG_KEY
    from edge_client.wire.mqtt import BrokerAddress

    _logging(verbose)
    _short_gil_slices()
    if init_head is None:
        try:
            init_head = shipped.artifact_dir() / "head.npz"
        except FileNotFoundError as exc:
            _fail(str(exc))
        console.print(f"initial head: the shipped model {shipped.VERSION} ({init_head})")
    try:
        address = BrokerAddress.parse(broker)
        registry = DeviceRegistry(fleet_dir) if fleet_dir is not None else None
        if registry is not None:
            fleet = fleet or registry.fleet
            address = address.with_identity(fleet_dir / "ca.crt", fleet_dir / "coordinator.crt",
                                            fleet_dir / "coordinator.key")
        fleet = fleet or "default"
        fleet_strategy(strategy)
        from edge_client.daemon.client import UPLOAD_DTYPES

        if upload_dtype not in UPLOAD_DTYPES:
            raise ValueError(f"unknown --upload-dtype {upload_dtype!r}; choose {', '.join(UPLOAD_DTYPES)}")
        cfg = FleetConfig(fleet=fleet, min_devices=min_devices, fraction=fraction, deadline_s=deadline,
                          local_epochs=local_epochs, lr=lr, strategy=strategy, clip_norm=clip_norm,
                          personalize=parse_personalize(personalize), upload_dtype=upload_dtype,
                          bounds=Bounds(norm_multiple or None, weight_multiple or None, max_samples),
                          shared_ingest=ingest_workers > 0, keep_rounds=keep_rounds, secagg=secagg,
                          secagg_range=secagg_range,
                          dp=dp_config(dp, dp_noise, dp_clip, dp_delta, dp_epsilon_budget, dp_adaptive_clip,
                                       rounds, fraction, min_devices))
        check_private_strategy(cfg)
        if ingest_workers and (address.mqtt311 or registry is not None):
            raise ValueError("--ingest-workers needs MQTT v5 shared subscriptions (not mqtt3://) and, for now, no "
                             "--fleet-dir (the workers do not sign or verify yet)")
        with np.load(init_head, allow_pickle=False) as data:
            if LAG_KEY in data.files:  # taking HEAD_KEYS alone would silently drop its lag block
                raise ValueError(f"{init_head} is a residual head (a lag block beside the features, e.g. "
                                 "head.etth1.npz); the fleet trains feature heads only: give head.npz")
            head = {k: data[k] for k in HEAD_KEYS}
        initial = slice_head(head, horizon)
        spec_file = init_head.with_name("spec.json")
        spec = json.loads(spec_file.read_text()) if spec_file.is_file() else {}
    except (ValueError, KeyError, OSError) as exc:
        _fail(f"cannot start: {exc}")
    if cfg.dp is not None:
        console.print(f"differential privacy: {cfg.dp.placement} noise z = {cfg.dp.noise_multiplier:.3g}, clip "
                      f"{cfg.dp.clip:g}{' (adaptive)' if cfg.dp.adaptive else ''}, budget ε = {cfg.dp.epsilon_budget}")
    state = FleetState(db)
    started = time.time()
    workers = [subprocess.Popen([sys.executable, "-c", "from coordinator.cli import app; app()", "ingest", "--db", db,
                                 "--broker", broker, "--fleet", fleet, "--index", str(i)])
               for i in range(ingest_workers)]
    coordinator = FleetCoordinator(cfg, address, state, registry=registry)
    dashboard = None
    try:
        if metrics_bind:
            from coordinator.fleet.metrics import FleetMetrics, serve_metrics

            host, port = parse_bind(metrics_bind)
            serve_metrics(FleetMetrics(coordinator), host, port)
            console.print(f"metrics: http://{metrics_bind}/metrics")
        if ui:
            from coordinator.dashboard.app import start_dashboard

            dashboard = start_dashboard(Path(db), *parse_bind(ui_bind), ui_token, live=coordinator, fleet=fleet)
            console.print(f"dashboard: {dashboard.url}")
        coordinator.start()
    except (ConnectionError, OSError, RuntimeError, ValueError) as exc:
        _stop_all(workers)
        _fail(str(exc))
    from coordinator.fleet.server import RoundInterrupted

    def stop_on_signal(signum: int, _frame: object) -> None:  # the round loop notices within half a second
        coordinator.request_stop()

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, stop_on_signal)
    try:
        sha = spec.get("files", {}).get("backbone.onnx", {}).get("sha256", "")
        coordinator.ensure_model(initial, {"backbone_sha256": sha, "backbone_id": str(spec.get("model_id", ""))})
        # updates published before any worker subscribed would match no subscription: wait for all of them
        while len(state.subscribed_since(started)) < ingest_workers:
            if time.time() - started > 120 or any(w.poll() is not None for w in workers):
                _fail(f"{len(state.subscribed_since(started))} of {ingest_workers} ingest workers subscribed")
            time.sleep(0.2)
        while state.finished_rounds() < rounds and not coordinator.stop_requested:
            if not coordinator.state.open_rounds(cfg.task):
                online = coordinator.wait_for_devices(min_devices, wait_devices)
                if coordinator.stop_requested:
                    break
                if len(online) < min_devices:
                    _fail(f"only {len(online)} of {min_devices} devices said hello within {wait_devices:.0f} s")
            try:
                res = coordinator.run_round("train")
            except PrivacyBudgetSpent as exc:
                console.print(f"[bold]{exc}[/bold]: training stops here")
                break
            except RoundInterrupted as exc:
                console.print(f"stopped by a signal: {exc}")
                break
            console.print(f"round {res.round_id} {res.state}: {len(res.metrics)}/{len(res.selected)} updates, "
                          f"v{res.base_version} -> v{res.new_version}, {res.bytes_up / 1024:.1f} KB up, "
                          f"{res.seconds:.1f} s{' (resumed)' if res.resumed else ''}"
                          + (f", ε = {res.epsilon:.3g}" if res.epsilon is not None else ""))
    finally:
        if dashboard is not None:
            dashboard.stop()
        coordinator.stop()
        _stop_all(workers)
        state.close()


def parse_bind(text: str) -> tuple[str, int]:
    """'host:port' (IPv6 as '[::1]:8750') -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"expected host:port, got {text!r}")
    return host.strip("[]"), int(port)


@app.command()
def dashboard(
    db: Annotated[Path, typer.Option(help="the fleet database `fedge serve` writes (read only here)")] = Path(
        "runs/fleet.sqlite"),
    bind: Annotated[str, typer.Option(help="host:port; any address but loopback needs a token")] = "127.0.0.1:8750",
    token: Annotated[str | None, typer.Option(envvar="FEDGE_UI_TOKEN", help="default: none on loopback, a random "
                                              "one otherwise")] = None,
    task: Annotated[str, typer.Option()] = "tsfm",
) -> None:
    """Serve the read-only fleet dashboard for a fleet database until Ctrl-C (rejects by reason are counted
    by the running coordinator: see them with `fedge serve --ui`)."""
    from coordinator.dashboard.app import start_dashboard

    try:
        server = start_dashboard(db, *parse_bind(bind), token, task=task, background=False)
    except (FileNotFoundError, ValueError, OSError) as exc:
        _fail(str(exc))
    console.print(f"dashboard: {server.url}  (Ctrl-C stops it)")
    server.run()


def _stop_all(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()


@app.command()
def ingest(
    db: Annotated[str, typer.Option(help="the fleet database `fedge serve` uses (SQLite file or postgresql:// URL)")],
    broker: Annotated[str, typer.Option(help="host:port of the MQTT v5 broker")] = "127.0.0.1:1883",
    fleet: Annotated[str, typer.Option()] = "default",
    index: Annotated[int, typer.Option(min=0, help="this worker's number (its MQTT client id and sum row)")] = 0,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Store a fleet's updates as one of several workers on an MQTT v5 shared subscription, beside one
    `fedge serve --ingest-workers` (or on other hosts, with a PostgreSQL database). Runs until SIGTERM."""
    from coordinator.fleet.ingest_worker import run_worker
    from edge_client.wire.mqtt import BrokerAddress

    _logging(verbose)
    _short_gil_slices()
    try:
        run_worker(db, BrokerAddress.parse(broker), fleet, index)
    except (ValueError, ConnectionError) as exc:
        _fail(str(exc))


@app.command()
def status(db: Annotated[str, typer.Option(help="SQLite file or postgresql:// URL")] = "runs/fleet.sqlite") -> None:
    """Show rounds and devices recorded in a fleet database."""
    from coordinator.fleet.state import FleetState, is_postgres

    if not is_postgres(db) and not Path(db).is_file():
        _fail(f"no fleet database at {db}")
    state = FleetState(db)
    t = Table(title="devices")
    for c in ("device", "domain", "runtime", "state", "windows"):
        t.add_column(c)
    for dev, info in state.devices().items():
        t.add_row(dev, info["domain"] or "", info["runtime"] or "", info["state"], str(info["n_train"]))
    console.print(t)
    r = Table(title="rounds")
    for c in ("round", "kind", "state", "base", "new", "updates", "selected"):
        r.add_column(c)
    for rid in range(1, state.next_round_id()):
        rec = state.round(rid)
        r.add_row(str(rid), rec.kind, rec.state, str(rec.base_version), str(rec.new_version),
                  str(len(state.reported(rid))), str(len(rec.selected)))
    console.print(r)
    ledger = state.privacy_ledger()
    if ledger:
        p = Table(title="privacy (user-level DP-FedAvg; ε after each round, RDP accountant of dp-accounting)")
        for c in ("round", "placement", "noise z", "sampled q", "clip C", "ε", "δ"):
            p.add_column(c)
        for row in ledger:
            p.add_row(str(row.round_id), row.placement, f"{row.noise_multiplier:.3g}", f"{row.sampling_rate:.3g}",
                      f"{row.clip:.3g}", f"{row.epsilon:.3g}", f"{row.delta:.2g}")
        console.print(p)
        console.print(f"privacy spent: ε = {ledger[-1].epsilon:.3g} at δ = {ledger[-1].delta:.2g}")


@app.command()
def loadtest(
    devices: Annotated[int, typer.Option(min=1, max=100_000, help="emulated devices")] = 100,
    rounds: Annotated[int, typer.Option(min=1, max=100)] = 3,
    procs: Annotated[int, typer.Option(min=0, max=64, help="device processes (0: one per 2,500 devices, >= 2)")] = 0,
    broker: Annotated[str, typer.Option(help="mosquitto (a private one sized for the run) | host:port")]
    = "mosquitto",
    state: Annotated[str, typer.Option(help="fleet database: empty for SQLite in --out, or a postgresql:// URL")] = "",
    deadline: Annotated[float, typer.Option(min=1.0, help="seconds per round")] = 300.0,
    local_epochs: Annotated[int, typer.Option(min=1, max=50)] = 1,
    out: Annotated[Path, typer.Option(help="work folder: fleet database, coordinator log, result JSON")]
    = Path("runs/loadtest"),
    data_dir: Annotated[str | None, typer.Option()] = None,
    secure: Annotated[bool, typer.Option("--secure", help="a secure fleet: device identities from a fleet CA (cached "
                                         "in --out), TLS with client certificates, the fleet's ACL, signed messages")]
    = False,
    seed: int = 0,
) -> None:
    """Measure a fleet: N emulated devices (each its own MQTT session, identity and data slice, training a real
    head) against a real broker and a real `fedge serve`; time to online, round times, ingestion, CPU, memory,
    bytes, lost and duplicated updates."""
    from coordinator.loadtest.harness import LoadConfig, result_dict, run_loadtest

    _logging(False)
    cfg = LoadConfig(devices=devices, rounds=rounds, procs=procs, broker=broker, state=state, deadline_s=deadline,
                     local_epochs=local_epochs, work_dir=out, data_dir=data_dir, secure=secure, seed=seed)
    try:
        result = run_loadtest(cfg, progress=lambda text: console.print(f"[dim]{text}[/dim]"))
    except (RuntimeError, ValueError, ConnectionError, FileNotFoundError) as exc:
        _fail(str(exc))
    s = result.summary()
    if secure:
        console.print(f"[dim]{result.enrolled_now} identities enrolled now in {result.enrol_s:.1f} s "
                      f"(the rest from the cache)[/dim]")
    t = Table(title=f"fedge loadtest: {devices} devices, {result.rounds_done} rounds ({result.broker}, "
                    f"{result.state_backend}, {result.procs} device processes)")
    for col in ("online s", "round p50 s", "p95 s", "max s", "updates/s", "coord CPU s", "broker CPU s",
                "devices CPU s", "coord RSS MB", "broker RSS MB", "KB/round", "lost", "dup"):
        t.add_column(col, justify="right")
    t.add_row(f"{s['online_s']:.1f}", f"{s['round_p50_s']:.2f}", f"{s['round_p95_s']:.2f}", f"{s['round_max_s']:.2f}",
              f"{s['ingest_per_s']:.0f}", f"{s['coordinator_cpu_s']:.1f}", f"{s['broker_cpu_s']:.1f}",
              f"{s['devices_cpu_s']:.1f}", f"{s['coordinator_peak_rss_mb']:.0f}",
              f"{s['broker_peak_rss_mb']:.0f}", f"{s['bytes_per_round'] / 1024:.0f}", str(s["lost"]),
              str(s["duplicated"]))
    console.print(t)
    out.mkdir(parents=True, exist_ok=True)
    name = f"loadtest-{devices}{'-secure' if secure else ''}.json"
    (out / name).write_text(json.dumps(result_dict(result), indent=2, default=str))
    if s["lost"] or s["duplicated"]:
        _fail(f"{s['lost']} lost and {s['duplicated']} duplicated updates")


def main() -> None:  # pragma: no cover - console script entry
    sys.exit(app())
