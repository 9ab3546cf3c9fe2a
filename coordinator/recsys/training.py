"""Central pretraining of SASRec on the coordinator's own early data (period 0), cached by content."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from coordinator.models.recommender import SASRec, SASRecConfig, load_sasrec, save_sasrec
from edge_client.recsys.data import PAD, ContinualSplit, training_windows


@dataclass(frozen=True)
class RecTrainSettings:
    epochs: int = 30  # the most epochs; with a validation score, training stops earlier (patience)
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    seed: int = 0
    threads: int | None = None
    patience: int = 10  # epochs without a better validation score before stopping (Klenitskiy & Vasilev use 10)


@dataclass
class TrainHistory:
    """Loss per epoch, the validation score per epoch (when a validation was given) and the epoch whose
    weights the model holds at the end (the best validation epoch, else the last)."""

    losses: list[float] = field(default_factory=list)
    val: list[float] = field(default_factory=list)
    best_epoch: int = 0
    stopped_early: bool = False  # the patience rule ended training, not the epoch budget


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
    on_epoch: Callable[[int, float, float | None], None] | None = None,
    validate: Callable[[SASRec], float] | None = None,
) -> TrainHistory:
    """Full-softmax CE over all items at every target position (the "SASRec+" loss of Klenitskiy &
    Vasilev, RecSys 2023: with 1.7k items the full softmax is cheap, and it beats SASRec's BCE with one
    sampled negative by a wide margin).

    With `validate` (a score, higher is better, computed in eval mode after every epoch) training stops
    once `settings.patience` epochs brought no better score, and the model keeps the best epoch's
    weights: early stopping on validation, as the standard protocol does."""
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    old_threads = torch.get_num_threads()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    opt = torch.optim.Adam(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    history = TrainHistory()
    best_state: dict[str, torch.Tensor] | None = None
    try:
        for epoch in range(settings.epochs):
            model.train()
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
            history.losses.append(total / max(count, 1))
            score = None
            if validate is not None:
                model.eval()
                score = float(validate(model))
                history.val.append(score)
                if best_state is None or score > history.val[history.best_epoch - 1]:
                    history.best_epoch = epoch + 1
                    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                history.best_epoch = epoch + 1
            if on_epoch:
                on_epoch(epoch + 1, history.losses[-1], score)
            if validate is not None and epoch + 1 - history.best_epoch >= settings.patience:
                history.stopped_early = True
                break
        if best_state is not None:
            model.load_state_dict(best_state)
    finally:
        model.eval()
        torch.set_num_threads(old_threads)
    return history


def period0_data(split: ContinualSplit, max_len: int
                 ) -> tuple[np.ndarray, np.ndarray, list[np.ndarray], np.ndarray]:
    """Period-0 training windows, with every user's last period-0 interaction held out as the validation
    target for early stopping (users with a single period-0 target keep it for training). Returns
    (x, y, validation histories, validation targets)."""
    xs, ys, v_hist, v_tgt = [], [], [], []
    for log in split.logs.values():
        pos = log.train_positions(0)
        if len(pos) >= 2:
            v_hist.append(log.items[: pos[-1]])
            v_tgt.append(log.items[pos[-1]])
            pos = pos[:-1]
        if len(pos):
            mask = np.zeros(len(log.items), dtype=bool)
            mask[pos] = True
            x, y = training_windows(log.items[: pos[-1] + 1], mask[: pos[-1] + 1], max_len)
            xs.append(x)
            ys.append(y)
    return np.concatenate(xs), np.concatenate(ys), v_hist, np.array(v_tgt, np.int64)


def pretrained_sasrec(
    split: ContinualSplit,
    config: SASRecConfig,
    settings: RecTrainSettings,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = False,
) -> tuple[SASRec, dict[str, Any]]:
    """Central pretraining on period 0 (the coordinator's own early data) until validation NDCG@10 (full
    ranking, on each user's held-out last period-0 item) has not improved for `settings.patience` epochs,
    at most `settings.epochs`; the best epoch's weights are kept. Cached by a key over the config, the
    settings and the period-0 data, so reruns of the benchmark and demo reuse it."""
    from coordinator.recsys.loo import rank_targets, ranking_metrics, sasrec_scorer

    x, y, v_hist, v_tgt = period0_data(split, config.max_len)
    digest = hashlib.sha256(json.dumps([config.to_dict(), asdict(settings), "period0-valid"], sort_keys=True).encode())
    digest.update(x.tobytes())
    digest.update(y.tobytes())
    key = digest.hexdigest()[:16]
    ckpt = Path(cache_dir) / f"sasrec-{key}.pt" if cache_dir else None
    if ckpt is not None and ckpt.is_file():
        return load_sasrec(ckpt)
    torch.manual_seed(settings.seed)
    model = SASRec(config)
    start = time.perf_counter()

    def validate(m: SASRec) -> float:
        return ranking_metrics(rank_targets(sasrec_scorer(m), v_hist, v_tgt))["ndcg"]

    if progress:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(TextColumn("[bold]pretrain SASRec (period 0, early stopping)"), BarColumn(),
                      MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("{task.fields[info]}")) as bar:
            task = bar.add_task("train", total=settings.epochs, info="")

            def on_epoch(e: int, loss: float, val: float | None) -> None:
                bar.update(task, completed=e, info=f"CE {loss:.3f}, valid NDCG@10 {val:.4f}")

            hist = train_sasrec(model, x, y, settings, on_epoch, validate)
    else:
        hist = train_sasrec(model, x, y, settings, validate=validate)
    meta = {"losses": hist.losses, "val_ndcg": hist.val, "best_epoch": hist.best_epoch,
            "stopped_early": hist.stopped_early, "windows": len(x), "targets": int((y != PAD).sum()),
            "valid_users": len(v_tgt), "key": key, "wall_s": time.perf_counter() - start,
            "n_params": model.n_params()}
    if ckpt is not None:
        save_sasrec(model, ckpt, meta)
    return model, meta
