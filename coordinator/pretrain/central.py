"""Centralized pretraining of the TSFM: the baseline every federated strategy is measured against,
and what ``fedge demo`` "trains or loads" before it starts a fleet.

Protocol (ETT long-horizon convention, see ALGORITHMS.md §9): a StandardScaler per channel fit on
the training rows only, channel-independent univariate windows from all channels, loss and
metrics on the scaled values. Training windows are sampled by index from the scaled series
instead of being materialised: ETTh1 at context 512 would otherwise be ~140 MB of copies.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from coordinator.models.tsfm import TSFM, TSFMConfig
from edge_client.data.datasets import load_series
from edge_client.learning.windows import (
    ETT_TEST_END,
    ETT_TRAIN_END,
    ETT_VAL_END,
    Scaler,
    crps_from_quantiles,
    mae,
    make_windows,
    mse,
    pinball,
)

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "fedge.tsfm.checkpoint/1"
ETT_NAMES = ("etth1", "etth2", "ettm1", "ettm2")


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


# ----------------------------------------------------------------------------------------- data


def split_bounds(name: str, n_rows: int) -> tuple[int, int, int]:
    """(train_end, val_end, test_end) rows: ETT's fixed 12/4/4 months, else 70/10/20 (the
    Autoformer convention for the other long-horizon datasets)."""
    if name in ETT_NAMES:
        return ETT_TRAIN_END, ETT_VAL_END, ETT_TEST_END
    return int(n_rows * 0.7), int(n_rows * 0.8), n_rows


def scaled_series(name: str, data_dir: str | os.PathLike[str] | None = None) -> tuple[np.ndarray, tuple[int, int, int]]:
    """The whole series standardised with statistics of its training rows only (no leakage)."""
    values = load_series(name, data_dir).values
    bounds = split_bounds(name, len(values))
    scaler = Scaler.fit(values[: bounds[0]])
    return scaler.transform(values).astype(np.float32), bounds


def window_starts(x: np.ndarray, span: int, stride: int, stop: int) -> np.ndarray:
    """Start offsets of complete (NaN-free) windows of length `span` inside x[:stop]."""
    n = min(stop, len(x)) - span + 1
    if n <= 0:
        return np.zeros(0, np.int64)
    bad = np.concatenate([[0], np.cumsum(~np.isfinite(x[:stop]))])
    starts = np.arange(0, n, stride)
    return starts[bad[starts + span] - bad[starts] == 0]


@dataclass
class WindowPool:
    """All channels of all training series laid end to end, plus valid window starts into it."""

    flat: np.ndarray  # (T_total,) float32
    starts: np.ndarray  # (N,) int64
    span: int

    def batch(self, idx: np.ndarray, context: int) -> tuple[torch.Tensor, torch.Tensor]:
        win = self.flat[self.starts[idx, None] + np.arange(self.span)[None, :]]
        return torch.from_numpy(win[:, :context]), torch.from_numpy(win[:, context:])


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


def split_windows(
    name: str, split: str, context: int, horizon: int, stride: int = 1,
    data_dir: str | os.PathLike[str] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Channel-independent windows whose targets fall in a split; contexts may reach back
    `context` rows before the split boundary (the standard ETT protocol)."""
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be train, val or test, not {split!r}")
    scaled, (train_end, val_end, test_end) = scaled_series(name, data_dir)
    start, stop = {"train": (0, train_end), "val": (train_end, val_end), "test": (val_end, test_end)}[split]
    xs, ys = zip(
        *(make_windows(scaled[:, c], context, horizon, stride, start, stop) for c in range(scaled.shape[1])),
        strict=True,
    )
    return np.concatenate(xs), np.concatenate(ys)


# ----------------------------------------------------------------------------------- training


def forecast_loss(point: torch.Tensor, quantiles: torch.Tensor, y: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """MSE of the point forecast + mean pinball loss of the quantiles, on scaled values."""
    diff = y.unsqueeze(1) - quantiles
    q = levels.view(1, -1, 1)
    return torch.mean((point - y) ** 2) + torch.mean(torch.maximum(q * diff, (q - 1.0) * diff))


@torch.inference_mode()
def predict(model: TSFM, x: np.ndarray, batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Batched inference: point (N, H) and quantiles (N, Q, H) as float32 numpy arrays."""
    was_training = model.training
    model.eval()
    points, quants = [], []
    for i in range(0, len(x), batch_size):
        p, q = model(torch.from_numpy(np.ascontiguousarray(x[i : i + batch_size], dtype=np.float32)))
        points.append(p.numpy())
        quants.append(q.numpy())
    model.train(was_training)
    h, nq = model.config.horizon, model.config.n_quantiles
    if not points:
        return np.zeros((0, h), np.float32), np.zeros((0, nq, h), np.float32)
    return np.concatenate(points), np.concatenate(quants)


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
    return mse(predict(model, x)[0], y) if len(x) else math.inf


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


# --------------------------------------------------------------------------------- evaluation


def evaluate_ett(
    model: TSFM,
    split: str = "test",
    horizon: int | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    series_name: str = "etth1",
    threads: int | None = None,
) -> dict[str, float]:
    """MSE / MAE / pinball / CRPS on the standard protocol: scaled values, all channels, sliding
    stride 1. A shorter `horizon` than the model's scores the first `horizon` steps (the fleet's
    24-step task on the 96-step model)."""
    horizon = horizon or model.config.horizon
    if horizon > model.config.horizon:
        raise ValueError(f"horizon {horizon} exceeds the model horizon {model.config.horizon}")
    x, y = split_windows(series_name, split, model.config.context, horizon, 1, data_dir)
    with torch_threads(threads):
        point, quantiles = predict(model, x)
    point, q = point[:, :horizon], np.transpose(quantiles[:, :, :horizon], (1, 0, 2))
    levels = np.asarray(model.config.quantiles)
    return {
        "mse": mse(point, y), "mae": mae(point, y), "pinball": pinball(q, y, levels),
        "crps": crps_from_quantiles(q, y, levels), "n_windows": float(len(x)), "horizon": float(horizon),
    }


# -------------------------------------------------------------------------------- checkpoints


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
