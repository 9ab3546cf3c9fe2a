"""Which pretrained backbone ``fedge demo`` exports, and training it once (cached afterwards).

Default: ``shipped`` -- the pretrained model inside the package (:mod:`coordinator.pretrain.shipped`),
no pretraining and no data directory needed. ``--pretrain-strategy auto`` (below) or a strategy name
trains one instead.

Selection rule for ``auto`` (read at run time, so re-running ``benchmarks/pretrain.py`` changes the default
without a code change): the strategy the benchmark ranked best among the exportable ones,
``meta.best_exportable`` in ``docs/results/pretrain.json`` (lowest mean of in-domain and
zero-shot H96 MSE over seeds). Fallbacks, each one stated in the demo's output:

* the results file is missing, unreadable, incomplete or names a strategy that is unknown or not
  exportable -> ``centralized`` (mixed-batch over all silos, the benchmark's winner when this was
  written, and the baseline every federated strategy is measured against);
* the multi-domain datasets are not there (no data directory) -> ``etth1``: central pretraining on
  ETTh1's training split only, the bundled dataset.

The backbone is trained at the demo's model size (not the benchmark's smaller one) over the
training splits of every available domain except ``finance``: the demo's exchange-rate devices
read the *whole* exchange-rate series, so pretraining on its training split would put their
held-back windows into the backbone's training data. ETTh1 devices only use rows after ETTh1's
training split, so energy stays in.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from coordinator.models.checkpoints import read_checkpoint, save_checkpoint
from coordinator.models.tsfm import TSFM, TSFMConfig
from coordinator.pretrain.silos import DOMAIN_SILOS, available_domains
from coordinator.pretrain.strategies import STRATEGIES, make_strategy
from coordinator.pretrain.training import pretrained_tsfm

log = logging.getLogger(__name__)

RESULTS_JSON = Path(__file__).resolve().parents[2] / "docs" / "results" / "pretrain.json"
AUTO = "auto"
SHIPPED = "shipped"
ETTH1_ONLY = "etth1"
FALLBACK_STRATEGY = "centralized"
DEMO_HOLDOUT = ("finance",)
CHOICES = (SHIPPED, AUTO, ETTH1_ONLY, *STRATEGIES)


@dataclass(frozen=True)
class BackboneChoice:
    """The pretraining the demo runs (or loads), and why: printed and written to demo.json."""

    strategy: str  # "etth1" or a silo strategy of coordinator.pretrain.strategies
    reason: str
    domains: tuple[str, ...] = ()  # silos pretrained on (empty for etth1)
    held_out: tuple[str, ...] = ()

    @property
    def datasets(self) -> tuple[str, ...]:
        if self.strategy == ETTH1_ONLY:
            return ("etth1",)
        return tuple(n for d in self.domains for n in DOMAIN_SILOS[d])

    def describe(self) -> str:
        if self.strategy == ETTH1_ONLY:
            return f"etth1 (central pretraining on ETTh1's training split) — {self.reason}"
        where = ", ".join(f"{d} ({', '.join(DOMAIN_SILOS[d])})" for d in self.domains) or "etth1"
        held = f"; held out: {', '.join(self.held_out)}" if self.held_out else ""
        return f"{self.strategy} over {where}, training splits only{held} — {self.reason}"


@dataclass(frozen=True)
class BackboneBudget:
    """Silo pretraining budget: rounds x local steps x clients x batch. The default equals the ETTh1
    pretraining it replaces in samples seen (12 x 20 x 5 x 64 = 600 x 128 = 76,800 windows)."""

    rounds: int = 12
    local_steps: int = 20
    batch_size: int = 64
    lr: float = 1e-3
    seed: int = 0


def ranked_best(results: str | os.PathLike[str] = RESULTS_JSON) -> str:
    """``meta.best_exportable`` of a finished benchmark run; ValueError saying what is wrong
    otherwise (missing, not JSON, partial run, unknown or non-exportable strategy)."""
    path = Path(results)
    try:
        meta = json.loads(path.read_text())["meta"]
        best = meta["best_exportable"]
        complete = meta.get("complete", False)
    except FileNotFoundError as exc:
        raise ValueError(f"no benchmark results at {path}") from exc
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path} is not a readable benchmark result ({type(exc).__name__}: {exc})") from exc
    if not complete:
        raise ValueError(f"{path} is a partial benchmark run")
    if best not in STRATEGIES:
        raise ValueError(f"{path} names an unknown strategy {best!r}")
    if not make_strategy(best).exportable():
        raise ValueError(f"{path} names {best!r}, whose global model the ONNX backbone does not compute")
    return best


def check_requested(name: str) -> None:
    """Raise ValueError for a --pretrain-strategy the demo cannot export (before any work starts)."""
    if name not in CHOICES:
        raise ValueError(f"unknown pretraining strategy {name!r}; choose one of {', '.join(CHOICES)}")
    if name in STRATEGIES and not make_strategy(name).exportable():
        raise ValueError(f"{name} cannot be the demo's backbone: its global model quantises tokens with a "
                         "memory the ONNX backbone does not contain")


def choose_backbone(
    requested: str = AUTO,
    *,
    results: str | os.PathLike[str] = RESULTS_JSON,
    data_dir: str | os.PathLike[str] | None = None,
    holdout: tuple[str, ...] = DEMO_HOLDOUT,
) -> BackboneChoice:
    """Apply the selection rule of this module; `requested` other than "auto" overrides it."""
    check_requested(requested)
    if requested == ETTH1_ONLY:
        return BackboneChoice(ETTH1_ONLY, "requested with --pretrain-strategy")
    domains = tuple(d for d in available_domains(data_dir) if d not in holdout)
    if not domains:
        return BackboneChoice(ETTH1_ONLY, "fallback: no multi-domain datasets found (give --data-dir)")
    if requested != AUTO:
        return BackboneChoice(requested, "requested with --pretrain-strategy", domains, holdout)
    try:
        best = ranked_best(results)
        reason = f"ranked best exportable in {_shown(results)}"
    except ValueError as exc:
        log.warning("demo backbone: %s; falling back to %s", exc, FALLBACK_STRATEGY)
        best, reason = FALLBACK_STRATEGY, f"fallback ({exc})"
    return BackboneChoice(best, reason, domains, holdout)


def _shown(path: str | os.PathLike[str]) -> str:
    p = Path(path).resolve()
    try:
        return str(p.relative_to(RESULTS_JSON.parents[2]))
    except ValueError:
        return str(p)


def pretrained_backbone(
    choice: BackboneChoice,
    config: TSFMConfig,
    cache_dir: str | os.PathLike[str],
    *,
    data_dir: str | os.PathLike[str] | None = None,
    budget: BackboneBudget = BackboneBudget(),
    etth1_args: dict[str, Any] | None = None,
    threads: int | None = None,
    progress: bool = False,
) -> tuple[TSFM, dict[str, Any]]:
    """(model, meta): load the chosen backbone from `cache_dir` or pretrain and cache it. The file
    name hashes config, strategy, domains and budget, so changing any of them retrains; an
    interrupted silo run resumes from its round checkpoint; a corrupt cache file is retrained over."""
    if choice.strategy == ETTH1_ONLY:
        model = pretrained_tsfm(cache_dir, config, data_dir=data_dir, threads=threads, progress=progress,
                                **(etth1_args or {}))
        return model, {"strategy": ETTH1_ONLY, "datasets": ["etth1"]}
    from coordinator.pretrain.federated import FederatedSettings, run_federated

    settings = FederatedSettings(strategy=choice.strategy, rounds=budget.rounds, local_steps=budget.local_steps,
                                 batch_size=budget.batch_size, lr=budget.lr, domains=choice.domains,
                                 holdout=choice.held_out, seed=budget.seed)
    blob = json.dumps({"config": config.to_dict(), "settings": settings.to_json()}, sort_keys=True)
    path = Path(cache_dir) / f"tsfm-{choice.strategy}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}.pt"
    if path.is_file():
        try:
            model, meta = read_checkpoint(path)
            log.info("loaded pretrained %s backbone from %s", choice.strategy, path)
            return model, meta
        except ValueError as exc:
            log.warning("ignoring unusable cache file: %s", exc)
    rounds_file = path.with_suffix(".round.pt")
    try:
        result = run_federated(config, settings, data_dir=data_dir, checkpoint=rounds_file, resume=True,
                               progress=progress, threads=threads)
    except ValueError as exc:
        if not rounds_file.is_file():
            raise
        log.warning("starting over: cannot resume from %s (%s)", rounds_file, exc)
        rounds_file.unlink()
        result = run_federated(config, settings, data_dir=data_dir, checkpoint=rounds_file, resume=True,
                               progress=progress, threads=threads)
    meta = {"strategy": choice.strategy, "datasets": list(choice.datasets), "domains": list(result.domains),
            "held_out": list(choice.held_out), "val_mse": result.val_mse, "best_round": result.best_round,
            "wall_s": result.wall_s, "budget": asdict(budget), "history": result.history}
    save_checkpoint(result.model, path, meta=meta)
    rounds_file.unlink(missing_ok=True)  # only needed to resume an interrupted run
    log.info("pretrained %s backbone in %.0f s (val mse %.4f), cached at %s", choice.strategy, result.wall_s,
             result.val_mse, path)
    return result.model, meta
