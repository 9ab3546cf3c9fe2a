"""`fedge bundle`: the coordinator's side of signed model bundles, from the command line.

    fedge bundle keygen  --key keys/coordinator.key          one ed25519 key pair (the .pub goes to devices)
    fedge bundle publish runs/model --key keys/coordinator.key --version 2 --broker host:port --fleet plant-7

Without these a fleet operator would need Python to roll out a new backbone; the device side
(`fedge-edge run` with a ``[bundle]`` table) already fetches, verifies and switches by itself.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

bundle_app = typer.Typer(help="Sign model exports and publish them to a fleet over MQTT.", no_args_is_help=True,
                         add_completion=False, pretty_exceptions_enable=False)
console = Console()
log = logging.getLogger("fedge.bundle")


def _fail(message: str) -> None:
    log.error(message)
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


@bundle_app.command()
def keygen(
    key: Annotated[Path, typer.Option(help="private key file to write (mode 0600); the public key goes to KEY.pub")],
    force: Annotated[bool, typer.Option(help="overwrite an existing key (devices holding the old .pub will "
                                        "refuse every bundle signed with the new one)")] = False,
) -> None:
    """Create the coordinator's ed25519 signing key pair."""
    from export.bundle import generate_key, save_keypair

    if key.exists() and not force:
        _fail(f"{key} exists; refusing to replace a signing key devices may already trust (use --force)")
    pub = save_keypair(generate_key(), key)
    console.print(f"wrote {key} (keep it on the coordinator) and {pub} (install it on every device)")


@bundle_app.command()
def publish(
    export_dir: Annotated[Path, typer.Argument(help="folder written by `fedge export` (spec.json, backbones, head)")],
    key: Annotated[Path, typer.Option(help="the coordinator's private key from `fedge bundle keygen`")],
    version: Annotated[int, typer.Option(min=1, help="bundle version; devices only move forward")],
    broker: Annotated[str, typer.Option(help="host:port")] = "127.0.0.1:1883",
    fleet: str = "demo",
    task: str = "tsfm",
    profile: Annotated[list[str] | None, typer.Option(
        help="compatible device profile (repeat); default: pi4, pi5, jetson-orin-nano")] = None,
    out: Annotated[Path | None, typer.Option(help="where the signed bundle is kept (default EXPORT/bundles/vN)")]
    = None,
    timeout: Annotated[float, typer.Option(min=1.0, help="seconds to wait for the broker's acknowledgements")] = 120.0,
    valid_days: Annotated[float, typer.Option(min=0.0, help="devices refuse the bundle after this many days (0: "
                                              "never); publish a newer version before")] = 365.0,
) -> None:
    """Sign an export as bundle VERSION and publish it (retained chunks + signed manifest)."""
    from cryptography.exceptions import UnsupportedAlgorithm

    from edge_client.wire import ProtocolError, Topics
    from edge_client.wire import mqtt as M
    from export.bundle import DEFAULT_PROFILES, build_bundle, load_private_key, publish_bundle

    try:
        address = M.BrokerAddress.parse(broker)
        topics = Topics(fleet)
        signing_key = load_private_key(key)
        bundle = build_bundle(export_dir, out or export_dir / "bundles" / f"v{version}", version, signing_key,
                              profile or DEFAULT_PROFILES, task=task, fleet=fleet, valid_days=valid_days or None)
    except (ValueError, OSError, ProtocolError, UnsupportedAlgorithm) as exc:
        _fail(str(exc))
    sizes = sum(e.size for e in bundle.manifest.files)
    console.print(f"signed bundle v{version} of {bundle.manifest.model_id}: {len(bundle.manifest.files)} files, "
                  f"{sizes / 1024:.0f} KB, profiles {', '.join(bundle.manifest.profiles)} → {bundle.dir}")
    client = M.make_client(f"fedge-{fleet}-bundle-publisher", mqtt311=address.mqtt311)
    try:
        M.connect(client, address)
    except ConnectionError as exc:
        _fail(str(exc))
    try:
        chunks = publish_bundle(client, topics, bundle, timeout_s=timeout)
    except (RuntimeError, TimeoutError) as exc:
        _fail(f"publishing bundle v{version} failed: {exc}")
    finally:
        client.disconnect()
        client.loop_stop()
    console.print(f"published {chunks} chunks and the signed manifest to {topics.bundle(task)} on {broker}")
