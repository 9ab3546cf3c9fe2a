"""Rebuild the LiteRT test fixture in this folder (needs the TFLite conversion env; ~1 min).

CI cannot convert (the conversion env costs ~2 GB and minutes), so tests/test_tflite.py runs the
device path on these committed files instead: a tiny TSFM (context 96, 7,440 parameters) trained for
a few seeded steps on ETTh1 (model.pt), its ONNX export (backbone.onnx, head.onnx, head.npz,
spec.json), its TFLite files (backbone.tflite, backbone.int8.tflite) and ``reference.npz``: raw
windows and what torch computes on them at conversion time (features, loc, scale, point forecast),
the numbers the device must reproduce.

    python tests/data/tflite/regenerate.py      # from the repository root, in the dev venv
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))

from coordinator.models.checkpoints import save_checkpoint  # noqa: E402
from coordinator.models.tsfm import TSFMConfig  # noqa: E402
from coordinator.pretrain.training import train_tsfm  # noqa: E402
from export.onnx_export import export_model, parity_sample  # noqa: E402
from export.tflite_export import export_tflite  # noqa: E402

CONFIG = TSFMConfig(context=96, horizon=24, patch_len=16, stride=8, d_model=16, n_heads=2, n_layers=1, d_ff=32,
                    dropout=0.0, feature_dim=16)
N_REFERENCE = 45  # 32 + 8 + 5 x 1: every signature of the file is used when the device runs them


def main() -> None:
    model = train_tsfm(CONFIG, steps=30, batch_size=64, seed=0, threads=1, progress=False).model.eval()
    save_checkpoint(model, HERE / "model.pt")  # the torch side, for tests that compare formats to torch
    export_model(model, HERE)
    result = export_tflite(model, HERE)
    x = parity_sample(model, n=N_REFERENCE, seed=1)
    with torch.no_grad():
        features, loc, scale = model.features(torch.from_numpy(x))
        point, _ = model(torch.from_numpy(x))
    np.savez(HERE / "reference.npz", x=x, features=features.numpy(), loc=loc.numpy(), scale=scale.numpy(),
             point=point.numpy())
    for name, report in result.parity.items():
        print(name, report)


if __name__ == "__main__":
    main()
