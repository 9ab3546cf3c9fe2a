"""`fedge fleet` and `fedge broker`: identities and the broker configuration of a fleet on a real network.

    fedge fleet init    --dir fleet/ --fleet plant-7 --host mqtt.plant7.example --host 192.0.2.10
    fedge fleet enroll  meter-17 --dir fleet/ [--max-samples 5000] [--out meter-17/]   the folder a device installs
    fedge fleet revoke  meter-17 --dir fleet/ [--broker-pid /var/lib/fedge-broker/mosquitto.pid]
    fedge broker config --dir fleet/ --out /etc/mosquitto/conf.d/fedge/ [--port 8883] [--devices 1000]

docs/security.md says what each piece stops; hardware/INSTALL.md walks through a deployment.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

fleet_app = typer.Typer(help="The fleet's CA: device identities, enrollment, revocation.", no_args_is_help=True,
                        add_completion=False, pretty_exceptions_enable=False)
broker_app = typer.Typer(help="Mosquitto configuration for a fleet: TLS, client certificates, ACL.",
                         no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
console = Console()


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


FleetDir = Annotated[Path, typer.Option("--dir", help="the fleet folder (CA, coordinator identity, enrolled devices)")]


@fleet_app.command()
def init(
    fleet: Annotated[str, typer.Option(help="the fleet's name (a topic level)")],
    directory: FleetDir = Path("fleet"),
    host: Annotated[list[str] | None, typer.Option(help="a name or address devices reach the broker by "
                                                   "(repeat); default localhost and 127.0.0.1")] = None,
    max_samples: Annotated[int, typer.Option(min=1, help="the fleet's ceiling on one update's sample count")]
    = 1_000_000,
) -> None:
    """Create the fleet CA, the coordinator's identity and the broker's certificate."""
    from coordinator.fleet.pki import FleetPKI

    try:
        FleetPKI(directory).init(fleet, tuple(host or ("localhost", "127.0.0.1")), max_samples)
    except (FileExistsError, ValueError) as exc:
        _fail(str(exc))
    console.print(f"fleet {fleet}: CA, coordinator and broker identities in {directory} (keep ca.key offline if you "
                  "can; set FEDGE_KEY_PASSPHRASE to encrypt the keys)")


@fleet_app.command()
def enroll(
    device_id: Annotated[str, typer.Argument(help="the device id (the certificate's common name)")],
    directory: FleetDir = Path("fleet"),
    max_samples: Annotated[int | None, typer.Option(min=1, help="the most samples this device's updates may count "
                                                    "for (default: the fleet's ceiling)")] = None,
    out: Annotated[Path | None, typer.Option(help="where to write the device's bundle (default DIR/enroll/ID)")]
    = None,
) -> None:
    """Issue a device's key and certificate and write the folder the device installs (its `identity`)."""
    from coordinator.fleet.pki import FleetPKI

    try:
        bundle = FleetPKI(directory).enroll(device_id, max_samples, out)
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    console.print(f"enrolled {device_id}: copy {bundle} to the device (e.g. /etc/fedge/identity, mode 0700) and set "
                  "identity = \"/etc/fedge/identity\" and broker = \"mqtts://HOST:8883\" in its device.toml")


@fleet_app.command()
def revoke(
    device_id: Annotated[str, typer.Argument()],
    directory: FleetDir = Path("fleet"),
    broker_pid: Annotated[Path | None, typer.Option(help="the broker's pid file (default DIR/broker/mosquitto.pid)")]
    = None,
) -> None:
    """Revoke a device: the coordinator refuses it at once, the broker after a reload (sent here when it runs)."""
    from coordinator.fleet.pki import FleetPKI

    try:
        told = FleetPKI(directory).revoke(device_id, broker_pid)
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    console.print(f"revoked {device_id}: "
                  + ("the broker reloaded its CRL and ACL" if told else "no running broker was found; reload it "
                     "(SIGHUP) to apply the new CRL and ACL"))


@broker_app.command()
def config(
    directory: FleetDir = Path("fleet"),
    out: Annotated[Path, typer.Option(help="folder for mosquitto.conf, acl, persistence and the pid file")]
    = Path("fleet/broker"),
    port: Annotated[int, typer.Option(min=1, max=65535)] = 8883,
    bind: Annotated[str, typer.Option(help="listen address")] = "0.0.0.0",
    devices: Annotated[int, typer.Option(min=1, help="devices the broker holds sessions for (queue sizes)")] = 1000,
) -> None:
    """Write a production Mosquitto configuration for the fleet (run: mosquitto -c OUT/mosquitto.conf)."""
    from coordinator.fleet.broker_config import BrokerConfig, write_broker_config

    try:
        conf = write_broker_config(directory, out, BrokerConfig(port=port, bind=bind, devices=devices))
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    console.print(f"wrote {conf} and {out / 'acl'}: TLS on {bind}:{port}, client certificates from the fleet CA, "
                  "ACL by certificate name, persistence on")
