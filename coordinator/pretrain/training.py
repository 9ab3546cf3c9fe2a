"""The TSFM training loop: centralized pretraining, the baseline every federated strategy is measured against,
and the cache of what ``fedge demo`` "trains or loads" before it starts a fleet.

Windows come from :mod:`coordinator.pretrain.windows`, checkpoints are :mod:`coordinator.models.checkpoints`,
scores are :mod:`coordinator.pretrain.evaluate`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from coordinator.models.checkpoints import CHECKPOINT_FORMAT, load_checkpoint, save_checkpoint
from coordinator.models.tsfm import TSFM, TSFMConfig, forecast
from coordinator.pretrain.windows import WindowPool, scaled_series, split_windows, window_starts
from edge_client.learning.windows import mse

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class TrainSettings:
    """Everything besides the model config that changes the trained weights (the cache key)."""

    series_names: tuple[str, ...] = ("etth1",)
    # Defaults: ~2 min on 2 CPU cores for the tiny config. On ETTh1 validation MSE bottoms out
    # after 200-500 steps and then rises (overfitting), for every size tried (d_model 16-64), so a
    # longer budget buys nothing; best-on-validation restoring makes the exact count uncritical.
    steps: int = 600
    epochs: float | None = None  # when set, overrides steps: epochs * windows / batch_size
    batch_size: int = 128
    lr: float = 5e-4
    weight_decay: float = 0.05
    warmup_frac: float = 0.05
    window_stride: int = 1
    val_stride: int = 4  # validation windows every 4 rows: 4x cheaper, same estimate
    val_every: int = 100
    train_rows: int | None = None  # use only the first N training rows (tests, quick runs)
    seed: int = 0


@dataclass
class TrainResult:
    """The best-on-validation model plus the curve that led to it."""

    model: TSFM
    history: list[dict[str, float]] = field(default_factory=list)
    val_mse: float = math.inf
    best_step: int = 0
    wall_s: float = 0.0
    settings: TrainSettings = field(default_factory=TrainSettings)


# ----------------------------------------------------------------------------------- training


def training_pool(config: TSFMConfig, settings: TrainSettings, data_dir: str | os.PathLike[str] | None) -> WindowPool:
    span = config.context + config.horizon
    chunks, starts, offset = [], [], 0
    for name in settings.series_names:
        scaled, (train_end, _, _) = scaled_series(name, data_dir)
        if settings.train_rows is not None:
            train_end = min(train_end, settings.train_rows)
        for channel in scaled.T:
            part = np.ascontiguousarray(channel[:train_end])
            starts.append(window_starts(part, span, settings.window_stride, len(part)) + offset)
            chunks.append(part)
            offset += len(part)
    pool = WindowPool(np.concatenate(chunks), np.concatenate(starts), span)
    if len(pool.starts) == 0:
        raise ValueError(f"no training window of {span} rows in {settings.series_names}")
    return pool




def forecast_loss(point: torch.Tensor, quantiles: torch.Tensor, y: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """MSE of the point forecast + mean pinball loss of the quantiles, on scaled values."""
    diff = y.unsqueeze(1) - quantiles
    q = levels.view(1, -1, 1)
    return torch.mean((point - y) ** 2) + torch.mean(torch.maximum(q * diff, (q - 1.0) * diff))


def _lr_lambda(total: int, warmup_frac: float) -> Any:
    """Linear warmup then cosine decay to 1 % of the peak: stable start, converged end."""
    warmup = max(1, int(total * warmup_frac))

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * t))

    return f


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Set torch's intra-op threads for a block and restore them: a library call should not
    change the caller's process-wide setting."""
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _progress(enabled: bool, total: int) -> Any:
    if not enabled:
        return nullcontext(None)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[bold]pretrain TSFM"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
    )


def validation_mse(model: TSFM, x: np.ndarray, y: np.ndarray) -> float:
    return mse(forecast(model, x)[0], y) if len(x) else math.inf


def train_tsfm(
    config: TSFMConfig | None = None,
    *,
    series_names: Sequence[str] = ("etth1",),
    data_dir: str | os.PathLike[str] | None = None,
    steps: int | None = None,
    epochs: float | None = None,
    batch_size: int = TrainSettings.batch_size,
    lr: float = TrainSettings.lr,
    weight_decay: float = TrainSettings.weight_decay,
    window_stride: int = TrainSettings.window_stride,
    val_stride: int = TrainSettings.val_stride,
    val_every: int = TrainSettings.val_every,
    train_rows: int | None = None,
    seed: int = TrainSettings.seed,
    threads: int | None = None,
    progress: bool = False,
    log_every: int = 50,
) -> TrainResult:
    """Pretrain a TSFM on the training split of `series_names` and return the best state on the
    validation split. Give either `steps` or `epochs` (fractions allowed); neither means the
    default step budget (~2 minutes on 2 CPU cores for the tiny config)."""
    settings = TrainSettings(
        series_names=tuple(series_names), steps=steps or TrainSettings.steps, epochs=epochs,
        batch_size=batch_size, lr=lr, weight_decay=weight_decay, window_stride=window_stride,
        val_stride=val_stride, val_every=val_every, train_rows=train_rows, seed=seed,
    )
    return train_with_settings(
        config, settings, data_dir=data_dir, threads=threads, progress=progress, log_every=log_every
    )


def train_with_settings(
    config: TSFMConfig | None,
    settings: TrainSettings,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    threads: int | None = None,
    progress: bool = False,
    log_every: int = 50,
) -> TrainResult:
    """:func:`train_tsfm` with the settings as one object (what the cache hashes)."""
    config = config or TSFMConfig()
    pool = training_pool(config, settings, data_dir)
    if settings.epochs is not None:
        settings = _replace(settings, steps=max(1, math.ceil(settings.epochs * len(pool.starts) / settings.batch_size)))
    with torch_threads(threads):
        return _train(config, settings, pool, data_dir, progress, log_every)


def _replace(settings: TrainSettings, **changes: Any) -> TrainSettings:
    return TrainSettings(**{**asdict(settings), **changes})


def _validation_set(
    config: TSFMConfig, settings: TrainSettings, data_dir: str | os.PathLike[str] | None
) -> tuple[np.ndarray, np.ndarray]:
    parts = [
        split_windows(name, "val", config.context, config.horizon, settings.val_stride, data_dir)
        for name in settings.series_names
    ]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _batches(rng: np.random.Generator, n: int, batch_size: int) -> Iterator[np.ndarray]:
    """Endless shuffled mini-batches of window indices, reshuffled every epoch (drop-last)."""
    while True:
        order = rng.permutation(n)
        for i in range(0, n - batch_size + 1, batch_size):
            yield order[i : i + batch_size]
        if n < batch_size:  # fewer windows than one batch: use them all
            yield order


def _train(
    config: TSFMConfig, settings: TrainSettings, pool: WindowPool,
    data_dir: str | os.PathLike[str] | None, progress: bool, log_every: int,
) -> TrainResult:
    t0 = time.perf_counter()
    torch.manual_seed(settings.seed)
    model = TSFM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(settings.steps, settings.warmup_frac))
    levels = torch.tensor(config.quantiles, dtype=torch.float32)
    val_x, val_y = _validation_set(config, settings, data_dir)
    result = TrainResult(model=model, settings=settings)
    best_state: dict[str, torch.Tensor] | None = None
    batches = _batches(np.random.default_rng(settings.seed), len(pool.starts), settings.batch_size)
    running: list[float] = []
    with _progress(progress, settings.steps) as bar:
        task = bar.add_task("train", total=settings.steps, info="") if bar else None
        for step in range(1, settings.steps + 1):
            running.append(_step(model, opt, sched, pool, next(batches), levels))
            last = step == settings.steps
            validate = last or step % settings.val_every == 0
            if validate or step % log_every == 0:
                entry = {"step": float(step), "train_loss": float(np.mean(running)), "lr": sched.get_last_lr()[0]}
                running = []
                if validate:
                    entry["val_mse"] = validation_mse(model, val_x, val_y)
                    if entry["val_mse"] < result.val_mse:  # keep the best state, not the last
                        result.val_mse, result.best_step = entry["val_mse"], step
                        best_state = copy.deepcopy(model.state_dict())
                result.history.append(entry)
                log.info("step %d %s", step, {k: round(v, 5) for k, v in entry.items() if k != "step"})
                if bar:
                    bar.update(task, info=_bar_info(entry, result.val_mse))
            if bar:
                bar.advance(task)
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    result.wall_s = time.perf_counter() - t0
    return result


def _step(
    model: TSFM, opt: torch.optim.Optimizer, sched: Any, pool: WindowPool, idx: np.ndarray, levels: torch.Tensor
) -> float:
    model.train()
    x, y = pool.batch(idx, model.config.context)
    point, quantiles = model(x)
    loss = forecast_loss(point, quantiles, y, levels)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    sched.step()
    return float(loss.detach())


def _bar_info(entry: dict[str, float], best: float) -> str:
    return f"loss {entry['train_loss']:.4f}  best val mse {best:.4f}"


# ------------------------------------------------------------------------------------- cache


def cache_key(config: TSFMConfig, settings: TrainSettings) -> str:
    """Stable hash of everything that determines the trained weights."""
    blob = json.dumps({"format": CHECKPOINT_FORMAT, "config": config.to_dict(), "train": asdict(settings)},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def pretrained_tsfm(
    cache_dir: str | os.PathLike[str],
    config: TSFMConfig | None = None,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    threads: int | None = None,
    progress: bool = False,
    log_every: int = 50,
    **train_args: Any,
) -> TSFM:
    """Load the pretrained TSFM from `cache_dir`, or train it and cache it. `train_args` are
    :class:`TrainSettings` fields. The file name is a hash of config + training arguments, so
    changing either retrains instead of reusing stale weights; a corrupt cache file is retrained
    over."""
    config = config or TSFMConfig()
    if "series_names" in train_args:
        train_args["series_names"] = tuple(train_args["series_names"])
    settings = TrainSettings(**train_args)  # TypeError on an unknown argument
    path = Path(cache_dir) / f"tsfm-{cache_key(config, settings)}.pt"
    if path.is_file():
        try:
            model = load_checkpoint(path)
            log.info("loaded pretrained TSFM from %s", path)
            return model
        except ValueError as exc:
            log.warning("ignoring unusable cache file: %s", exc)
    result = train_with_settings(
        config, settings, data_dir=data_dir, threads=threads, progress=progress, log_every=log_every
    )
    save_checkpoint(result.model, path, meta={
        "val_mse": result.val_mse, "best_step": result.best_step, "wall_s": result.wall_s,
        "settings": asdict(result.settings), "history": result.history,
    })
    log.info("pretrained TSFM in %.0f s (val mse %.4f), cached at %s", result.wall_s, result.val_mse, path)
    return result.model
