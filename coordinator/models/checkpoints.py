"""TSFM checkpoints: config + weights in one torch file, written atomically, read back with a clear error.

Export and the pretraining cache read models through here; nothing in this module trains.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from coordinator.models.tsfm import TSFM, TSFMConfig

CHECKPOINT_FORMAT = "fedge.tsfm.checkpoint/1"


def save_checkpoint(model: TSFM, path: str | os.PathLike[str], meta: dict[str, Any] | None = None) -> Path:
    """Config + state_dict in one torch file, written atomically so an interrupted save never
    leaves a half-written file in the pretraining cache."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "config": model.config.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "meta": json.loads(json.dumps(meta or {})),  # JSON-safe so weights_only loading accepts it
    }
    atomic_torch_save(payload, path)
    return path


def atomic_torch_save(payload: dict[str, Any], path: Path) -> None:
    """Write to a temporary file and rename: a crash mid-save leaves the previous file intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read_checkpoint(path: str | os.PathLike[str]) -> tuple[TSFM, dict[str, Any]]:
    """(model, meta). Any unreadable, foreign or mismatching file raises ValueError naming the
    path, so callers (the cache) can retrain instead of crashing on a torch internals error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path} is not a readable TSFM checkpoint: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a TSFM checkpoint (expected format {CHECKPOINT_FORMAT!r})")
    try:
        model = TSFM(TSFMConfig.from_dict(payload["config"]))
        model.load_state_dict(payload["state_dict"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{path} does not match the TSFM it describes: {exc}") from exc
    model.eval()
    return model, dict(payload.get("meta") or {})


def load_checkpoint(path: str | os.PathLike[str]) -> TSFM:
    """The model of a checkpoint written by :func:`save_checkpoint`, in eval mode."""
    return read_checkpoint(path)[0]
