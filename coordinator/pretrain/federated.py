"""The shared round loop of federated TSFM pretraining over in-process domain silos.

One round: choose clients (join ratio), each runs E local steps of its strategy's objective from
the received global weights, uploads a fleet :class:`ClientUpdate` (+ strategy payload), and the
strategy's server update aggregates with :mod:`coordinator.fleet.aggregation` -- the code the MQTT
fleet rounds run. The loop is strategy-agnostic; see :mod:`coordinator.pretrain.strategies`.

Determinism and resume: every random stream (client choice, batches, dropout) is derived from
(seed, round, client), and the local optimiser is created fresh each round (as a device would),
so nothing but weights and strategy state has to be saved. A checkpoint is written atomically
after every round; a run restarted on the same checkpoint continues bit-for-bit.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from coordinator.models.checkpoints import atomic_torch_save, save_checkpoint
from coordinator.models.tsfm import TSFM, TSFMConfig, forecast
from coordinator.pretrain import shipped
from coordinator.pretrain.silos import DEFAULT_HOLDOUT, DOMAIN_SILOS, Silo, available_domains, build_silos, split_sample
from coordinator.pretrain.strategies import LocalContext, State, Strategy, Upload, make_strategy, params_of
from coordinator.pretrain.synthetic import SYNTHETIC_CACHE, SYNTHETIC_DOMAIN, SyntheticSettings, synthetic_silo
from coordinator.pretrain.training import torch_threads
from edge_client.learning.windows import mse

log = logging.getLogger(__name__)
ROUND_CHECKPOINT_FORMAT = "fedge.pretrain.round/1"


@dataclass(frozen=True)
class FederatedSettings:
    """Everything besides the model config that determines the result (stored in checkpoints)."""

    strategy: str = "fedavg"
    rounds: int = 10
    local_steps: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.01
    join_ratio: float = 1.0
    domains: tuple[str, ...] | None = None  # None: every available domain except the held-out ones
    holdout: tuple[str, ...] = DEFAULT_HOLDOUT
    window_stride: int = 1
    train_rows: int | None = None
    val_windows: int = 64  # per dataset, evenly spaced: selection of the best round
    seed: int = 0
    hparams: tuple[tuple[str, Any], ...] = ()  # strategy hyper-parameters (name, value)
    synthetic_share: float = 0.0  # > 0: add the KernelSynth + TSMixup silo (coordinator.pretrain.synthetic)
    # Linear lr ramp over the first `warmup_rounds` rounds' local steps (part of the server's schedule). Why: the
    # local AdamW starts fresh each round, as on a device, and its first steps move every weight by ~lr whatever
    # the gradient's size; on the 4,096-input feature projection, at lr 1e-3 from step one, that pushed GELU
    # features into their flat negative range for good (the first foundation grid's seed 1 kept 2 of 64).
    warmup_rounds: float = 0.0
    # Keep each client's AdamW moments from round to round (a cross-silo client, a data centre, can; a phone
    # need not). Fresh moments make every round's first local steps sign-like (each weight moves ~lr whatever
    # its gradient), and FedAvg averages K such steps a round where centralized training takes one.
    keep_optimizer: bool = False
    # > 0: the result is the uniform average of the global weights after each of the last `tail_average` rounds
    # (stochastic weight averaging over the cosine tail, Izmailov et al. 2018), not the best round's weights. Why:
    # the round-to-round validation curve of the tail is noise around a plateau, and a weight average sits in the
    # middle of the flat region those rounds wander over -- the property SWAD (Cha et al. 2021) showed carries to
    # domains never trained on. The model has no batch norm, so the average needs no statistics recomputed.
    tail_average: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.tail_average <= self.rounds:
            raise ValueError(f"tail_average must be in [0, rounds={self.rounds}], not {self.tail_average}")

    def to_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))


@dataclass
class FederatedResult:
    model: TSFM  # best-on-validation global weights
    eval_model: nn.Module  # what is evaluated (FeDPM: the TSFM with the global memory)
    strategy: Strategy
    history: list[dict[str, float]] = field(default_factory=list)
    best_round: int = -1  # -1 with `tail_average`: the model is no single round's
    val_mse: float = math.inf
    wall_s: float = 0.0
    server: State = field(default_factory=dict)
    clients: list[State] = field(default_factory=list)
    domains: tuple[str, ...] = ()


def training_domains(settings: FederatedSettings, data_dir: str | os.PathLike[str] | None) -> tuple[str, ...]:
    if settings.domains is not None:
        return tuple(d for d in settings.domains if d not in settings.holdout)
    return tuple(d for d in available_domains(data_dir) if d not in settings.holdout)


def lr_at(settings: FederatedSettings, rnd: int) -> float:
    """Cosine decay over rounds to 5 % of the peak (the local optimiser restarts every round)."""
    t = rnd / max(1, settings.rounds - 1)
    return settings.lr * (0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * t)))


def warmup_factor(settings: FederatedSettings, rnd: int, step: int, steps: int) -> float:
    """The share of the round's lr that local step `step` of `steps` uses: a linear ramp to 1 over the first
    `settings.warmup_rounds` rounds (1 without warmup)."""
    if settings.warmup_rounds <= 0:
        return 1.0
    return min(1.0, (rnd + (step + 1) / steps) / settings.warmup_rounds)


def select_clients(settings: FederatedSettings, rnd: int, n_clients: int) -> list[int]:
    k = max(1, math.ceil(settings.join_ratio * n_clients))
    rng = np.random.default_rng([settings.seed, rnd, 7])
    return sorted(rng.choice(n_clients, size=k, replace=False).tolist())


def local_training(
    strategy: Strategy, worker: TSFM, silo: Silo, client: State, server: State,
    global_params: dict[str, torch.Tensor], settings: FederatedSettings, rnd: int, k: int,
    optimizer_state: dict[str, Any] | None = None,
) -> Upload:
    """E local steps from the global weights on one silo, then the strategy's upload. With
    `settings.keep_optimizer`, `optimizer_state` (the client's AdamW state, empty at first) is loaded before the
    steps and replaced by the new state after them."""
    worker.load_state_dict(global_params)
    worker.train()
    steps = settings.local_steps * strategy.steps_multiplier
    ctx = LocalContext(silo, client, server, global_params, rnd, rnd / max(1, settings.rounds))
    strategy.begin_round(worker, ctx)
    extra = strategy.trainable(ctx)
    peak = lr_at(settings, rnd)
    opt = torch.optim.AdamW([*worker.parameters(), *extra], lr=peak, weight_decay=settings.weight_decay)
    if settings.keep_optimizer and optimizer_state:
        opt.load_state_dict(optimizer_state)
    rng = np.random.default_rng([settings.seed, rnd, k])
    torch.manual_seed(int(rng.integers(2**31)))  # dropout stream of this client-round
    losses = []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = peak * warmup_factor(settings, rnd, step, steps)
        ctx.progress = (rnd + step / steps) / settings.rounds
        x, y, sub = silo.sample(rng, settings.batch_size, worker.config.context)
        loss = strategy.local_loss(worker, x, y, sub, ctx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([*worker.parameters(), *extra], 1.0)
        opt.step()
        losses.append(float(loss.detach()))
    if settings.keep_optimizer and optimizer_state is not None:
        optimizer_state.clear()
        optimizer_state.update(copy.deepcopy(opt.state_dict()))
    upload = strategy.upload(worker, ctx)
    upload.update.metrics["loss"] = float(np.mean(losses))  # type: ignore[index]  # metrics is a dict here
    return upload


def validation_sets(config: TSFMConfig, domains: tuple[str, ...], settings: FederatedSettings,
                    data_dir: str | os.PathLike[str] | None) -> list[tuple[np.ndarray, np.ndarray]]:
    return [split_sample(n, "val", config.context, config.horizon, settings.val_windows, data_dir)
            for d in domains for n in DOMAIN_SILOS[d]]


def validation_score(model: nn.Module, sets: list[tuple[np.ndarray, np.ndarray]]) -> float:
    """Mean over datasets of the validation MSE: every dataset counts the same, whatever its size."""
    scores = [mse(forecast(model, x)[0], y) for x, y in sets if len(x)]
    return float(np.mean(scores)) if scores else math.inf


def _tensors(params: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.asarray(v, np.float32).copy()) for k, v in params.items()}


def _save_round(path: Path, payload: dict[str, Any]) -> None:
    """Atomic write: a crash mid-save leaves the previous round's checkpoint intact."""
    atomic_torch_save(payload, path)


def _load_round(path: Path, config: TSFMConfig, settings: FederatedSettings,
                templates: list[State]) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated or foreign file: the caller decides whether to start over
        raise ValueError(f"{path} is not a readable federated pretraining checkpoint: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != ROUND_CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a federated pretraining checkpoint")
    # a setting added after the checkpoint was written ran at its default then
    saved_settings = {**FederatedSettings().to_json(), **payload["settings"]}
    if payload["config"] != config.to_dict() or saved_settings != settings.to_json():
        raise ValueError(f"{path} was written by a different run (config or settings differ); "
                         "use another checkpoint path or resume=False")
    for state, template in zip(payload["clients"], templates, strict=True):
        for key, t in template.items():  # optimised client tensors must be leaves that need grad
            if t.requires_grad:
                state[key] = state[key].detach().requires_grad_(True)
    return payload


def run_federated(
    config: TSFMConfig,
    settings: FederatedSettings,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    resume: bool = True,
    progress: bool = False,
    threads: int | None = None,
    stop_after: int | None = None,
    silos: list[Silo] | None = None,
    val_sets: list[tuple[np.ndarray, np.ndarray]] | None = None,
) -> FederatedResult:
    """Pretrain a TSFM with `settings.strategy` over domain silos. With `checkpoint`, the state is
    saved after every round and, when `resume`, a run continues from the last saved round.
    `stop_after` ends after that many rounds in total (simulates an interruption). `silos` and
    `val_sets` may be given to reuse loaded data across runs (benchmarks, tests)."""
    t0 = time.perf_counter()
    strategy = make_strategy(settings.strategy, **dict(settings.hparams))
    domains = training_domains(settings, data_dir)
    if silos is None:
        silos = build_silos(domains, config.context + config.horizon, data_dir=data_dir,
                            window_stride=settings.window_stride, train_rows=settings.train_rows)
        if settings.synthetic_share > 0:
            silos.append(synthetic_silo(SyntheticSettings(share=settings.synthetic_share), silos,
                                        config.context + config.horizon, data_dir, SYNTHETIC_CACHE))
    domains = tuple(s.domain for s in silos if s.domain != SYNTHETIC_DOMAIN)
    clients = strategy.clients(silos)
    if val_sets is None:
        val_sets = validation_sets(config, domains, settings, data_dir)
    torch.manual_seed(settings.seed)
    model = TSFM(config)
    server = strategy.init_server(model, silos)
    client_states = [strategy.init_client(model, c) for c in clients]
    optimizers: list[dict[str, Any]] = [{} for _ in clients]  # used with settings.keep_optimizer
    history: list[dict[str, float]] = []
    best = {"round": -1, "val_mse": math.inf, "state": None}
    average: dict[str, Any] = {"rounds": 0, "state": None}  # running mean of the tail's global weights
    start, earlier_s = 0, 0.0  # earlier_s: training time of the rounds a resumed run does not redo
    path = Path(checkpoint) if checkpoint else None
    if path is not None and resume:
        saved = _load_round(path, config, settings, client_states)
        if saved is not None:
            model.load_state_dict(saved["global"])
            server, client_states, history = saved["server"], saved["clients"], saved["history"]
            optimizers = saved.get("optimizers", optimizers)
            best = {"round": saved["best_round"], "val_mse": saved["best_val"], "state": saved["best_state"]}
            average = saved.get("average", average)
            start, earlier_s = saved["round"] + 1, float(saved.get("wall_s", 0.0))
            log.info("resuming %s from round %d (%s)", settings.strategy, start, path)
    worker = TSFM(config)
    with torch_threads(threads), _progress(progress, settings.strategy, settings.rounds) as bar:
        task = bar.add_task("rounds", total=settings.rounds, completed=start, info="") if bar else None
        for rnd in range(start, settings.rounds):
            global_params = _tensors(params_of(model))
            uploads = [
                local_training(strategy, worker, clients[k], client_states[k], server, global_params, settings, rnd, k,
                               optimizers[k])
                for k in select_clients(settings, rnd, len(clients))
            ]
            new = strategy.server_update(params_of(model), uploads, server, rnd)
            model.load_state_dict(_tensors(new))
            val = validation_score(strategy.eval_model(model, server), val_sets)
            entry = {"round": float(rnd), "val_mse": val, "lr": lr_at(settings, rnd),
                     "train_loss": float(np.mean([u.update.metrics.get("loss", np.nan) for u in uploads]))}
            history.append(entry)
            if val < best["val_mse"]:
                best = {"round": rnd, "val_mse": val, "state": copy.deepcopy(model.state_dict())}
            if rnd >= settings.rounds - settings.tail_average:
                average = _fold_in(average, model.state_dict())
            if path is not None:
                _save_round(path, {
                    "format": ROUND_CHECKPOINT_FORMAT, "round": rnd, "config": config.to_dict(),
                    "settings": settings.to_json(), "global": model.state_dict(), "server": server,
                    "clients": client_states, "optimizers": optimizers, "history": history,
                    "best_round": best["round"],
                    "best_val": best["val_mse"], "best_state": best["state"], "average": average,
                    "wall_s": earlier_s + time.perf_counter() - t0,
                })
            if bar:
                bar.update(task, advance=1, info=f"val mse {val:.4f} (best {best['val_mse']:.4f} @ {best['round']})")
            log.info("%s round %d: %s", settings.strategy, rnd, entry)
            if stop_after is not None and rnd + 1 >= stop_after:
                break
    finished = bool(history) and history[-1]["round"] == settings.rounds - 1
    if settings.tail_average and finished:
        model.load_state_dict(average["state"])
        best = {"round": -1, "val_mse": validation_score(strategy.eval_model(model, server), val_sets)}
    elif best["state"] is not None:
        model.load_state_dict(best["state"])
    model.eval()
    return FederatedResult(
        model=model, eval_model=strategy.eval_model(model, server).eval(), strategy=strategy, history=history,
        best_round=int(best["round"]), val_mse=float(best["val_mse"]), wall_s=earlier_s + time.perf_counter() - t0,
        server=server, clients=client_states, domains=domains,
    )


def _fold_in(average: dict[str, Any], state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The running mean of one more round's weights (float tensors; others, if any, are the latest round's)."""
    n = average["rounds"] + 1
    if average["state"] is None:
        return {"rounds": 1, "state": {k: v.detach().clone() for k, v in state.items()}}
    mean = {k: (m + (state[k].detach() - m) / n) if m.is_floating_point() else state[k].detach().clone()
            for k, m in average["state"].items()}
    return {"rounds": n, "state": mean}


def _progress(enabled: bool, label: str, total: int) -> Any:
    if not enabled:
        return nullcontext(None)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn(f"[bold]pretrain {label}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("{task.fields[info]}"))


# ------------------------------------------------------------------------------------------ CLI


def model_config(size: str, context: int, horizon: int) -> TSFMConfig:
    if size not in ("tiny", "small"):
        raise ValueError(f"size must be tiny or small, not {size!r}")
    make = TSFMConfig.tiny if size == "tiny" else TSFMConfig.small
    return make(context=context, horizon=horizon)


def pretrain_command(
    strategy: str,
    *,
    rounds: int = 20,
    local_steps: int = 20,
    batch_size: int = shipped.BATCH,
    lr: float = shipped.LR,
    warmup_rounds: float = shipped.WARMUP_ROUNDS,
    synthetic_share: float = shipped.SHARE,
    keep_optimizer: bool = False,
    join_ratio: float = 1.0,
    size: str = "tiny",
    context: int = 512,
    horizon: int = 192,
    holdout: tuple[str, ...] = DEFAULT_HOLDOUT,
    domains: tuple[str, ...] | None = None,
    seed: int = 0,
    out_dir: str | os.PathLike[str] = "runs/pretrain",
    data_dir: str | os.PathLike[str] | None = None,
    threads: int | None = None,
    resume: bool = True,
    evaluate: bool = True,
    hparams: dict[str, Any] | None = None,
    console: Any = None,
) -> dict[str, Any]:
    """``fedge pretrain --strategy NAME``: federated (or centralized) pretraining over domain silos,
    with a round checkpoint at ``out_dir/NAME-seedS.round.pt`` (resumed when present) and the final
    best-on-validation TSFM at ``out_dir/NAME-seedS.pt`` (readable by ``fedge export``). Prints a
    rich table of held-out and in-domain test scores and returns them. The training defaults are the shipped
    model's recipe (lr, warmup, synthetic share): lr 1e-3 from the first step killed most GELU features on some
    seeds of the foundation grid (docs/results/foundation.md)."""
    from rich.console import Console

    console = console or Console()
    config = model_config(size, context, horizon)
    settings = FederatedSettings(
        strategy=strategy, rounds=rounds, local_steps=local_steps, batch_size=batch_size, lr=lr,
        warmup_rounds=warmup_rounds, synthetic_share=synthetic_share, keep_optimizer=keep_optimizer,
        join_ratio=join_ratio, domains=domains, holdout=tuple(holdout), seed=seed,
        hparams=tuple(sorted((hparams or {}).items())),
    )
    out = Path(out_dir)
    result = run_federated(config, settings, data_dir=data_dir, checkpoint=out / f"{strategy}-seed{seed}.round.pt",
                           resume=resume, progress=True, threads=threads)
    final = save_checkpoint(result.model, out / f"{strategy}-seed{seed}.pt", meta={
        "strategy": strategy, "settings": settings.to_json(), "val_mse": result.val_mse,
        "best_round": result.best_round, "domains": list(result.domains), "exportable": result.strategy.exportable(),
    })
    summary: dict[str, Any] = {"checkpoint": str(final), "val_mse": result.val_mse, "best_round": result.best_round,
                               "wall_s": result.wall_s, "domains": list(result.domains)}
    if not result.strategy.exportable():
        console.print("[yellow]note: this strategy's global model quantises tokens with a memory that the ONNX "
                      "backbone does not contain; the saved TSFM is the un-quantised backbone")
    if evaluate:
        from coordinator.pretrain.evaluate import EvalSettings, evaluate_model, scores_table

        ev = EvalSettings(horizons=tuple(h for h in (96, 192) if h <= horizon) or (horizon,))
        summary["scores"] = evaluate_model(result.eval_model, result.domains, settings.holdout, ev, data_dir,
                                           seed=seed, threads=threads)
        console.print(scores_table({strategy: summary["scores"]}, ev.horizons))
    console.print(f"saved {final}")
    return summary

