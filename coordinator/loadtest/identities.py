"""Identities for the load harness's secure mode: one fleet CA and N enrolled devices, cached in the work folder.

Why a cache: enrolling is what `fedge fleet enroll` does for each device (an ed25519 key, a certificate from the
fleet CA, the coordinator's registry entry and the bundle the device installs): a few milliseconds each, half a
minute at 10,000 devices, and the same for every rerun. The fleet folder is kept in the work folder and only the
devices it lacks are enrolled; a folder of another fleet, or one with revoked devices, is made again from scratch.
The keys are the project's (ed25519, the cheapest to make, sign and verify), not a load-test shortcut.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path

from coordinator.fleet.pki import FleetPKI


def enrolled_fleet(folder: Path, fleet: str, device_ids: Sequence[str]) -> tuple[FleetPKI, int]:
    """The fleet folder in `folder` with every device in `device_ids` enrolled; returns it and how many devices
    were enrolled now (0 when the cache held them all)."""
    pki = FleetPKI(folder)
    try:
        usable = pki.fleet == fleet and not pki.revoked() and (folder / "ca.key").is_file()
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        usable = False
    if not usable:
        shutil.rmtree(folder, ignore_errors=True)
        pki.init(fleet)
    have = {p.stem for p in (folder / "devices").glob("*.crt")}
    missing = [d for d in device_ids if d not in have or not (folder / "enroll" / d / f"{d}.key").is_file()]
    for device_id in missing:
        pki.enroll(device_id)
    return pki, len(missing)
