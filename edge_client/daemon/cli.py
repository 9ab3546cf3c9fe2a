"""`fedge-edge`: the device daemon.

    fedge-edge run --config device.toml        join the fleet and answer rounds until SIGTERM
    fedge-edge info --config device.toml       check model, data and config without connecting
    fedge-edge status --config device.toml     what the device's store holds, without connecting
    fedge-edge forget-me --config device.toml  delete the personal state (and, with --samples, the data)

Runs with numpy + a backbone runtime (onnxruntime or LiteRT) + paho-mqtt + msgpack + pydantic + cryptography
only: no torch anywhere on this path. The command line is click (typer's own base, ~0.4 MB), not typer: typer
requires rich and pygments (~6 MB), which the device install (<= 100 MB, issue 14) does not carry; the
coordinator's `fedge` CLI keeps typer + rich (the `coordinator` extra). The long-running part is
:class:`edge_client.daemon.service.DeviceService`; this module is the command line.
"""

from __future__ import annotations

import datetime as dt
import logging
import signal
import threading
from pathlib import Path

import click

from edge_client.daemon.config import DeviceConfig

log = logging.getLogger("fedge.daemon")


@click.group(help="fedge edge device daemon.", no_args_is_help=True,
             context_settings={"help_option_names": ["-h", "--help"]})
def app() -> None:
    pass


config_option = click.option("--config", "-c", "config", required=True, type=click.Path(path_type=Path),
                             help="device TOML file")


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    raise click.exceptions.Exit(2)


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
@config_option
@click.option("--log-level", default="warning", show_default=True)
def info(config: Path, log_level: str) -> None:
    """Load the model and the device's data and print what the device would train on."""
    cfg, learner, domain = _setup(config, log_level)
    spec = learner.backbone.spec
    click.echo(f"device {cfg.device_id} (fleet {cfg.fleet}, profile {cfg.profile}, domain {domain})")
    click.echo(f"backbone {learner.backbone.path}: {learner.backbone.runtime}, context {spec.context}, "
               f"{spec.feature_dim} features, sha256 {learner.backbone.sha256[:16]}")
    click.echo(f"windows: {learner.n_train} train, {learner.n_eval} held back; horizon {cfg.horizon}; "
               f"features in {learner.feature_seconds:.2f} s")
    base = learner.baseline_metrics()
    click.echo(f"seasonal naive on the held-back window: MSE {base['naive_mse']:.4f}, MAE {base['naive_mae']:.4f}")


@app.command()
@config_option
@click.option("--max-rounds", type=click.IntRange(min=0), default=0, show_default=True,
              help="exit after this many updates (0: run until stopped)")
@click.option("--log-level", default="info", show_default=True)
def run(config: Path, max_rounds: int, log_level: str) -> None:
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


def key_value_table(title: str, rows: list[tuple[str, str]]) -> str:
    """A titled two-column table in plain text (keys bold on a terminal): the device prints it without rich."""
    width = max(len(k) for k, _ in rows)
    lines = [click.style(title, bold=True), "-" * min(120, max(len(title), *(width + 2 + len(v) for _, v in rows)))]
    lines += [f"{click.style(k.ljust(width), bold=True)}  {v}" for k, v in rows]
    return "\n".join(lines)


@app.command()
@config_option
def status(config: Path) -> None:
    """Print what the device's store holds (readings, rounds, outbox, personal state, bundles)."""
    from edge_client.daemon.service import state_dir_busy
    from edge_client.daemon.status import status_rows

    cfg = _config(config, "warning")
    state = cfg.state_path()
    rows = [("state dir", f"{state} ({'daemon running' if state_dir_busy(state) else 'no daemon running'})"
             if state.is_dir() else f"{state} (empty: the daemon has not run yet)"), *status_rows(cfg, _when)]
    click.echo(key_value_table(f"fedge-edge {cfg.device_id} (fleet {cfg.fleet})", rows))


@app.command("forget-me")
@config_option
@click.option("--samples", is_flag=True, help="also delete the stored readings")
@click.option("--yes", "-y", is_flag=True, help="do not ask for confirmation")
@click.option("--local-only", is_flag=True, help="do not ask the coordinator to delete what it stored from this device")
def forget_me(config: Path, samples: bool, yes: bool, local_only: bool) -> None:
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
        click.echo(f"nothing to delete: no store in {state}")
        return
    if not yes and not click.confirm(f"Delete the {what} of {cfg.device_id}?"):
        click.echo("nothing deleted")
        raise click.exceptions.Exit(1)
    if has_store:
        for line in forget(state, samples=samples):
            click.echo(line)
    else:
        click.echo(f"no store in {state}: nothing kept on this device")
    if not local_only:
        try:
            click.echo(tell_coordinator(cfg))
        except (ConnectionError, ValueError) as exc:
            log.error("forget-me: the coordinator was not told: %s", exc)
            click.echo(f"error: the coordinator was not told ({exc}); run `fedge-edge forget-me` again when the "
                       "broker is reachable (what is on this device is already deleted)", err=True)
            raise click.exceptions.Exit(1) from None
