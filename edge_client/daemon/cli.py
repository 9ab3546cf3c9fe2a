"""`fedge-edge`: the device daemon.

    fedge-edge run --config device.toml        join the fleet and answer rounds until SIGTERM
    fedge-edge info --config device.toml       check model, data and config without connecting
    fedge-edge status --config device.toml     what the device's store holds, without connecting
    fedge-edge forget-me --config device.toml  delete the personal state (and, with --samples, the data)

Runs with numpy + onnxruntime + paho-mqtt + msgpack + pydantic only: no torch anywhere on this path.
The long-running part is :class:`edge_client.daemon.service.DeviceService`; this module is the command line.
"""

from __future__ import annotations

import datetime as dt
import logging
import signal
import threading
from pathlib import Path
from typing import Annotated

import typer

from edge_client.daemon.config import DeviceConfig

app = typer.Typer(help="fedge edge device daemon.", no_args_is_help=True, add_completion=False,
                  pretty_exceptions_enable=False)
log = logging.getLogger("fedge.daemon")

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="device TOML file")]


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def _config(config: Path, level: str) -> DeviceConfig:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return DeviceConfig.from_toml(config)
    except ValueError as exc:
        _fail(str(exc))
        raise  # unreachable; keeps type checkers quiet


def _setup(config: Path, level: str):  # type: ignore[no-untyped-def]
    """Config, a learner on the device's history and its domain, for `info`."""
    from edge_client.daemon.store import DB_NAME, DeviceStore
    from edge_client.learning.learner import DeviceLearner, SplitConfig
    from edge_client.runtime.backbone import ModelLoadError

    cfg = _config(config, level)
    try:
        from edge_client.daemon.service import bundle_store, device_backbone

        runner, _ = device_backbone(cfg, bundle_store(cfg))
        if runner is None:
            raise ModelLoadError(f"no backbone yet: no bundle installed in {cfg.bundle.dir if cfg.bundle else '-'}")
        if cfg.data.kind in ("dataset", "csv"):
            series, season, domain = cfg.data.load()
        elif (cfg.state_path() / DB_NAME).is_file():
            with DeviceStore(cfg.state_path()) as store:
                series, season, domain = store.series(cfg.max_history), cfg.data.season or 24, cfg.data.kind
        else:
            raise ValueError(f"no readings yet: a {cfg.data.kind} source fills {cfg.state_path()} once running")
        learner = DeviceLearner(runner, series, season=season, split=SplitConfig(
            horizon=cfg.horizon, eval_fraction=cfg.eval_fraction, max_train_windows=cfg.max_train_windows))
    except (ValueError, KeyError, FileNotFoundError, ModelLoadError) as exc:
        _fail(str(exc))
    return cfg, learner, domain


@app.command()
def info(config: ConfigOpt, log_level: str = "warning") -> None:
    """Load the model and the device's data and print what the device would train on."""
    cfg, learner, domain = _setup(config, log_level)
    spec = learner.backbone.spec
    typer.echo(f"device {cfg.device_id} (fleet {cfg.fleet}, profile {cfg.profile}, domain {domain})")
    typer.echo(f"backbone {learner.backbone.path}: {learner.backbone.runtime}, context {spec.context}, "
               f"{spec.feature_dim} features, sha256 {learner.backbone.sha256[:16]}")
    typer.echo(f"windows: {learner.n_train} train, {learner.n_eval} held back; horizon {cfg.horizon}; "
               f"features in {learner.feature_seconds:.2f} s")
    base = learner.baseline_metrics()
    typer.echo(f"seasonal naive on the held-back window: MSE {base['naive_mse']:.4f}, MAE {base['naive_mae']:.4f}")


@app.command()
def run(
    config: ConfigOpt,
    max_rounds: Annotated[int, typer.Option(min=0, help="exit after this many updates (0: run until stopped)")] = 0,
    log_level: str = "info",
) -> None:
    """Join the fleet and answer round tasks until SIGTERM/SIGINT (or --max-rounds updates).

    A broker that is down is retried with backoff; updates wait in the store's outbox."""
    from edge_client.daemon.service import DeviceService, StateDirBusy
    from edge_client.runtime.backbone import ModelLoadError

    cfg = _config(config, log_level)
    try:
        broker = cfg.broker_address()
        service = DeviceService(cfg, broker)
    except (ValueError, StateDirBusy, OSError) as exc:
        _fail(str(exc))
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        sent = service.run(stop, max_rounds)
    except (ValueError, KeyError, OSError, ModelLoadError) as exc:  # OSError: e.g. the metrics port is taken
        service.close()
        _fail(str(exc))
    log.info("device %s stopping after %d updates", cfg.device_id, sent)
    service.close()
    log.info("device %s stopped", cfg.device_id)


def _when(ts: float | None) -> str:
    if not ts:
        return "-"
    return dt.datetime.fromtimestamp(float(ts)).isoformat(sep=" ", timespec="seconds")


@app.command()
def status(config: ConfigOpt) -> None:
    """Print what the device's store holds (readings, rounds, outbox, personal state, bundles)."""
    from rich.console import Console
    from rich.table import Table

    from edge_client.daemon.service import state_dir_busy
    from edge_client.daemon.status import status_rows

    cfg = _config(config, "warning")
    state = cfg.state_path()
    table = Table(title=f"fedge-edge {cfg.device_id} (fleet {cfg.fleet})", show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    table.add_row("state dir", f"{state} ({'daemon running' if state_dir_busy(state) else 'no daemon running'})"
                  if state.is_dir() else f"{state} (empty: the daemon has not run yet)")
    for key, value in status_rows(cfg, _when):
        table.add_row(key, value)
    Console(width=120).print(table)


@app.command("forget-me")
def forget_me(
    config: ConfigOpt,
    samples: Annotated[bool, typer.Option("--samples", help="also delete the stored readings")] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="do not ask for confirmation")] = False,
    local_only: Annotated[bool, typer.Option("--local-only", help="do not ask the coordinator to delete what it "
                                             "stored from this device")] = False,
) -> None:
    """Delete this device's personal state: personal head, stored updates (outbox), round history,
    and with --samples the readings too; then ask the coordinator (over the broker) to delete the
    updates, prototypes and registration it stored from this device. The daemon must be stopped first."""
    from edge_client.daemon.service import state_dir_busy
    from edge_client.daemon.status import forget, tell_coordinator
    from edge_client.daemon.store import DB_NAME

    cfg = _config(config, "warning")
    state = cfg.state_path()
    has_store = (state / DB_NAME).is_file()
    if has_store and state_dir_busy(state):
        _fail(f"a fedge-edge daemon is using {state}; stop it first (e.g. systemctl stop fedge-edge)")
    what = ("personal head, outbox and round history" + (", and all stored readings" if samples else "")
            if has_store else "")
    if not local_only:
        what += (" and " if what else "") + f"what the coordinator of fleet {cfg.fleet} stored from this device"
    if not what:
        typer.echo(f"nothing to delete: no store in {state}")
        return
    if not yes and not typer.confirm(f"Delete the {what} of {cfg.device_id}?"):
        typer.echo("nothing deleted")
        raise typer.Exit(1)
    if has_store:
        for line in forget(state, samples=samples):
            typer.echo(line)
    else:
        typer.echo(f"no store in {state}: nothing kept on this device")
    if not local_only:
        try:
            typer.echo(tell_coordinator(cfg))
        except (ConnectionError, ValueError) as exc:
            log.error("forget-me: the coordinator was not told: %s", exc)
            typer.echo(f"error: the coordinator was not told ({exc}); run `fedge-edge forget-me` again when the "
                       "broker is reachable (what is on this device is already deleted)", err=True)
            raise typer.Exit(1) from None
