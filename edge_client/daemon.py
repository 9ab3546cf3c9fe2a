"""`fedge-edge`: the device daemon.

    fedge-edge run --config device.toml     join the fleet and answer rounds until stopped
    fedge-edge info --config device.toml    check model, data and config without connecting

Runs with numpy + onnxruntime + paho-mqtt + msgpack + pydantic only: no torch anywhere on this path.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from typing import Annotated

import typer

from edge_client.config import DeviceConfig

app = typer.Typer(help="fedge edge device daemon.", no_args_is_help=True, add_completion=False,
                  pretty_exceptions_enable=False)
log = logging.getLogger("fedge.daemon")


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def _setup(config: Path, level: str):  # type: ignore[no-untyped-def]
    from edge_client.learner import DeviceLearner, SplitConfig
    from edge_client.runtime import BackboneRunner, ModelLoadError

    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = DeviceConfig.from_toml(config)
        runner = BackboneRunner(cfg.backbone, threads=cfg.threads)
        series, season, domain = cfg.data.load()
        learner = DeviceLearner(runner, series, season=season, split=SplitConfig(
            horizon=cfg.horizon, eval_fraction=cfg.eval_fraction, max_train_windows=cfg.max_train_windows))
    except (ValueError, KeyError, FileNotFoundError, ModelLoadError) as exc:
        _fail(str(exc))
    return cfg, learner, domain


@app.command()
def info(
    config: Annotated[Path, typer.Option("--config", "-c", help="device TOML file")],
    log_level: str = "warning",
) -> None:
    """Load the model and the device's data and print what the device would train on."""
    cfg, learner, domain = _setup(config, log_level)
    spec = learner.backbone.spec
    typer.echo(f"device {cfg.device_id} (fleet {cfg.fleet}, profile {cfg.profile}, domain {domain})")
    typer.echo(f"backbone {cfg.backbone}: {learner.backbone.runtime}, context {spec.context}, "
               f"{spec.feature_dim} features, sha256 {learner.backbone.sha256[:16]}")
    typer.echo(f"windows: {learner.n_train} train, {learner.n_eval} held back; horizon {cfg.horizon}; "
               f"features in {learner.feature_seconds:.2f} s")
    base = learner.baseline_metrics()
    typer.echo(f"seasonal naive on the held-back window: MSE {base['naive_mse']:.4f}, MAE {base['naive_mae']:.4f}")


@app.command()
def run(
    config: Annotated[Path, typer.Option("--config", "-c", help="device TOML file")],
    max_rounds: Annotated[int, typer.Option(min=0, help="exit after this many updates (0: run until stopped)")] = 0,
    log_level: str = "info",
) -> None:
    """Join the fleet and answer round tasks until SIGTERM/SIGINT (or --max-rounds updates)."""
    from edge_client.client import EdgeClient
    from edge_client.mqtt import BrokerAddress

    cfg, learner, domain = _setup(config, log_level)
    try:
        broker = BrokerAddress.parse(cfg.broker)
    except ValueError as exc:
        _fail(str(exc))
    client = EdgeClient(cfg.device_id, cfg.fleet, learner, broker, profile=cfg.profile, domain=domain, seed=cfg.seed)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        client.start()
    except ConnectionError as exc:
        _fail(str(exc))
    log.info("device %s running (fleet %s, broker %s:%d)", cfg.device_id, cfg.fleet, broker.host, broker.port)
    sent = 0
    while not stop.is_set():
        if client.updates_sent.acquire(timeout=0.5):
            sent += 1
            if max_rounds and sent >= max_rounds:
                break
    log.info("device %s stopping after %d updates", cfg.device_id, sent)
    client.stop(graceful=True)
