"""torch TSFM -> ONNX files a device runs with ONNX Runtime alone, plus the parity evidence.

What a device receives (:func:`export_model`):

* ``backbone.onnx`` -- "context" (batch, L) -> "features" (batch, D), "loc" (batch, 1), "scale"
  (batch, 1). Frozen on the device; carries the model spec as ONNX metadata ("fedge.spec") so
  the runtime needs no side file to know context/horizon/quantiles.
* ``head.onnx`` -- "features" -> "point" (batch, H), "quantiles" (batch, Q, H), normalised space.
* ``head.npz`` -- the same head as float32 arrays (``TSFM.head_state()``): the device's numpy
  trainer starts from these.
* ``spec.json`` -- spec + sha256 of every file + parity numbers.

The dynamo exporter (``torch.export`` based) is the one torch maintains; the TorchScript exporter is
kept only as a fallback, and the log and the spec say which one produced the files.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from coordinator.models.tsfm import TSFM
from edge_client.learning.head import head_outputs
from edge_client.runtime.backbone import ort_session, sha256_file  # sha256_file re-exported: recommender_export, tests
from edge_client.runtime.spec import SPEC_KEY, ModelSpec

log = logging.getLogger(__name__)

OPSET = 18
_NOISY_LOGGERS = ("torch.onnx", "onnxscript", "onnx_ir")
EXPORT_BATCH = 4  # example batch: ≥2, or torch.export specialises the batch dimension to 1


class _BackboneGraph(nn.Module):
    """The backbone as a tuple-returning module with the device's input/output contract."""

    def __init__(self, model: TSFM) -> None:
        super().__init__()
        self.backbone = model.backbone

    def forward(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.backbone(context)


class _HeadGraph(nn.Module):
    def __init__(self, model: TSFM) -> None:
        super().__init__()
        self.head = model.head

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(features)


def model_spec(model: TSFM) -> ModelSpec:
    """What a device must know to use the exported files (:class:`~edge_client.runtime.spec.ModelSpec`)."""
    c = model.config
    return ModelSpec(context=c.context, feature_dim=c.feature_dim, horizon=c.horizon, quantiles=tuple(c.quantiles),
                     model_id=model.model_id(), kind="tsfm", patch_len=c.patch_len, stride=c.stride,
                     n_params=model.n_params())


def file_spec(model: TSFM, **file_facts: Any) -> dict[str, Any]:
    """The spec a TSFM file carries in its metadata: the model spec, the full torch config and facts about the
    file (which graph, which exporter or format)."""
    return {**model_spec(model).to_dict(), "config": model.config.to_dict(), **file_facts}


def read_spec(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The spec stored in an exported file, read the way a device does (onnxruntime only)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return json.loads(sess.get_modelmeta().custom_metadata_map[SPEC_KEY])


# ------------------------------------------------------------------------------------ export


def export_graph(
    module: nn.Module, example: torch.Tensor, path: Path, input_name: str, output_names: list[str],
    spec: dict[str, Any],
) -> str:
    """Export one graph with a dynamic batch dimension; returns the exporter that succeeded."""
    module.eval()
    try:
        proto = _export_dynamo(module, example, input_name, output_names)
        exporter = "dynamo"
    except Exception as exc:  # the dynamo exporter fails on unsupported ops; fall back, loudly
        log.warning("dynamo ONNX export of %s failed (%s: %s); using the legacy exporter",
                    path.name, type(exc).__name__, exc)
        proto = _export_legacy(module, example, input_name, output_names)
        exporter = "torchscript"
    set_metadata(proto, {SPEC_KEY: json.dumps({**spec, "exporter": exporter}, sort_keys=True)})
    onnx.checker.check_model(proto)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(path), save_as_external_data=False)  # one self-contained file
    log.info("exported %s with the %s exporter", path, exporter)
    return exporter


@contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The dynamo exporter logs a warning per missing torchvision op and onnxscript/onnx_ir log
    every optimisation pass at INFO; none of it is actionable here, so hold those loggers at
    ERROR while exporting (our own log line says which exporter ran)."""
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _export_dynamo(
    module: nn.Module, example: torch.Tensor, input_name: str, output_names: list[str]
) -> onnx.ModelProto:
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    with _quiet_exporter(), torch.no_grad():
        program = torch.onnx.export(
            module, (example,), dynamo=True, input_names=[input_name], output_names=output_names,
            dynamic_shapes=({0: batch},), opset_version=OPSET, external_data=False, optimize=True, verbose=False,
        )
    return program.model_proto


def _export_legacy(
    module: nn.Module, example: torch.Tensor, input_name: str, output_names: list[str]
) -> onnx.ModelProto:
    axes = {name: {0: "batch"} for name in [input_name, *output_names]}
    with tempfile.TemporaryDirectory() as tmp, _quiet_exporter(), _no_mha_fastpath(), torch.no_grad():
        target = Path(tmp) / "model.onnx"
        torch.onnx.export(
            module, (example,), str(target), dynamo=False, input_names=[input_name], output_names=output_names,
            dynamic_axes=axes, opset_version=OPSET,
        )
        return onnx.load(str(target), load_external_data=True)


@contextmanager
def _no_mha_fastpath() -> Iterator[None]:
    """In eval mode nn.TransformerEncoderLayer dispatches to the fused
    aten::_transformer_encoder_layer_fwd, which TorchScript tracing records and cannot translate;
    the unfused path is mathematically the same."""
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


def set_metadata(proto: onnx.ModelProto, props: dict[str, str]) -> None:
    keep = [p for p in proto.metadata_props if p.key not in props]
    del proto.metadata_props[:]
    proto.metadata_props.extend(keep)
    for key, value in props.items():
        proto.metadata_props.add(key=key, value=value)


def _example(model: TSFM, width: int) -> torch.Tensor:
    """A deterministic, non-degenerate example batch (random walks) for tracing."""
    gen = torch.Generator().manual_seed(0)
    return torch.randn(EXPORT_BATCH, width, generator=gen).cumsum(dim=1)


def export_backbone(model: TSFM, path: str | os.PathLike[str]) -> Path:
    """Write the frozen backbone: "context" (batch, L) float32 -> features, loc, scale."""
    path = Path(path)
    model.eval()
    export_graph(_BackboneGraph(model), _example(model, model.config.context), path, "context",
            ["features", "loc", "scale"], file_spec(model, graph="backbone"))
    return path


def export_head(model: TSFM, path: str | os.PathLike[str]) -> Path:
    """Write the linear head: "features" (batch, D) -> point (batch, H), quantiles (batch, Q, H),
    both in RevIN-normalised space (the device de-normalises with the backbone's loc/scale)."""
    path = Path(path)
    model.eval()
    export_graph(_HeadGraph(model), _example(model, model.config.feature_dim), path, "features",
            ["point", "quantiles"], file_spec(model, graph="head"))
    return path


def exporter_of(path: str | os.PathLike[str]) -> str:
    """Which exporter wrote a file (recorded in its spec)."""
    return read_spec(path).get("exporter", "unknown")


# ------------------------------------------------------------------------------------ parity


@dataclass
class ParityReport:
    """Differences between torch and what the device computes, on the same raw windows.

    Absolute errors of the de-normalised forecast grow with the series' magnitude (float32 has
    ~7 digits: a value of 5,000 carries ~5e-4 of rounding), so the pass/fail gate also looks at
    the forecast error divided by each window's RevIN scale, which is unit-free.
    """

    backbone_max_abs_err: float
    backbone_mean_abs_err: float
    forecast_max_abs_err: float  # de-normalised point and quantiles, ONNX backbone + ONNX head
    forecast_mean_abs_err: float
    numpy_head_max_abs_err: float  # head_state() formula in numpy vs torch, de-normalised
    forecast_max_scaled_err: float = 0.0  # max |Δ| / RevIN scale over ONNX and numpy forecasts
    batch_sizes: list[int] = field(default_factory=list)

    def ok(self, tol: float = 1e-4) -> bool:
        return max(self.backbone_max_abs_err, self.forecast_max_scaled_err) < tol


def numpy_head(state: dict[str, np.ndarray], features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The device's head, by the device's own code: (point_n (N, H), quantiles_n (N, Q, H)) in
    normalised space, so the parity check proves what devices will compute."""
    return head_outputs(state, features)


def denormalised(point_n: np.ndarray, quantiles_n: np.ndarray, loc: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """(N, (1+Q)*H): point then quantiles per row, in the input's units, as the device outputs them."""
    n = len(point_n)
    return np.concatenate([point_n * scale + loc, (quantiles_n.reshape(n, -1) * scale + loc)], axis=1)


@torch.no_grad()
def torch_reference(model: TSFM, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(features, forecast rows as in :func:`denormalised`, loc, scale) from torch."""
    model.eval()
    xt = torch.from_numpy(x)
    features, loc, scale = model.features(xt)
    point, quantiles = model(xt)
    forecast = np.concatenate([point.numpy(), quantiles.numpy().reshape(len(x), -1)], axis=1)
    return features.numpy(), forecast, loc.numpy(), scale.numpy()


def check_parity(
    model: TSFM, backbone_path: str | os.PathLike[str], head_path: str | os.PathLike[str], x: np.ndarray
) -> ParityReport:
    """Run torch, ONNX Runtime (batch 1 and the whole batch, to prove the batch is dynamic) and the
    numpy head on the same raw windows x (N, L) and report the worst disagreement."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != model.config.context:
        raise ValueError(f"x must be (N, {model.config.context}), got {x.shape}")
    feats_t, forecast_t, loc_t, scale_t = torch_reference(model, x)
    backbone, head = ort_session(backbone_path, None), ort_session(head_path, None)
    sizes = sorted({1, len(x)})
    feat_err, fc_err, fc_scaled = [], [], []
    for size in sizes:
        for i in range(0, len(x), size):
            rows = slice(i, i + size)
            f, loc, scale = backbone.run(None, {"context": x[rows]})
            forecast = denormalised(*head.run(None, {"features": f}), loc, scale)
            feat_err.append(np.abs(f - feats_t[rows]).ravel())
            err = np.abs(forecast - forecast_t[rows])
            fc_err.append(err.ravel())
            fc_scaled.append((err / scale_t[rows]).ravel())
    np_forecast = denormalised(*numpy_head(model.head_state(), feats_t), loc_t, scale_t)
    np_err = np.abs(np_forecast - forecast_t)
    feat_all, fc_all = np.concatenate(feat_err), np.concatenate(fc_err)
    return ParityReport(
        backbone_max_abs_err=float(feat_all.max()),
        backbone_mean_abs_err=float(feat_all.mean()),
        forecast_max_abs_err=float(fc_all.max()),
        forecast_mean_abs_err=float(fc_all.mean()),
        numpy_head_max_abs_err=float(np_err.max()),
        forecast_max_scaled_err=float(max(np.concatenate(fc_scaled).max(), (np_err / scale_t).max())),
        batch_sizes=sizes,
    )


def parity_sample(model: TSFM, n: int = 8, seed: int = 0) -> np.ndarray:
    """Synthetic raw windows with varied level, scale, trend and seasonality: parity must hold on
    inputs in real units, not only on standard-normal noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(model.config.context)
    level = rng.uniform(-50, 50, (n, 1))
    amp = rng.uniform(0.1, 20, (n, 1))
    season = amp * np.sin(2 * np.pi * t / rng.choice([12, 24, 168], (n, 1)))
    walk = rng.normal(0, 1, (n, len(t))).cumsum(axis=1) * rng.uniform(0.01, 2, (n, 1))
    return (level + season + walk).astype(np.float32)


# ---------------------------------------------------------------------------------- bundle


@dataclass
class ExportResult:
    """Paths of the exported files, the spec written beside them and the parity evidence."""

    out_dir: Path
    backbone: Path
    head: Path
    head_npz: Path
    spec_path: Path
    spec: dict[str, Any]
    parity: ParityReport


def export_model(
    model: TSFM, out_dir: str | os.PathLike[str], sample: np.ndarray | None = None, tol: float = 1e-4
) -> ExportResult:
    """Export backbone + head, save the numpy head, verify parity and write spec.json.

    Raises RuntimeError when parity is worse than `tol`: a bundle whose device forecasts differ
    from the coordinator's must not ship.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    backbone = export_backbone(model, out / "backbone.onnx")
    head = export_head(model, out / "head.onnx")
    head_npz = out / "head.npz"
    np.savez(head_npz, **model.head_state())
    parity = check_parity(model, backbone, head, parity_sample(model) if sample is None else sample)
    if not parity.ok(tol):
        raise RuntimeError(f"ONNX parity check failed (tol {tol}): {parity}")
    spec = {
        **file_spec(model),
        "exporter": {"backbone": exporter_of(backbone), "head": exporter_of(head)},
        "files": {p.name: {"sha256": sha256_file(p), "size": p.stat().st_size} for p in (backbone, head, head_npz)},
        "inputs": {"backbone": ["context"], "head": ["features"]},
        "outputs": {"backbone": ["features", "loc", "scale"], "head": ["point", "quantiles"]},
        "parity": asdict(parity),
    }
    spec_path = out / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=2, sort_keys=True) + "\n")
    return ExportResult(out, backbone, head, head_npz, spec_path, spec, parity)
