"""Central pretraining of SASRec on the coordinator's own early data (period 0), cached by content."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from coordinator.models.recommender import SASRec, SASRecConfig, load_sasrec, save_sasrec
from edge_client.recsys.data import PAD, ContinualSplit, training_windows


@dataclass(frozen=True)
class RecTrainSettings:
    epochs: int = 30
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    seed: int = 0
    threads: int | None = None


def windows_for(split: ContinualSplit, period: int, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """All users' training windows whose targets are `period`'s training items (held-out test
    items are never targets); the inputs run over the full earlier history."""
    xs, ys = [], []
    for log in split.logs.values():
        mask = np.zeros(len(log.items), dtype=bool)
        mask[log.train_positions(period)] = True
        if mask.any():
            last = int(np.flatnonzero(mask)[-1]) + 1
            x, y = training_windows(log.items[:last], mask[:last], max_len)
            xs.append(x)
            ys.append(y)
    if not xs:
        return np.zeros((0, max_len), np.int64), np.zeros((0, max_len), np.int64)
    return np.concatenate(xs), np.concatenate(ys)


def train_sasrec(
    model: SASRec,
    x: np.ndarray,
    y: np.ndarray,
    settings: RecTrainSettings,
    on_epoch: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Full-softmax CE over all items at every target position; returns the mean loss per epoch."""
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    old_threads = torch.get_num_threads()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    opt = torch.optim.Adam(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    history: list[float] = []
    try:
        model.train()
        for epoch in range(settings.epochs):
            order = rng.permutation(len(x))
            total, count = 0.0, 0
            for i in range(0, len(order), settings.batch_size):
                idx = torch.from_numpy(order[i : i + settings.batch_size])
                out = model.sequence(xt[idx])
                tgt = yt[idx]
                sel = tgt != PAD
                logits = model.scores(out[sel])
                logits[:, PAD] = -1e9
                loss = F.cross_entropy(logits, tgt[sel])
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += float(loss.detach()) * int(sel.sum())
                count += int(sel.sum())
            history.append(total / max(count, 1))
            if on_epoch:
                on_epoch(epoch + 1, history[-1])
    finally:
        model.eval()
        torch.set_num_threads(old_threads)
    return history


def pretrained_sasrec(
    split: ContinualSplit,
    config: SASRecConfig,
    settings: RecTrainSettings,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = False,
) -> tuple[SASRec, dict[str, Any]]:
    """Central pretraining on period 0 (the coordinator's own early data), cached by a key over
    the config, the settings and the period-0 data, so reruns of the benchmark and demo reuse it."""
    x, y = windows_for(split, 0, config.max_len)
    digest = hashlib.sha256(json.dumps([config.to_dict(), asdict(settings)], sort_keys=True).encode())
    digest.update(x.tobytes())
    digest.update(y.tobytes())
    key = digest.hexdigest()[:16]
    ckpt = Path(cache_dir) / f"sasrec-{key}.pt" if cache_dir else None
    if ckpt is not None and ckpt.is_file():
        return load_sasrec(ckpt)
    torch.manual_seed(settings.seed)
    model = SASRec(config)
    start = time.perf_counter()
    if progress:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        with Progress(TextColumn("[bold]pretrain SASRec (period 0)"), BarColumn(), MofNCompleteColumn(),
                      TimeRemainingColumn(), TextColumn("{task.fields[info]}")) as bar:
            task = bar.add_task("train", total=settings.epochs, info="")
            losses = train_sasrec(model, x, y, settings,
                                  lambda e, loss: bar.update(task, completed=e, info=f"CE {loss:.3f}"))
    else:
        losses = train_sasrec(model, x, y, settings)
    meta = {"losses": losses, "windows": len(x), "targets": int((y != PAD).sum()), "key": key,
            "wall_s": time.perf_counter() - start, "n_params": model.n_params()}
    if ckpt is not None:
        save_sasrec(model, ckpt, meta)
    return model, meta
