"""Topic names under ``fedge/v1/{fleet}/``, and the identity a topic gives its publisher."""

from __future__ import annotations

import re
from dataclasses import dataclass

TOPIC_ROOT = "fedge/v1"
# a topic level and a file name at once: no '/', '+', '#', and no leading '.' (so never '.' or '..': a bundle chunk
# named '..' was once written outside its folder)
NAME_RE = re.compile(r"^[A-Za-z0-9_\-][A-Za-z0-9_.\-]{0,63}$")


def check_name(value: str, what: str) -> str:
    """Fleet and device ids become topic levels: no '/', '+', '#' or empty levels."""
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise ValueError(f"invalid {what} {value!r}: use 1-64 characters from A-Z a-z 0-9 _ . -, not starting with .")
    return value


@dataclass(frozen=True)
class Topics:
    """Topic names under ``fedge/v1/{fleet}/``."""

    fleet: str

    def __post_init__(self) -> None:
        check_name(self.fleet, "fleet")

    @property
    def root(self) -> str:
        return f"{TOPIC_ROOT}/{self.fleet}"

    def status(self, device_id: str) -> str:
        return f"{self.root}/devices/{check_name(device_id, 'device id')}/status"

    def hello(self, device_id: str) -> str:
        return f"{self.root}/devices/{check_name(device_id, 'device id')}/hello"

    def task(self, device_id: str) -> str:
        return f"{self.root}/devices/{check_name(device_id, 'device id')}/task"

    def forget(self, device_id: str) -> str:
        return f"{self.root}/devices/{check_name(device_id, 'device id')}/forget"

    def update(self, round_id: int, device_id: str) -> str:
        return f"{self.root}/rounds/{int(round_id)}/updates/{check_name(device_id, 'device id')}"

    def secagg(self, round_id: int, device_id: str) -> str:
        """Where a device sends its secure-aggregation messages of a round (keys, shares, masked input, reveal)."""
        return f"{self.root}/rounds/{int(round_id)}/secagg/{check_name(device_id, 'device id')}"

    def global_model(self, task: str) -> str:
        return f"{self.root}/models/{check_name(task, 'task')}/global"

    def chunk(self, task: str, n: int) -> str:
        return f"{self.root}/models/{check_name(task, 'task')}/chunks/{int(n)}"

    def bundle(self, task: str) -> str:
        """The signed bundle manifest (retained): the one announcement of which model files a fleet runs."""
        return f"{self.root}/models/{check_name(task, 'task')}/bundle"

    def all_chunks(self, task: str) -> str:
        return f"{self.root}/models/{check_name(task, 'task')}/chunks/+"

    # wildcard filters the coordinator subscribes to
    @property
    def all_updates(self) -> str:
        return f"{self.root}/rounds/+/updates/+"

    @property
    def all_secagg(self) -> str:
        return f"{self.root}/rounds/+/secagg/+"

    @property
    def all_hellos(self) -> str:
        return f"{self.root}/devices/+/hello"

    @property
    def all_statuses(self) -> str:
        return f"{self.root}/devices/+/status"

    @property
    def all_forgets(self) -> str:
        return f"{self.root}/devices/+/forget"

    def device_of(self, topic: str) -> str | None:
        """The device id a topic belongs to (the publisher's identity as the broker's ACL sees it)."""
        parts = topic.split("/")
        base = len(self.root.split("/"))
        if parts[:base] != self.root.split("/"):
            return None
        rest = parts[base:]
        if len(rest) == 3 and rest[0] == "devices":
            return rest[1]
        if len(rest) == 4 and rest[0] == "rounds" and rest[2] in ("updates", "secagg"):
            return rest[3]
        return None

