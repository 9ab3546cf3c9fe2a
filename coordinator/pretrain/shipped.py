"""The pretrained TSFM that ships inside the package: what `fedge demo`, `fedge export` and `fedge serve`
use when given no model, so a fresh install needs no pretraining and no data directory.

The artifact is a versioned folder, ``coordinator/pretrained/<VERSION>/`` in the repository (a checkout or an
editable install reads it there); a built wheel carries it as one ``<VERSION>.tar.xz`` (about 3 MB instead of 8 MB
in every install, devices included: ``coordinator.pretrain.archive``), unpacked once into ``~/.cache/fedge`` when
first used:

* ``model.pt`` -- the torch checkpoint (coordinator side: export, fleet heads, fine-tuning);
* ``backbone.onnx``, ``backbone.int8.onnx``, ``backbone.tflite``, ``backbone.int8.tflite``, ``head.onnx``,
  ``head.npz``, ``spec.json`` -- what a device runs (no torch needed), as ``fedge export`` writes them;
* ``head.etth1.npz`` -- a residual head fit on ETTh1's training split (`add_etth1_head`): the feature head plus
  a linear map of the last k context values, which the fleet does not train (it refuses the file by name);
* ``card.json`` -- the recipe and the scores that ``docs/model-card.md`` reports and that
  ``tests/test_shipped_model.py`` re-measures on the shipped files.

``fedge pretrain --strategy shipped`` re-runs :data:`RECIPE` from the data (`reproduce`), and
``benchmarks/foundation.py ship`` builds the folder from a checkpoint (`build_artifact`).
"""

from __future__ import annotations

import json
import lzma
import os
import shutil
import tarfile
from pathlib import Path
from typing import Any

VERSION = "tsfm-tiny-v2"
ARTIFACT_DIR = Path(__file__).resolve().parents[1] / "pretrained" / VERSION
ARCHIVE = ARTIFACT_DIR.with_name(VERSION + ".tar.xz")  # what an installed wheel carries instead of the folder
CHECKPOINT_NAME = "model.pt"
CARD_NAME = "card.json"
ETTH1_HEAD = "head.etth1.npz"  # the residual head fit on ETTh1's training split (add_etth1_head)
DEVICE_FILES = ("backbone.onnx", "backbone.int8.onnx", "backbone.tflite", "backbone.int8.tflite", "head.onnx",
                "head.npz", "spec.json")

# The recipe (benchmarks/foundation.py runs the same settings as its cells): centralized mixed batches
# over the training splits of five real domains plus the synthetic silo, finance held out (the demo's
# exchange-rate devices read that whole series), a 336-step head so one model serves H 96/192/336.
DOMAINS = ("energy", "air_quality", "traffic", "weather", "nature")
HELD_OUT = ("finance",)
HORIZON = 336
BATCH = 64
# Recipe 2 of the foundation grid: v1 (lr 1e-3 from the first step) left 33 of its 64 features dead.
LR = 5e-4
WARMUP_ROUNDS = 1.0
SHARE = 0.2
RECIPE: dict[str, Any] = {"strategy": "centralized", "rounds": 50, "windows": 288_000, "batch_size": BATCH,
                          "lr": LR, "warmup_rounds": WARMUP_ROUNDS, "domains": DOMAINS, "holdout": HELD_OUT,
                          "synthetic_share": SHARE, "seed": 0}


class ShippedModelMissing(FileNotFoundError):
    """The package was installed without its pretrained artifact (or a file of it was removed)."""


def artifact_dir() -> Path:
    """The shipped folder: the repository's, else the installed archive unpacked (cached); ShippedModelMissing if
    neither holds the checkpoint."""
    if (ARTIFACT_DIR / CHECKPOINT_NAME).is_file():
        return ARTIFACT_DIR
    if ARCHIVE.is_file():
        from coordinator.pretrain.archive import unpacked

        try:
            folder = unpacked(ARCHIVE)
        except (OSError, EOFError, ValueError, lzma.LZMAError, tarfile.TarError) as exc:
            raise ShippedModelMissing(f"the shipped model archive {ARCHIVE} is unreadable: {exc}") from None
        if (folder / CHECKPOINT_NAME).is_file():
            return folder
    raise ShippedModelMissing(f"the shipped model {VERSION} is missing from {ARTIFACT_DIR.parent}")


def shipped_checkpoint() -> Path:
    return artifact_dir() / CHECKPOINT_NAME


def card() -> dict[str, Any]:
    return json.loads((artifact_dir() / CARD_NAME).read_text())


def load_shipped() -> tuple[Any, dict[str, Any]]:
    """(TSFM, checkpoint meta) of the shipped model."""
    from coordinator.models.checkpoints import read_checkpoint

    return read_checkpoint(shipped_checkpoint())


def copy_device_files(out_dir: str | os.PathLike[str]) -> list[Path]:
    """Copy the shipped export (ONNX fp32/int8, TFLite fp32/int8, head, spec) to `out_dir`, checking
    each file against the sha256 recorded in spec.json so a damaged install is never passed on."""
    from edge_client.runtime.backbone import sha256_file

    src = artifact_dir()
    spec = json.loads((src / "spec.json").read_text())
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name in DEVICE_FILES:
        if not (src / name).is_file():
            continue
        expected = spec.get("files", {}).get(name, {}).get("sha256")
        if expected and sha256_file(src / name) != expected:
            raise ValueError(f"shipped file {name} does not match its sha256 in spec.json (damaged install)")
        written.append(Path(shutil.copy2(src / name, out / name)))
    return written


def recipe_settings(n_silos: int, seed: int | None = None) -> Any:
    """The FederatedSettings of the recipe for `n_silos` clients (local steps from the window budget)."""
    from coordinator.pretrain.federated import FederatedSettings

    r = RECIPE
    local = max(1, round(r["windows"] / (r["rounds"] * n_silos * r["batch_size"])))
    return FederatedSettings(strategy=r["strategy"], rounds=r["rounds"], local_steps=local, batch_size=r["batch_size"],
                             lr=r["lr"], warmup_rounds=r["warmup_rounds"], domains=r["domains"], holdout=r["holdout"],
                             seed=r["seed"] if seed is None else seed, synthetic_share=r["synthetic_share"])


def tsfm_config() -> Any:
    from coordinator.models.tsfm import TSFMConfig

    return TSFMConfig.tiny(horizon=HORIZON)


def device_path_mse(backbone: str | os.PathLike[str], head_npz: str | os.PathLike[str], horizon: int = 96,
                    dataset: str = "etth1", data_dir: str | os.PathLike[str] | None = None,
                    threads: int = 2) -> dict[str, float]:
    """ETTh1 (or another dataset) test MSE / MAE of an exported backbone + numpy head, on the standard
    protocol (stride 1, every channel, scaler fit on the training rows) -- computed exactly the way a
    device computes forecasts (ONNX Runtime or LiteRT, no torch). The head may be a residual head (a lag block
    beside the features, :mod:`edge_client.learning.residual`)."""
    import numpy as np

    from edge_client.data.datasets import load_series
    from edge_client.learning.residual import check_residual_head, residual_forecast, slice_residual
    from edge_client.learning.windows import ETT_TEST_END, ETT_TRAIN_END, ETT_VAL_END, Scaler, make_windows
    from edge_client.runtime.backbone import BackboneRunner

    values = load_series(dataset, data_dir).values
    if dataset.startswith("ett"):
        train_end, val_end, test_end = ETT_TRAIN_END, ETT_VAL_END, ETT_TEST_END
    else:
        train_end, val_end, test_end = int(len(values) * 0.7), int(len(values) * 0.8), len(values)
    scaled = Scaler.fit(values[:train_end]).transform(values).astype(np.float32)
    runner = BackboneRunner(backbone, threads=threads)
    with np.load(head_npz, allow_pickle=False) as f:
        params = slice_residual({k: f[k] for k in f.files}, horizon)
    check_residual_head(params, runner.spec.feature_dim, horizon, len(runner.spec.quantiles), runner.spec.context)
    sq, ab, n = 0.0, 0.0, 0
    for c in range(scaled.shape[1]):
        x, y = make_windows(scaled[:, c], runner.spec.context, horizon, 1, val_end, test_end)
        feats = runner.features(x, batch_size=256)
        pred, _ = residual_forecast(params, feats, x)
        sq += float(np.sum((pred.astype(np.float64) - y) ** 2))
        ab += float(np.sum(np.abs(pred.astype(np.float64) - y)))
        n += y.size
    return {"mse": sq / n, "mae": ab / n, "windows": float(n // horizon)}


def add_etth1_head(card: dict[str, Any], model: Any, out_dir: str | os.PathLike[str],
                   data_dir: str | os.PathLike[str] | None = None, threads: int | None = None) -> dict[str, Any]:
    """Fit :data:`ETTH1_HEAD` for `model` (a residual head: ridge on the frozen features plus the last k context
    values, :func:`coordinator.pretrain.residual_head.fit_residual_head`), write it into `out_dir`, record its
    sha256 in spec.json, and put its choice, its standard-protocol scores and its device-path score into `card`
    (in place). Returns the fit's info with the validation sweep, which the card leaves out."""
    import numpy as np

    from coordinator.pretrain.residual_head import fit_residual_head, residual_protocol_scores
    from edge_client.runtime.backbone import sha256_file

    out = Path(out_dir)
    dd = str(data_dir) if data_dir else None
    params, info = fit_residual_head(model, "etth1", dd, threads=threads)
    path = out / ETTH1_HEAD
    np.savez(path, **params)
    spec = json.loads((out / "spec.json").read_text())
    spec["files"][ETTH1_HEAD] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    (out / "spec.json").write_text(json.dumps(spec, indent=2, sort_keys=True) + "\n")
    brief = {k: v for k, v in info.items() if k != "sweep"}
    card["etth1_head"] = brief
    card.setdefault("scores", {})["etth1_head"] = {"scores": residual_protocol_scores(model, params, "etth1", dd,
                                                                                      threads), **brief}
    card.setdefault("device_path", {})[f"backbone.onnx + {ETTH1_HEAD}"] = {
        "96": device_path_mse(out / "backbone.onnx", path, 96, data_dir=data_dir)}
    card.setdefault("files", {})[ETTH1_HEAD] = path.stat().st_size
    return info


def reproduce(out_dir: str | os.PathLike[str], *, data_dir: str | os.PathLike[str] | None = None,
              threads: int | None = None, console: Any = None) -> Path:
    """``fedge pretrain --strategy shipped``: run :data:`RECIPE` from the data (round checkpoints in
    `out_dir`, resumed when present), save ``out_dir/model.pt`` and print its ETTh1 score next to the
    shipped one. The same settings and seed give the same training stream; the weights match the
    shipped ones up to floating-point summation order (thread count, BLAS)."""
    from rich.console import Console

    from coordinator.models.checkpoints import save_checkpoint
    from coordinator.pretrain.federated import run_federated
    from coordinator.pretrain.silos import available_domains

    console = console or Console()
    missing = [d for d in DOMAINS if d not in available_domains(data_dir)]
    if missing:
        raise FileNotFoundError(f"reproducing {VERSION} needs the datasets of {', '.join(missing)} "
                                "(give --data-dir or set $FEDGE_DATA_DIR)")
    n_silos = len(DOMAINS) + (1 if SHARE > 0 else 0)
    settings = recipe_settings(n_silos)
    out = Path(out_dir)
    result = run_federated(tsfm_config(), settings, data_dir=data_dir, checkpoint=out / "model.round.pt",
                           progress=True, threads=threads)
    path = save_checkpoint(result.model, out / CHECKPOINT_NAME, meta={
        "version": VERSION, "recipe": settings.to_json(), "val_mse": result.val_mse, "best_round": result.best_round,
        "history": result.history})
    from coordinator.pretrain.protocol import model_protocol_scores

    mine = model_protocol_scores(result.model, ["etth1"], str(data_dir) if data_dir else None, threads)["etth1"]
    try:
        shipped = card()["scores"]["in_domain"]["etth1"]["H96"]["mse"]
        ref = f" (shipped {VERSION}: {shipped:.4f})"
    except (OSError, KeyError, ValueError):
        ref = ""
    console.print(f"saved {path}: val MSE {result.val_mse:.4f} (round {result.best_round}); ETTh1 test H96 MSE "
                  f"{mine['H96']['mse']:.4f}{ref}")
    return path
