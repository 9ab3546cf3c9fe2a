"""How much disk a device install takes (issue 14: at most 100 MB), measured on fresh virtualenvs.

Variants: the three device installs pyproject.toml offers, each a plain `pip install '.[EXTRA]'` (the default
dependencies are the device core, with no backbone runtime): `onnx` (numpy 2 + ONNX Runtime), `litert` (numpy 2 +
ai-edge-litert) and `tflite` (numpy < 2 + tflite-runtime, the old small LiteRT interpreter). Each venv is made
without pip and filled by this machine's pip with ``--no-compile`` (no .pyc: Python writes them at first import
unless told not to, +~30 MB), then measured with the size of every installed file; the largest packages are
listed. Each install then runs the device's own path: its `fedge-edge info` (config, the shipped backbone --
``backbone.int8.tflite`` for the LiteRT variants, ``backbone.int8.onnx`` for `onnx` --, features on the bundled
ETTh1 series) and `fedge-edge status`, and checks what must be absent (torch everywhere; rich, typer and
pygments everywhere; onnxruntime in the LiteRT variants).

    python benchmarks/device_install.py [--out docs/results]

Each variant is checkpointed under runs/device_install/; writes device_install.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MARKER = "<!-- analysis below this line is written by hand and kept by the script -->"
SHIPPED = ROOT / "coordinator" / "pretrained" / "tsfm-tiny-v1"
VARIANTS = {  # name -> (extra, backbone file the device runs)
    "fedge[onnx]: numpy 2 + ONNX Runtime": ("onnx", "backbone.int8.onnx"),
    "fedge[litert]: numpy 2 + ai-edge-litert": ("litert", "backbone.int8.tflite"),
    "fedge[tflite]: numpy < 2 + tflite-runtime": ("tflite", "backbone.int8.tflite"),
}
ARM = "fedge[tflite] on aarch64 (Raspberry Pi wheels)"
ABSENT = ("torch", "rich", "typer", "pygments")
CHECK_ABSENT = """
import importlib.util, sys
present = [m for m in sys.argv[1:] if importlib.util.find_spec(m) is not None]
print("importable but must not be:", present) if present else print("absent:", *sys.argv[1:])
sys.exit(1 if present else 0)
"""


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def install(venv: Path, extra: str) -> None:
    """A venv without pip, filled by this interpreter's pip (no .pyc written)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--quiet",
                    "--no-compile", "--disable-pip-version-check", f"{ROOT}[{extra}]"], check=True)


def device_config(tmp: Path, backbone: str, broker: str = "127.0.0.1:1") -> Path:
    """A device.toml running the shipped backbone on the ETTh1 series fedge carries (the default data)."""
    cfg = tmp / "device.toml"
    cfg.write_text(f'device_id = "lean-1"\nbroker = "{broker}"\nbackbone = "{SHIPPED / backbone}"\n'
                   f'state_dir = "{tmp / "state"}"\nheartbeat_s = 0.5\n')
    return cfg


def smoke(venv: Path, tmp: Path, extra: str, backbone: str) -> tuple[bool, str]:
    """The installed `fedge-edge` on the shipped backbone, with what a device must not carry absent."""
    absent = (*ABSENT, "onnxruntime") if extra != "onnx" else ABSENT
    cfg = device_config(tmp, backbone)
    steps = [[str(venv / "bin" / "python"), "-c", CHECK_ABSENT, *absent],
             [str(venv / "bin" / "fedge-edge"), "info", "--config", str(cfg)],
             [str(venv / "bin" / "fedge-edge"), "status", "--config", str(cfg)]]
    said = []
    for cmd in steps:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp, timeout=120)
        said.append((proc.stdout.strip() or proc.stderr.strip()).splitlines()[:2])
        if proc.returncode != 0:
            return False, f"{Path(cmd[0]).name} {cmd[1] if len(cmd) > 1 else ''}: {proc.stdout}{proc.stderr}"[-300:]
    return True, " | ".join(" ".join(lines) for lines in said)[:300]


def measure(name: str, variant: tuple[str, str], tmp: Path, keep: bool = False) -> dict:
    """Install `variant` into tmp/venv, measure it, run its smoke; the venv is removed unless `keep`."""
    extra, backbone = variant
    venv = tmp / "venv"
    t0 = time.perf_counter()
    install(venv, extra)
    site = next(venv.glob("lib/python3*/site-packages"))
    sizes = {p.name: dir_size(p) if p.is_dir() else p.stat().st_size for p in site.iterdir()}
    top = sorted(((k, v) for k, v in sizes.items() if not k.endswith(".dist-info")), key=lambda kv: -kv[1])[:8]
    out = {"install": f"pip install '.[{extra}]'", "backbone": backbone, "total_mb": dir_size(venv) / 2**20,
           "site_packages_mb": dir_size(site) / 2**20, "top_mb": {k: v / 2**20 for k, v in top},
           "onnxruntime": (site / "onnxruntime").exists(), "torch": (site / "torch").exists(),
           "rich": (site / "rich").exists(), "install_s": time.perf_counter() - t0}
    out["smoke_ok"], out["smoke"] = smoke(venv, tmp, extra, backbone)
    if not keep:
        shutil.rmtree(venv)
    return out


AARCH64 = [f"manylinux_2_{v}_aarch64" for v in (17, 24, 26, 27, 28, 31, 34, 35, 36)] + ["manylinux2014_aarch64"]


def measure_aarch64(tmp: Path) -> dict:
    """`fedge[tflite]`'s files for a Raspberry Pi (aarch64 wheels via pip's --platform; size only, nothing runs).
    tflite-runtime's aarch64 wheel is not in this machine's package mirror, so the row is the rest of the install
    and the total adds tflite-runtime's x86-64 size as a stand-in (stated in the table)."""
    pip = [sys.executable, "-m", "pip"]
    subprocess.run([*pip, "wheel", "--quiet", "--no-deps", "--disable-pip-version-check", str(ROOT), "-w",
                    str(tmp / "wheel")], check=True)
    wheel = next((tmp / "wheel").glob("fedge-*.whl"))
    target = tmp / "aarch64"
    platforms = [a for plat in AARCH64 for a in ("--platform", plat)]
    subprocess.run([*pip, "install", "--quiet", "--no-compile", "--disable-pip-version-check", "--no-warn-conflicts",
                    "--target", str(target), *platforms, "--python-version", "3.11", "--implementation", "cp",
                    "--only-binary=:all:", str(wheel), "numpy>=1.26,<2"], check=True)
    sizes = {p.name: dir_size(p) if p.is_dir() else p.stat().st_size for p in target.iterdir()}
    top = sorted(((k, v) for k, v in sizes.items() if not k.endswith(".dist-info")), key=lambda kv: -kv[1])[:8]
    out = {"install": "pip install --target --platform manylinux*_aarch64 'fedge[tflite]' less tflite-runtime",
           "backbone": "-", "without_tflite_mb": dir_size(target) / 2**20, "top_mb": {k: v / 2**20 for k, v in top},
           "onnxruntime": (target / "onnxruntime").exists(), "torch": (target / "torch").exists(),
           "rich": (target / "rich").exists()}
    shutil.rmtree(target)
    return out


def markdown(rows: dict[str, dict], old: str) -> str:
    lines = ["| variant | install | venv MB | onnxruntime | largest packages (MB) | `fedge-edge info` on |",
             "|---|---|---:|---|---|---|"]
    for name, r in rows.items():
        top = ", ".join(f"{k} {v:.1f}" for k, v in list(r["top_mb"].items())[:6])
        if "smoke_ok" not in r:  # the aarch64 row: size only
            top = ", ".join(f"{k} {v:.1f}" for k, v in list(r["top_mb"].items())[:6])
            lines.append(f"| {name} | `{r['install']}` | {r['total_mb']:.1f} ({r['without_tflite_mb']:.1f} + "
                         f"{r['total_mb'] - r['without_tflite_mb']:.1f} tflite-runtime, x86-64 size) | no | {top} | "
                         "not run (size only) |")
            continue
        smoke = f"{r['backbone']}: {'ok' if r['smoke_ok'] else 'FAILED'}"
        lines.append(f"| {name} | `{r['install']}` | {r['total_mb']:.1f} | "
                     f"{'yes' if r['onnxruntime'] else 'no'} | {top} | {smoke} |")
    ran = [r for r in rows.values() if r.get("smoke_ok")]
    best = min(ran, key=lambda r: r["total_mb"])
    verdict = (f"Smallest device install that ran here (x86-64): {best['total_mb']:.1f} MB; target ≤ 100 MB: "
               f"{'MET' if best['total_mb'] <= 100 else 'NOT met'}.")
    if ARM in rows:
        verdict += (f" The same install from aarch64 wheels (a Raspberry Pi; size only): "
                    f"{rows[ARM]['total_mb']:.1f} MB, {'within' if rows[ARM]['total_mb'] <= 100 else 'above'} "
                    "the target.")
    return "\n".join(["# Device install size (issue 14)", "",
                      "Generated by `benchmarks/device_install.py`: fresh virtualenvs without pip, filled with "
                      "`pip install --no-compile '.[EXTRA]'` (Python adds ~30 MB of .pyc at first import unless "
                      "PYTHONDONTWRITEBYTECODE is set); sizes are the files on disk (MB = 2^20 bytes), x86-64, "
                      "CPython 3.11. Each install runs its `fedge-edge info` and `fedge-edge status` on the shipped "
                      "backbone with torch, rich, typer and pygments absent (and onnxruntime in the LiteRT "
                      "variants).", "",
                      *lines, "", verdict, "", MARKER, old])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", default=str(ROOT / "runs" / "device_install"))
    ap.add_argument("--out", default=str(ROOT / "docs" / "results"))
    ap.add_argument("--no-aarch64", action="store_true", help="skip the aarch64 size-only row (needs its wheels)")
    args = ap.parse_args(argv)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    rows: dict[str, dict] = {}
    for name, variant in VARIANTS.items():
        path = cache / f"{variant[0]}.json"
        if path.exists():
            rows[name] = json.loads(path.read_text())
            continue
        with tempfile.TemporaryDirectory() as tmp:
            rows[name] = measure(name, variant, Path(tmp))
        path.write_text(json.dumps(rows[name]))
        print(f"{name}: {rows[name]['total_mb']:.0f} MB", flush=True)
    path = cache / "aarch64.json"
    if not args.no_aarch64:
        if path.exists():
            rows[ARM] = json.loads(path.read_text())
        else:
            with tempfile.TemporaryDirectory() as tmp:
                rows[ARM] = measure_aarch64(Path(tmp))
            tflite = next(r for r in rows.values() if r.get("install") == "pip install '.[tflite]'")
            rows[ARM]["total_mb"] = rows[ARM]["without_tflite_mb"] + tflite["top_mb"].get("tflite_runtime", 0.0)
            path.write_text(json.dumps(rows[ARM]))
            print(f"{ARM}: {rows[ARM]['total_mb']:.0f} MB", flush=True)
    out = Path(args.out)
    md = out / "device_install.md"
    old = md.read_text().split(MARKER, 1)[1] if md.exists() and MARKER in md.read_text() else "\n"
    (out / "device_install.json").write_text(json.dumps(rows, indent=1) + "\n")
    md.write_text(markdown(rows, old))
    print(md.read_text())
    return rows


if __name__ == "__main__":
    main()
