"""How much disk a device install takes (issue 14: at most 100 MB), measured on the install the docs tell a user to
make (README, hardware/INSTALL.md), per package and per platform.

The documented device install: a virtualenv without pip (``python3 -m venv --without-pip``), filled by the system's
pip with ``pip --python VENV/bin/python install --no-compile 'fedge[EXTRA]'`` -- so the venv holds no pip or
setuptools (the stock venv adds ~19 MB of them) and no .pyc (pip byte-compiles by default, ~29 MB); the systemd unit
then runs the daemon with the venv read-only (ProtectSystem=strict) and PYTHONDONTWRITEBYTECODE=1, so no .pyc appear
later either. fedge comes from one wheel built from a clean copy of the checkout (``pip wheel --no-deps``), as
hardware/INSTALL.md builds it. Rows:

* x86-64, one per extra the device core offers: ``tflite`` (numpy < 2 + tflite-runtime, the small one), ``litert``
  (numpy 2 + ai-edge-litert), ``onnx`` (numpy 2 + ONNX Runtime);
* x86-64 ``tflite`` in a stock venv with pip's default byte-compilation: what the old instructions gave, for contrast;
* aarch64 (Raspberry Pi OS bookworm's CPython 3.11) ``tflite``: a real install -- the venv made and pip run by an
  aarch64 CPython under qemu-user (hardware/qemu/make-rootfs.sh builds it into ~/.cache/fedge); without that
  rootfs, a size-only row from ``pip install --target --platform`` instead, marked as such.

Each install then runs the device's own path with the venv as the unit runs it: ``fedge-edge info`` (config, the
shipped backbone, features on the bundled ETTh1 series) and ``fedge-edge status``, with torch, rich, typer, pygments
and pip not importable (nor onnxruntime in the LiteRT rows); sizes are taken after that run. The x86-64 ``tflite``
row also records what a root shell running ``fedge-edge info`` without PYTHONDONTWRITEBYTECODE adds (.pyc) and the
start-up time with and without them. The aarch64 row runs the fp32 ``backbone.tflite`` (on fewer windows:
every float op is emulated) and records whether the int8 one runs (tflite-runtime 2.14 crashed on its batch-8
signature there).

    python benchmarks/device_install.py [--out docs/results] [--fresh]

Each row is checkpointed under runs/device_install/; writes device_install.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from coordinator.pretrain.shipped import ARTIFACT_DIR as SHIPPED  # noqa: E402  (stdlib only)
from hardware import emulation  # noqa: E402  (stdlib only)

MARKER = "<!-- analysis below this line is written by hand and kept by the script -->"
LIMIT_MB = 100.0  # issue 14
VARIANTS = {  # name -> (extra, backbone file the device runs)
    "fedge[tflite]: numpy < 2 + tflite-runtime": ("tflite", "backbone.int8.tflite"),
    "fedge[litert]: numpy 2 + ai-edge-litert": ("litert", "backbone.int8.tflite"),
    "fedge[onnx]: numpy 2 + ONNX Runtime": ("onnx", "backbone.int8.onnx"),
}
SMALL = "fedge[tflite]: numpy < 2 + tflite-runtime"
STOCK = "fedge[tflite] in a stock venv (pip inside, .pyc compiled): not the documented install"
ARM = "fedge[tflite] on aarch64 (Raspberry Pi OS CPython 3.11, under qemu)"
ABSENT = ("torch", "rich", "typer", "pygments", "pip")
CHECK_ABSENT = """
import importlib.util, sys
present = [m for m in sys.argv[1:] if importlib.util.find_spec(m) is not None]
print("importable but must not be:", present) if present else print("absent:", *sys.argv[1:])
sys.exit(1 if present else 0)
"""
UNIT_ENV = {"PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1"}  # hardware/systemd/fedge-edge.service


def dir_size(path: Path, suffix: str = "") -> int:
    """Bytes of the regular files under `path` (symlinks -- a venv's python -> the system's -- are not the install)."""
    return sum(p.stat().st_size for p in path.rglob(f"*{suffix}") if p.is_file() and not p.is_symlink())


def build_wheel(out: Path) -> Path:
    """fedge's wheel from a clean copy of the checkout (tracked and new files, nothing git ignores: no stale build/)."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                           check=True).stdout.decode().split("\0")
    src = out / "src"
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--disable-pip-version-check",
                    str(src), "-w", str(out / "wheel")], check=True)
    shutil.rmtree(src)
    return next((out / "wheel").glob("fedge-*.whl"))


def install(venv: Path, wheel: Path, extra: str, stock: bool = False) -> None:
    """The documented device install (a venv without pip, pip --python, --no-compile); `stock`: the plain recipe."""
    if stock:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                        f"{wheel}[{extra}]"], check=True)
        return
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--quiet",
                    "--no-compile", "--disable-pip-version-check", f"{wheel}[{extra}]"], check=True)


# Under qemu every float op is emulated: the aarch64 smoke computes features for fewer windows (same code path).
EMULATED_WINDOWS = "max_train_windows = 16\neval_fraction = 0.05\n"


def device_config(tmp: Path, backbone: str, broker: str = "127.0.0.1:1", extra: str = "") -> Path:
    """A device.toml running the shipped backbone on the ETTh1 series fedge carries (the default data)."""
    cfg = tmp / "device.toml"
    cfg.write_text(f'device_id = "lean-1"\nbroker = "{broker}"\nbackbone = "{SHIPPED / backbone}"\n'
                   f'state_dir = "{tmp / "state"}"\nheartbeat_s = 0.5\n{extra}')
    return cfg


def breakdown(site: Path) -> dict[str, float]:
    """MB per top-level entry of site-packages, largest first; every .dist-info folder summed as `*.dist-info`."""
    sizes: dict[str, int] = {}
    for p in site.iterdir():
        key = "*.dist-info" if p.name.endswith(".dist-info") else p.name
        sizes[key] = sizes.get(key, 0) + (dir_size(p) if p.is_dir() else p.stat().st_size)
    return {k: v / 2**20 for k, v in sorted(sizes.items(), key=lambda kv: -kv[1])}


def smoke(python: list[str], venv: Path, tmp: Path, absent: tuple[str, ...], backbone: str,
          timeout: int = 120, extra: str = "") -> tuple[bool, str, float]:
    """The installed `fedge-edge` on a shipped backbone, with what a device must not carry absent:
    (ok, what it said, seconds of `info`)."""
    cfg = device_config(tmp, backbone, extra=extra)
    script = str(venv / "bin" / "fedge-edge")
    steps = [[*python, "-c", CHECK_ABSENT, *absent], [*python, script, "info", "--config", str(cfg)],
             [*python, script, "status", "--config", str(cfg)]]
    said, info_s = [], 0.0
    for cmd in steps:
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp, timeout=timeout,
                                  env={**os.environ, **UNIT_ENV})
        except subprocess.TimeoutExpired:
            return False, f"`{cmd[-3]}` timed out after {timeout} s", info_s
        if "info" in cmd:
            info_s = time.perf_counter() - t0
        said.append((proc.stdout.strip() or proc.stderr.strip()).splitlines()[:2])
        if proc.returncode != 0:
            why = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit {proc.returncode}"
            step = "import check" if CHECK_ABSENT in cmd else cmd[-3]
            tail = (proc.stdout + proc.stderr).strip().splitlines()[-1:]
            return False, f"`{step}` {why}: {' '.join(tail)}"[-300:], info_s
    return True, " | ".join(" ".join(lines) for lines in said)[:300], info_s


def sized(venv: Path, site: Path) -> dict:
    return {"total_mb": dir_size(venv) / 2**20, "site_packages_mb": dir_size(site) / 2**20,
            "pyc_mb": dir_size(venv, ".pyc") / 2**20, "pip_in_venv": (site / "pip").exists(),
            "packages_mb": breakdown(site), "onnxruntime": (site / "onnxruntime").exists(),
            "torch": (site / "torch").exists(), "rich": (site / "rich").exists(),
            "shipped_model": sorted(p.name for p in (site / "coordinator" / "pretrained").iterdir())}


def measure(variant: tuple[str, str], tmp: Path, wheel: Path, keep: bool = False, stock: bool = False) -> dict:
    """Install `variant` into tmp/venv, run its smoke as the unit runs it, measure; removed unless `keep`."""
    extra, backbone = variant
    venv = tmp / "venv"
    t0 = time.perf_counter()
    install(venv, wheel, extra, stock=stock)
    install_s = time.perf_counter() - t0
    site = next(venv.glob("lib/python3*/site-packages"))
    absent = ABSENT if extra == "onnx" else (*ABSENT, "onnxruntime")
    if stock:
        absent = tuple(m for m in absent if m != "pip")
    ok, said, info_s = smoke([str(venv / "bin" / "python")], venv, tmp, absent, backbone)
    how = ("python -m venv V && V/bin/pip install" if stock else
           "python -m venv --without-pip V && pip --python V/bin/python install --no-compile")
    out = {"arch": "x86_64", "install": f"{how} 'fedge[{extra}]'", "backbone": backbone, "install_s": install_s,
           "smoke_ok": ok, "smoke": said, "info_s": info_s, **sized(venv, site)}
    if extra == "tflite" and not stock:  # what a root shell without PYTHONDONTWRITEBYTECODE would add
        cfg = device_config(tmp, backbone)
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"} | {"OMP_NUM_THREADS": "1"}
        runs = []
        for _ in range(2):  # the first writes the .pyc, the second starts from them
            t1 = time.perf_counter()
            subprocess.run([str(venv / "bin" / "fedge-edge"), "info", "--config", str(cfg)], capture_output=True,
                           cwd=tmp, timeout=120, env=env, check=True)
            runs.append(time.perf_counter() - t1)
        out["root_run_pyc_mb"] = dir_size(venv, ".pyc") / 2**20 - out["pyc_mb"]
        out["info_s_with_pyc"] = runs[1]
    if not keep:
        shutil.rmtree(venv)
    return out


AARCH64 = [f"manylinux_2_{v}_aarch64" for v in (17, 24, 26, 27, 28, 31, 34, 35, 36)] + ["manylinux2014_aarch64"]


def measure_aarch64(tmp: Path, wheel: Path, keep: bool = False, int8: bool = True) -> dict:
    """The documented `fedge[tflite]` install made by an aarch64 CPython (Debian bookworm's, under qemu-user):
    its venv, pip run by it (aarch64 wheels chosen by pip itself), then its daemon's `info` and `status`."""
    qemu, why = emulation.find_qemu()
    rootfs, why_r = emulation.find_rootfs()
    if qemu is None or rootfs is None:
        raise emulation.EmulationUnavailable("; ".join(w for w in (why, why_r) if w))
    venv = tmp / "venv"
    base = [qemu, "-L", str(rootfs)]
    subprocess.run([*base, str(rootfs / "usr/bin/python3.11"), "-m", "venv", "--without-pip", str(venv)], check=True)
    python = [*base, str(venv / "bin" / "python")]
    wrapper = tmp / "python-aarch64"  # pip --python takes one executable: the venv's python, emulated
    wrapper.write_text(f'#!/bin/sh\nexec {" ".join(python)} "$@"\n')
    wrapper.chmod(0o755)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pip", "--python", str(wrapper), "install", "--quiet", "--no-compile",
                    "--disable-pip-version-check", f"{wheel}[tflite]"], check=True, timeout=1200)
    install_s = time.perf_counter() - t0
    site = next(venv.glob("lib/python3*/site-packages"))
    ok, said, info_s = smoke(python, venv, tmp, (*ABSENT, "onnxruntime"), "backbone.tflite", timeout=900,
                             extra=EMULATED_WINDOWS)
    int8_ok, int8_said = (smoke(python, venv, tmp, (), "backbone.int8.tflite", timeout=900, extra=EMULATED_WINDOWS)[:2]
                          if int8 else (None, "not run"))
    out = {"arch": "aarch64", "install": "python3.11 -m venv --without-pip V && pip --python V/bin/python install "
           "--no-compile 'fedge[tflite]' (aarch64 CPython under qemu)", "backbone": "backbone.tflite",
           "install_s": install_s, "smoke_ok": ok, "smoke": said, "info_s": info_s, "int8_ok": int8_ok,
           "int8_smoke": int8_said, "emulated": f"{Path(qemu).name} -L {rootfs}", **sized(venv, site)}
    if not keep:
        shutil.rmtree(venv)
    return out


def size_only_aarch64(tmp: Path, wheel: Path) -> dict:
    """No emulation here: `fedge[tflite]`'s aarch64 files via pip's --target --platform (nothing runs)."""
    target = tmp / "aarch64"
    platforms = [a for plat in AARCH64 for a in ("--platform", plat)]
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-compile", "--disable-pip-version-check",
                    "--no-warn-conflicts", "--target", str(target), *platforms, "--python-version", "3.11",
                    "--implementation", "cp", "--only-binary=:all:", f"{wheel}[tflite]"], check=True)
    out = {"arch": "aarch64", "install": "pip install --target --platform manylinux*_aarch64 'fedge[tflite]' "
           "(size only, nothing ran)", "backbone": "-", "smoke_ok": None, "smoke": "not run", **sized(target, target)}
    shutil.rmtree(target)
    return out


def _fmt_top(r: dict, n: int = 7) -> str:
    return ", ".join(f"{k} {v:.1f}" for k, v in list(r["packages_mb"].items())[:n])


def markdown(rows: dict[str, dict], old: str) -> str:
    lines = ["| install | arch | MB | within 100 MB | pip / .pyc in venv (MB) | runs `fedge-edge info` + `status` | "
             "largest parts (MB) |", "|---|---|---:|---|---|---|---|"]
    for name, r in rows.items():
        ran = {True: f"yes, {r['backbone']} ({r['info_s']:.1f} s)", False: f"**no**: {r['smoke']}",
               None: "not run (size only)"}[r["smoke_ok"]]
        if r.get("int8_ok") is not None:
            ran += "; int8: " + ("ok" if r["int8_ok"] else f"**crashed**: {r['int8_smoke']}")
        pip = f"{'pip' if r['pip_in_venv'] else 'no pip'} / {r['pyc_mb']:.1f}"
        lines.append(f"| {name} | {r['arch']} | {r['total_mb']:.1f} | {'yes' if r['total_mb'] <= LIMIT_MB else 'NO'} "
                     f"| {pip} | {ran} | {_fmt_top(r)} |")
    short = {SMALL: "tflite", STOCK: "tflite, stock venv", ARM: "tflite"}
    parts = ["| part | " + " | ".join(f"{short.get(n, n.split(':')[0][6:-1])} {r['arch']}" for n, r in rows.items())
             + " |",
             "|---|" + "---:|" * len(rows)]
    keys = list(dict.fromkeys(k for r in rows.values() for k in list(r["packages_mb"])[:12]))
    for k in keys:
        parts.append(f"| {k} | " + " | ".join(f"{r['packages_mb'].get(k, 0.0):.2f}" for r in rows.values()) + " |")
    parts.append("| rest of site-packages | " + " | ".join(
        f"{r['site_packages_mb'] - sum(r['packages_mb'].get(k, 0.0) for k in keys):.2f}" for r in rows.values()) + " |")
    parts.append("| outside site-packages (bin, pyvenv.cfg) | " + " | ".join(
        f"{r['total_mb'] - r['site_packages_mb']:.2f}" for r in rows.values()) + " |")
    small = rows.get(SMALL)
    notes = []
    if small:
        notes.append(f"The documented small device install, x86-64: **{small['total_mb']:.1f} MB** "
                     f"({'within' if small['total_mb'] <= LIMIT_MB else 'ABOVE'} the {LIMIT_MB:.0f} MB target).")
        if "root_run_pyc_mb" in small:
            notes.append(f"Not counted, because the documented commands cannot do it: a root shell running "
                         f"`fedge-edge info` without PYTHONDONTWRITEBYTECODE writes {small['root_run_pyc_mb']:.1f} MB "
                         f"of .pyc into the venv ({small['total_mb'] + small['root_run_pyc_mb']:.1f} MB); "
                         "hardware/INSTALL.md runs `fedge-edge` as the `fedge` user (`sudo -u fedge`) and the unit "
                         "with the venv read-only, and the root-owned venv is not writable for that user. `info` "
                         f"took {small['info_s']:.1f} s without .pyc, {small['info_s_with_pyc']:.1f} s with them.")
    if ARM in rows:
        r = rows[ARM]
        notes.append(f"aarch64: **{r['total_mb']:.1f} MB** "
                     f"({'within' if r['total_mb'] <= LIMIT_MB else 'ABOVE'} the target); "
                     + ("a real install under qemu." if r["smoke_ok"] is not None else "size only."))
    return "\n".join(["# Device install size (issue 14)", "",
                      "Generated by `benchmarks/device_install.py`: the device install README and hardware/INSTALL.md "
                      "document (a venv without pip; the system's `pip --python V/bin/python install --no-compile "
                      "'fedge[EXTRA]'`; the daemon run with the venv read-only and PYTHONDONTWRITEBYTECODE=1, as "
                      "hardware/systemd/fedge-edge.service runs it), from one wheel built from the checkout. Sizes "
                      "are every file in the venv after the daemon ran (MB = 2^20 bytes; the venv's python symlinks "
                      "not counted), CPython 3.11. torch, rich, typer, pygments and pip are not importable in any "
                      "documented row, onnxruntime in none of the LiteRT rows.", "", *lines, "", *notes, "",
                      "Per part (MB; `*.dist-info` is every package's metadata together):", "", *parts, "",
                      MARKER, old])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", default=str(ROOT / "runs" / "device_install"))
    ap.add_argument("--out", default=str(ROOT / "docs" / "results"))
    ap.add_argument("--fresh", action="store_true", help="ignore the checkpointed rows")
    ap.add_argument("--no-aarch64", action="store_true", help="skip the aarch64 row")
    args = ap.parse_args(argv)
    cache = Path(args.cache)
    if args.fresh:
        shutil.rmtree(cache, ignore_errors=True)
    cache.mkdir(parents=True, exist_ok=True)
    todo = {name: (lambda t, w, v=v: measure(v, t, w)) for name, v in VARIANTS.items()}
    todo[STOCK] = lambda t, w: measure(VARIANTS[SMALL], t, w, stock=True)
    if not args.no_aarch64:
        def arm(t: Path, w: Path) -> dict:
            try:
                return measure_aarch64(t, w)
            except emulation.EmulationUnavailable as exc:
                print(f"aarch64: {exc}; size only", flush=True)
                return size_only_aarch64(t, w)
        todo[ARM] = arm
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as build:
        wheel = None
        for i, (name, run) in enumerate(todo.items()):
            path = cache / f"row{i}.json"
            if path.exists() and json.loads(path.read_text()).get("name") == name:
                rows[name] = json.loads(path.read_text())["row"]
                continue
            wheel = wheel or build_wheel(Path(build))
            with tempfile.TemporaryDirectory() as tmp:
                rows[name] = run(Path(tmp), wheel)
            path.write_text(json.dumps({"name": name, "row": rows[name]}))
            print(f"{name}: {rows[name]['total_mb']:.1f} MB, ran: {rows[name]['smoke_ok']}", flush=True)
    out = Path(args.out)
    md = out / "device_install.md"
    old = md.read_text().split(MARKER, 1)[1] if md.exists() and MARKER in md.read_text() else "\n"
    (out / "device_install.json").write_text(json.dumps(rows, indent=1) + "\n")
    md.write_text(markdown(rows, old))
    print(md.read_text().split(MARKER)[0])
    return rows


if __name__ == "__main__":
    main()
