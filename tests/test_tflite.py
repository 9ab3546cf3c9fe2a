"""TFLite export and the LiteRT runtime path on the device.

CI has no conversion env (litert-torch, ~2 GB), so the device path runs on the committed fixture in
tests/data/tflite (rebuilt by its regenerate.py): a tiny TSFM's ONNX and TFLite backbones plus what
torch computed on reference windows at conversion time. The conversion itself is tested only where
the conversion env exists.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest

from edge_client.bundles.store import BundleStore, backbone_key
from edge_client.runtime import litert
from edge_client.runtime.backbone import LITERT, ONNXRUNTIME, BackboneRunner, ModelLoadError, runtime_for
from edge_client.runtime.profile import DeviceProfile
from export.bundle import build_bundle, generate_key, iter_chunks
from export.tflite_export import CONVERT_PINS, TFLITE_INT8_NAME, TFLITE_NAME, env_python

FIXTURE = Path(__file__).parent / "data" / "tflite"
ROOT = Path(__file__).resolve().parent.parent
FP32_TOL = 1e-4  # features / loc / scale vs torch (float32 kernels of two runtimes)
INT8_TOL = 0.1  # features of the dynamic-range int8 file vs torch


@pytest.fixture(scope="module")
def ref() -> dict[str, np.ndarray]:
    with np.load(FIXTURE / "reference.npz") as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def runner() -> BackboneRunner:
    return BackboneRunner(FIXTURE / TFLITE_NAME)


# --------------------------------------------------------------------------- runtime


def test_runner_detects_litert_and_reads_the_spec_from_the_file(runner):
    spec = json.loads((FIXTURE / "spec.json").read_text())
    assert runner.runtime == LITERT and runner.runtime_version.startswith("ai-edge-litert")
    assert (runner.spec.context, runner.spec.feature_dim, runner.spec.horizon) == (
        spec["context"], spec["feature_dim"], spec["horizon"])
    assert runner.spec.model_id == spec["model_id"] and runner.spec.quantiles == tuple(spec["quantiles"])
    assert BackboneRunner(FIXTURE / "backbone.onnx").runtime == ONNXRUNTIME


@pytest.mark.parametrize("batch_size", [1, 5, 32, 256])
def test_litert_features_match_torch_at_every_batch_size(runner, ref, batch_size):
    """45 rows go through the 32-, 8- and 1-row signatures (or padded ones for batch_size 5)."""
    out = runner.features(ref["x"], batch_size=batch_size)
    assert out.feats.shape == ref["features"].shape
    for got, want in ((out.feats, ref["features"]), (out.loc, ref["loc"]), (out.scale, ref["scale"])):
        np.testing.assert_allclose(got, want, atol=FP32_TOL * np.abs(want).max().clip(1), rtol=0)


def test_litert_and_onnx_give_the_same_features(runner, ref):
    onnx = BackboneRunner(FIXTURE / "backbone.onnx").features(ref["x"])
    np.testing.assert_allclose(runner.features(ref["x"]).feats, onnx.feats, atol=FP32_TOL, rtol=0)


def test_int8_tflite_is_close_to_torch_but_really_quantised(ref):
    out = BackboneRunner(FIXTURE / TFLITE_INT8_NAME).features(ref["x"])
    err = np.abs(out.feats - ref["features"]).max()
    assert 1e-5 < err < INT8_TOL


def test_empty_and_bad_inputs(runner):
    assert runner.features(np.zeros((0, runner.spec.context), np.float32)).feats.shape == (0, runner.spec.feature_dim)
    with pytest.raises(ValueError, match="contexts must be"):
        runner.features(np.zeros((2, runner.spec.context + 1), np.float32))
    bad = np.ones((2, runner.spec.context), np.float32)
    bad[0, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        runner.features(bad)


def test_metadata_reader_agrees_with_the_tflite_schema():
    """Our flatbuffer walk against the schema's generated reader, on the same bytes."""
    from ai_edge_litert import schema_py_generated as schema

    data = (FIXTURE / TFLITE_NAME).read_bytes()
    model = schema.Model.GetRootAsModel(data, 0)
    expected = {}
    for i in range(model.MetadataLength()):
        md = model.Metadata(i)
        expected[md.Name().decode()] = model.Buffers(md.Buffer()).DataAsNumpy().tobytes()
    assert litert.read_metadata(data) == expected
    spec = json.loads(expected["fedge.spec"])
    assert spec["format"] == "tflite-fp32" and spec["signature_batches"] == [1, 8, 32]


def test_metadata_reader_follows_buffers_stored_after_the_flatbuffer():
    """Large constants may live past the flatbuffer (Buffer.offset/size, as ai-edge-quantizer writes them)."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    payload = b'{"moved": true}'
    m = schema.ModelT.InitFromPackedBuf(bytearray((FIXTURE / TFLITE_NAME).read_bytes()), 0)
    index = next(md.buffer for md in m.metadata if md.name in (b"fedge.spec", "fedge.spec"))
    m.buffers[index].data, m.buffers[index].size = None, len(payload)

    def pack(offset: int) -> bytes:
        m.buffers[index].offset = offset
        builder = flatbuffers.Builder(1024)
        builder.Finish(m.Pack(builder), file_identifier=b"TFL3")
        return bytes(builder.Output())

    head = pack(2)  # same width as the real offset, so the flatbuffer's length does not change
    data = pack(len(head)) + payload
    assert litert.read_metadata(data)["fedge.spec"] == payload
    with pytest.raises(litert.TFLiteFormatError, match="outside"):
        litert.read_metadata(data[: -len(payload) // 2])


# --------------------------------------------------------------------------- broken files


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "onnx-bytes"])
def test_corrupt_tflite_raises_model_load_error(tmp_path, damage):
    data = (FIXTURE / TFLITE_NAME).read_bytes()
    broken = {"truncated": data[: len(data) // 3], "garbage": b"\x00TFL3" + bytes(range(256)) * 8, "empty": b"",
              "onnx-bytes": (FIXTURE / "backbone.onnx").read_bytes()}[damage]
    path = tmp_path / "backbone.tflite"
    path.write_bytes(broken)
    with pytest.raises(ModelLoadError, match=r"backbone\.tflite"):
        BackboneRunner(path)


def test_tflite_without_spec_metadata_is_refused(tmp_path):
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    m = schema.ModelT.InitFromPackedBuf(bytearray((FIXTURE / TFLITE_NAME).read_bytes()), 0)
    m.metadata = [md for md in m.metadata if md.name not in (b"fedge.spec", "fedge.spec")]
    builder = flatbuffers.Builder(1024)
    builder.Finish(m.Pack(builder), file_identifier=b"TFL3")
    path = tmp_path / "nospec.tflite"
    path.write_bytes(bytes(builder.Output()))
    assert "fedge.spec" not in litert.read_metadata(path.read_bytes())
    with pytest.raises(ModelLoadError, match=r"fedge\.spec"):
        BackboneRunner(path)


def test_runtime_detection_by_content(tmp_path):
    renamed = tmp_path / "model.bin"
    shutil.copyfile(FIXTURE / TFLITE_NAME, renamed)
    assert runtime_for(renamed) == LITERT and runtime_for(FIXTURE / "backbone.onnx") == ONNXRUNTIME
    assert BackboneRunner(renamed).runtime == LITERT
    with pytest.raises(ModelLoadError, match="unknown runtime"):
        BackboneRunner(renamed, runtime="tensorrt")


def test_no_litert_installed_gives_a_clear_error(monkeypatch):
    def missing(name):
        raise ImportError(f"No module named {name!r}")

    monkeypatch.setattr(litert.importlib, "import_module", missing)
    assert not litert.litert_available()
    with pytest.raises(ModelLoadError, match=r"fedge\[litert\]"):
        BackboneRunner(FIXTURE / TFLITE_NAME)


def test_falls_back_to_tflite_runtime(monkeypatch, ref):
    """On an old image only tflite_runtime exists; it offers the same Interpreter API."""
    import importlib

    real = importlib.import_module

    def old_image(name):
        if name.startswith("ai_edge_litert"):
            raise ImportError(name)
        return real("ai_edge_litert.interpreter" if name == "tflite_runtime.interpreter" else name)

    monkeypatch.setattr(litert.importlib, "import_module", old_image)
    r = BackboneRunner(FIXTURE / TFLITE_NAME)
    assert r.runtime_version.startswith("tflite-runtime")
    np.testing.assert_allclose(r.features(ref["x"][:3]).feats, ref["features"][:3], atol=FP32_TOL, rtol=0)


def test_edge_client_imports_and_runs_onnx_without_litert():
    code = ("import sys; sys.modules['ai_edge_litert'] = None; sys.modules['tflite_runtime'] = None\n"
            "import numpy as np, edge_client.bundles.store, edge_client.runtime.backbone as rt\n"
            "from edge_client.runtime.litert import litert_available\n"
            f"r = rt.BackboneRunner({str(FIXTURE / 'backbone.onnx')!r})\n"
            "print(r.runtime, r.features(np.ones((2, r.spec.context), np.float32)).feats.shape, litert_available())\n"
            "assert 'torch' not in sys.modules\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["onnxruntime", "(2,", "16)", "False"]


# --------------------------------------------------------------------------- bundles and profiles


@pytest.fixture(scope="module")
def key():
    return generate_key()


@pytest.fixture(scope="module")
def bundle(key, tmp_path_factory):
    return build_bundle(FIXTURE, tmp_path_factory.mktemp("tflite-bundle"), 1, key, chunk_size=16 * 1024)


def _install(store: BundleStore, bundle) -> bool:
    assert store.offer_manifest(bundle.manifest_bytes, bundle.signature) is not None
    for chunk in iter_chunks(bundle, "f"):
        store.add_chunk(chunk)
    return store.install(bundle.version)


def test_bundle_ships_both_runtimes(bundle):
    assert bundle.manifest.backbones == {"fp32": "backbone.onnx", "tflite-fp32": TFLITE_NAME,
                                         "tflite-int8": TFLITE_INT8_NAME}
    assert backbone_key(LITERT, "int8") == "tflite-int8" and backbone_key(ONNXRUNTIME, "int8") == "int8"


@pytest.mark.parametrize(("runtime", "fmt", "expected"), [
    (LITERT, "fp32", TFLITE_NAME), (LITERT, "int8", TFLITE_INT8_NAME),
    (ONNXRUNTIME, "fp32", "backbone.onnx"), (ONNXRUNTIME, "int8", "backbone.onnx"),  # no int8 ONNX shipped
])
def test_profile_runtime_and_format_pick_the_backbone(bundle, key, tmp_path, runtime, fmt, expected):
    store = BundleStore(tmp_path / "device", key.public_key(), runtime=runtime, preferred_format=fmt)
    assert _install(store, bundle), store.rejected  # the smoke check accepted every shipped backbone
    assert store.backbone_path().name == expected
    assert store.load_current().runtime == runtime


def test_litert_profile_without_interpreter_falls_back_to_onnx(bundle, key, tmp_path, monkeypatch, caplog):
    import edge_client.bundles.store as B

    monkeypatch.setattr(B, "litert_available", lambda: False)
    store = BundleStore(tmp_path / "device", key.public_key(), runtime=LITERT)
    with caplog.at_level("INFO", logger="fedge.bundle"):
        assert _install(store, bundle), store.rejected
    assert "no LiteRT interpreter" in caplog.text
    assert store.load_current().runtime == ONNXRUNTIME


def test_bundle_with_corrupt_tflite_is_refused(key, tmp_path):
    src = tmp_path / "export"
    shutil.copytree(FIXTURE, src)
    data = (src / TFLITE_NAME).read_bytes()
    (src / TFLITE_NAME).write_bytes(data[: len(data) // 2])
    broken = build_bundle(src, tmp_path / "bundle", 2, key, chunk_size=16 * 1024)
    store = BundleStore(tmp_path / "device", key.public_key(), runtime=LITERT)
    assert not _install(store, broken)
    assert store.rejected["corrupt_model"] == 1 and store.current_version is None


def test_profiles_accept_litert_only_as_a_known_runtime():
    base = dict(name="x", cores=4, memory_mb=1024, threads=1, preferred_format="fp32")
    assert DeviceProfile.from_dict({**base, "runtime": "litert"}).runtime == LITERT
    with pytest.raises(ValueError, match="runtime"):
        DeviceProfile.from_dict({**base, "runtime": "tensorrt"})


# --------------------------------------------------------------------------- conversion


def test_conversion_pins_match_the_pyproject_extra():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["tflite-convert"] == list(CONVERT_PINS)
    assert any(d.startswith("ai-edge-litert") for d in extras["litert"]) and "fedge[litert]" in extras["dev"]


def test_conversion_env_is_used_only_with_the_current_pins(tmp_path, monkeypatch):
    from export import tflite_export as T

    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "python").write_text("")
    assert T.env_python(tmp_path) is None  # an interrupted install has no pins file
    (tmp_path / "fedge-pins.txt").write_text("torch==2.12.0\nlitert-torch==0.9.0\n")
    assert T.env_python(tmp_path) is None  # older pins: ensure_env rebuilds it
    (tmp_path / "fedge-pins.txt").write_text("\n".join(CONVERT_PINS) + "\n")
    assert T.env_python(tmp_path) == tmp_path / "bin" / "python"
    monkeypatch.setenv("FEDGE_TFLITE_ENV", str(tmp_path))
    assert T.default_env_dir() == tmp_path and T.ensure_env() == tmp_path / "bin" / "python"


def test_cli_rejects_an_unknown_format(tmp_path):
    from typer.testing import CliRunner

    from coordinator.cli import app

    result = CliRunner().invoke(app, ["export", str(tmp_path / "x.pt"), "--format", "coreml"])
    assert result.exit_code == 2 and "--format" in result.output


@pytest.mark.slow
@pytest.mark.skipif(env_python() is None, reason="no TFLite conversion env (python -m export.tflite_export "
                    "--ensure-env builds it: ~2 GB); the device path is tested on the committed fixture")
def test_fedge_export_format_tflite_round_trip(tmp_path):
    """`fedge export --format tflite` on the fixture's checkpoint: converts in the conversion env, checks
    parity, records the files in spec.json, and the device runs the result like the committed file."""
    from typer.testing import CliRunner

    from coordinator.cli import app

    out = tmp_path / "model"
    result = CliRunner().invoke(app, ["export", str(FIXTURE / "model.pt"), "--out", str(out), "--format", "tflite"])
    assert result.exit_code == 0, result.output
    spec = json.loads((out / "spec.json").read_text())
    assert {TFLITE_NAME, TFLITE_INT8_NAME} <= set(spec["files"])
    assert spec["parity_tflite"]["fp32"]["backbone_max_abs_err"] < FP32_TOL
    assert FP32_TOL < spec["parity_tflite"]["int8"]["backbone_max_abs_err"] < INT8_TOL
    with np.load(FIXTURE / "reference.npz") as data:
        x, want = data["x"], data["features"]
    r = BackboneRunner(out / TFLITE_NAME)
    assert r.runtime == LITERT and r.spec.model_id == spec["model_id"]
    np.testing.assert_allclose(r.features(x).feats, want, atol=FP32_TOL, rtol=0)


def test_formats_report_covers_onnx_and_litert_against_torch():
    """The parity report of benchmarks/formats.py, on the fixture's own torch model and ETTh1 test windows."""
    from coordinator.models.checkpoints import load_checkpoint
    from coordinator.pretrain.windows import split_windows
    from export.quantize import formats_report, report_table

    model = load_checkpoint(FIXTURE / "model.pt")
    assert model.model_id() == json.loads((FIXTURE / "spec.json").read_text())["model_id"]
    x, y = split_windows("etth1", "test", model.config.context, model.config.horizon, stride=96)
    rows = {r.format: r for r in formats_report(model, {"onnx-fp32": FIXTURE / "backbone.onnx",
                                                        "tflite-fp32": FIXTURE / TFLITE_NAME,
                                                        "tflite-int8": FIXTURE / TFLITE_INT8_NAME}, (x, y))}
    assert rows["tflite-fp32"].runtime.startswith("ai-edge-litert") and rows["onnx-fp32"].runtime.startswith("onnx")
    assert rows["tflite-fp32"].feat_max_abs_err < FP32_TOL and rows["tflite-fp32"].max_abs_err < 1e-3
    assert abs(rows["tflite-fp32"].mse_change_pct) < 0.01
    assert FP32_TOL < rows["tflite-int8"].feat_max_abs_err < INT8_TOL and abs(rows["tflite-int8"].mse_change_pct) < 5
    assert rows["torch"].max_abs_err == 0 and "tflite-int8" in report_table(list(rows.values()))


def test_a_fleet_mixes_formats_of_one_export_but_refuses_another_backbone():
    """Heads are pinned to the export's model id, which ONNX and TFLite files of one model share,
    so a LiteRT device accepts a head the coordinator pinned with the ONNX file's hash."""
    from edge_client.runtime.backbone import backbone_mismatch

    onnx, tflite = BackboneRunner(FIXTURE / "backbone.onnx"), BackboneRunner(FIXTURE / "backbone.tflite")
    assert onnx.spec.model_id and onnx.spec.model_id == tflite.spec.model_id and onnx.sha256 != tflite.sha256
    pinned = {"model_id": onnx.spec.model_id, "sha256s": [onnx.sha256]}
    assert backbone_mismatch(tflite.spec.model_id, tflite.sha256, **pinned) is None
    assert "this device runs" in backbone_mismatch("tsfm-other", tflite.sha256, **pinned)
    # without an id on either side the file hash decides, as before
    assert backbone_mismatch("", onnx.sha256, sha256s=[onnx.sha256]) is None
    assert backbone_mismatch("", tflite.sha256, sha256s=[onnx.sha256]) is not None


def test_a_device_runs_the_bundle_backbone_its_profile_names():
    """Unset [bundle] runtime/format come from the device's profile (pi4: LiteRT int8); a profile fedge does
    not ship gets ONNX Runtime fp32."""
    from edge_client.daemon.service import profile_choice

    assert profile_choice("pi4") == ("litert", "int8")
    assert profile_choice("jetson-orin-nano") == ("onnxruntime", "fp32")
    assert profile_choice("generic") == ("onnxruntime", "fp32")
