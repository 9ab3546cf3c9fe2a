"""Hardware-in-loop harness: one full federated round with the real device daemon held to a device
profile's limits, against a real Mosquitto and a real coordinator process.

    python -m hardware.hil --profile pi4 [--format onnx|int8|tflite|tflite-int8] [--emulate auto|qemu|native]
                           [--model-dir runs/model] [--memory-mb N] [--cpus 1] [--json out.json]

What runs (all real processes, nothing mocked):

* a private Mosquitto on a free port (``coordinator.fleet.broker.start_mosquitto``),
* the coordinator: ``fedge serve --rounds 1 --min-devices 1`` as a subprocess with its own SQLite,
* the device: ``fedge-edge run --config device.toml --max-rounds 1`` with torch/coordinator/export made
  unimportable (``hardware.device_guard``), ``threads`` = the profile's ORT threads, pinned to the
  profile's ``cores`` CPUs (capped by the host) and under a memory limit (``hardware.limits``: a
  memory cgroup where the host allows one), run by this host's Python or, for an aarch64 profile on
  an x86 host, by an aarch64 CPython under qemu (``hardware.emulation``).

The harness watches both processes (never waits forever: every phase has a deadline and a dead
process ends the run at once), samples the CPU each daemon thread last ran on, and afterwards reads
the coordinator's database to check that the update arrived and was aggregated into a new version.
It returns a :class:`HilResult`; a failure (memory limit hit, daemon error, timeout) is a result with
``ok=False`` and a one-line ``error`` saying what happened, plus the log tails.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edge_client.runtime.profile import DeviceProfile, load_profile
from hardware.emulation import ROOT, PythonTarget, resolve
from hardware.limits import MemoryLimit, allowed_cpus

log = logging.getLogger("fedge.hil")
# format -> backbone file of an export directory (`fedge export`, export/quantize.py, export/tflite_export.py)
HIL_FORMATS = {"onnx": "backbone.onnx", "int8": "backbone.int8.onnx", "tflite": "backbone.tflite",
           "tflite-int8": "backbone.int8.tflite"}
FLEET = "hil"
RESULT_TAG = "HIL_DEVICE_RESULT "

# The device process: device import guard, the real daemon CLI, then what only the process itself can
# tell (its own peak RSS and affinity mask, whether torch got in), as one tagged JSON line.
DEVICE_LAUNCHER = r"""
import json, platform, sys
from hardware.device_guard import block_imports
block_imports()
from edge_client.daemon.cli import app
code = 0
try:
    app(sys.argv[1:])
except SystemExit as exc:
    code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
status = open("/proc/self/status").read()
field = lambda key: next((l.split(":", 1)[1].strip() for l in status.splitlines() if l.startswith(key + ":")), "")
ort = sys.modules.get("onnxruntime")
print("HIL_DEVICE_RESULT " + json.dumps({
    "exit": code, "vm_hwm_kb": int(field("VmHWM").split()[0] or 0), "cpus_allowed_list": field("Cpus_allowed_list"),
    "torch_loaded": "torch" in sys.modules, "machine": platform.machine(),
    "onnxruntime": getattr(ort, "__version__", None)}), flush=True)
sys.exit(code)
"""


@dataclass
class HilResult:
    """One hardware-in-loop round: what ran, under which limits, and what it cost."""

    profile: str
    format: str
    ok: bool
    error: str = ""
    arch: str = ""
    emulated: bool = False
    emulation_note: str = ""
    cpus: list[int] = field(default_factory=list)
    threads: int = 1
    memory_limit_mb: int = 0
    secure: bool = False  # TLS with client certificates, the fleet broker's ACL, signed messages (docs/security.md)
    memory_mode: str = "none"
    memory_note: str = ""
    model_bytes: int = 0
    ready_s: float | None = None  # daemon start -> round opened (imports, model load, backbone features, hello)
    round_s: float | None = None  # coordinator: round opened -> aggregated (task, local training, upload)
    total_s: float | None = None
    peak_rss_mb: float | None = None  # the daemon's VmHWM (under qemu: the emulator process, translator included)
    cgroup_peak_mb: float | None = None  # what the memory cgroup charged at most (RSS + page cache)
    upload_bytes: int | None = None
    observed_cpus: list[int] = field(default_factory=list)
    cpus_allowed_list: str = ""
    torch_loaded: bool | None = None
    device_machine: str = ""
    runtime: str = ""
    round_state: str = ""
    base_version: int | None = None
    new_version: int | None = None
    oom_kills: int = 0
    daemon_exit: int | None = None
    coordinator_exit: int | None = None
    daemon_log_tail: str = ""
    coordinator_log_tail: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def model_files(model_dir: Path, fmt: str) -> tuple[Path, Path]:
    """(backbone, head.npz) of an export directory (`fedge export`) in the asked format; the int8
    backbone is made on demand (ONNX Runtime dynamic quantisation) when the directory lacks it."""
    if fmt not in HIL_FORMATS:
        raise ValueError(f"format must be one of {', '.join(HIL_FORMATS)}, not {fmt!r}")
    head = model_dir / "head.npz"
    backbone = model_dir / HIL_FORMATS[fmt]
    if not head.is_file() or not (model_dir / HIL_FORMATS["onnx"]).is_file():
        raise FileNotFoundError(f"{model_dir} is not an export directory (needs backbone.onnx and head.npz; "
                                "make one with `fedge export`)")
    if fmt == "int8" and not backbone.is_file():
        from export.quantize import quantize_backbone

        quantize_backbone(model_dir / HIL_FORMATS["onnx"], backbone)
    if not backbone.is_file():
        raise FileNotFoundError(f"{backbone} does not exist (no {fmt} export in {model_dir})")
    return backbone, head


def device_toml(path: Path, *, device_id: str, broker: str, backbone: Path, profile: DeviceProfile,
                horizon: int, data: dict, identity: Path | None = None) -> Path:
    """The daemon's config: the profile name and its ORT thread count travel in the TOML; the device's
    SQLite store lives in the run's directory, so runs never share an outbox."""
    lines = [f'device_id = "{device_id}"', f'fleet = "{FLEET}"', f'broker = "{broker}"', f'backbone = "{backbone}"',
             f'profile = "{profile.name}"', f"threads = {profile.threads}", f"horizon = {horizon}",
             f'state_dir = "{path.parent / "device-state"}"',
             *([f'identity = "{identity}"'] if identity is not None else []), "", "[data]"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in data.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def thread_cpus(pid: int) -> set[int]:
    """The CPU each thread of ``pid`` last ran on (field 39 of /proc/<pid>/task/<tid>/stat)."""
    seen = set()
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return seen
    for tid in tids:
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except OSError:
            continue
        seen.add(int(stat.rsplit(")", 1)[1].split()[36]))  # fields after "comm)" start at field 3
    return seen


def _affinity_applied(pid: int, cpus: list[int]) -> bool:
    """True once taskset has pinned the process: before that instant the only code running is taskset
    itself (on any CPU), not the device's; the CPU samples start from here."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    line = next((x for x in status.splitlines() if x.startswith("Cpus_allowed_list:")), "")
    return parse_cpu_list(line.split(":", 1)[-1]) == set(cpus)


def parse_cpu_list(text: str) -> set[int]:
    """'0-2,5' -> {0, 1, 2, 5} (the kernel's list format)."""
    out: set[int] = set()
    for part in text.strip().split(","):
        if part:
            lo, _, hi = part.partition("-")
            out.update(range(int(lo), int(hi or lo) + 1))
    return out


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _device_report(log_path: Path) -> dict:
    try:
        text = log_path.read_text(errors="replace")
    except OSError:
        return {}
    tagged = [line for line in text.splitlines() if line.startswith(RESULT_TAG)]
    try:
        return json.loads(tagged[-1][len(RESULT_TAG):]) if tagged else {}
    except json.JSONDecodeError:
        return {}  # cut off mid-line by a kill: the harness's own measurements still stand


def _round_from_db(db: Path, device_id: str) -> dict:
    """What the coordinator stored (read through its public FleetState API): the first round's state and
    timing, the device's update and the versions."""
    if not db.is_file():
        return {}
    from coordinator.fleet.state import FleetState

    try:
        state = FleetState(db)
    except sqlite3.Error:
        return {}
    try:
        out = {"runtime": state.devices().get(device_id, {}).get("runtime") or ""}
        if state.next_round_id() > 1:
            rec = state.round(1)
            out.update(round_state=rec.state, base_version=rec.base_version, new_version=rec.new_version,
                       opened=rec.opened, closed=rec.closed)
            sizes = [len(payload) for dev, payload in state.updates(rec.round_id) if dev == device_id]
            if sizes:
                out["upload_bytes"] = sizes[0]
    except sqlite3.Error:
        return {}
    finally:
        state.close()
    return out


def _stop(proc: subprocess.Popen | None) -> int | None:
    if proc is None:
        return None
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return proc.returncode


def run_hil(profile: str | DeviceProfile, model_dir: Path, *, fmt: str = "onnx", emulate: str = "auto",
            memory_mb: int | None = None, cpus: list[int] | None = None, memory_mode: str = "auto",
            horizon: int = 24, local_epochs: int = 1, data: dict | None = None, timeout_s: float | None = None,
            workdir: Path | None = None, secure: bool = False) -> HilResult:
    """Run one round as described in the module docstring and return its record (never raises for
    a failed round; raises ValueError/FileNotFoundError for bad arguments before anything starts)."""
    from coordinator.fleet.broker import start_fleet_broker, start_mosquitto

    prof = profile if isinstance(profile, DeviceProfile) else load_profile(profile)
    backbone, head = model_files(Path(model_dir), fmt)
    target: PythonTarget = resolve(emulate, prof.arch)
    cpu_list = allowed_cpus(prof.cores, cpus)
    limit_mb = memory_mb or prof.memory_mb
    # emulation translates every instruction: give start-up and the round proportionally longer
    timeout_s = timeout_s or (900.0 if target.emulated else 180.0)
    data = data or {"kind": "dataset", "dataset": "etth1", "column": "OT", "start": 8640, "stop": 13140}
    device_id = f"hil-{prof.name}"
    res = HilResult(profile=prof.name, format=fmt, ok=False, arch=target.arch, emulated=target.emulated,
                    emulation_note=target.note, cpus=cpu_list, threads=prof.threads, memory_limit_mb=limit_mb,
                    model_bytes=backbone.stat().st_size, secure=secure)

    tmp = None if workdir else tempfile.TemporaryDirectory(prefix="fedge-hil-")
    work = Path(workdir or tmp.name)  # type: ignore[union-attr]
    work.mkdir(parents=True, exist_ok=True)
    db, dlog, clog = work / "fleet.sqlite", work / "device.log", work / "coordinator.log"
    limit = MemoryLimit.create(limit_mb, memory_mode)
    res.memory_mode, res.memory_note = limit.mode, limit.note
    coord = daemon = broker = None
    observed: set[int] = set()
    t0 = t_daemon = time.time()
    first_exit = ""  # which process failed first (the other one is then stopped by us)
    try:
        identity, fleet_args = None, []
        if secure:  # `fedge fleet init`, `fedge fleet enroll`, `fedge broker config`: the production setup
            broker, bundles = start_fleet_broker(work / "fleet", FLEET, [device_id])
            identity = bundles[device_id]
            address = f"mqtts://{broker.address.host}:{broker.address.port}"
            fleet_args = ["--fleet-dir", str(work / "fleet")]
        else:
            broker = start_mosquitto()
            address = f"{broker.address.host}:{broker.address.port}"
        cfg = device_toml(work / "device.toml", device_id=device_id, broker=address, backbone=backbone,
                          profile=prof, horizon=horizon, data=data, identity=identity)
        with open(clog, "w") as out:
            coord = subprocess.Popen(
                [sys.executable, "-c", "from coordinator.cli import app; app()", "serve", "--init-head",
                 str(head),
                 "--db", str(db), "--broker", address, "--fleet", FLEET, "--rounds", "1", "--min-devices", "1",
                 "--deadline", str(int(timeout_s)), "--horizon", str(horizon), "--local-epochs", str(local_epochs),
                 "--wait-devices", str(int(timeout_s)), *fleet_args],
                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        device_cmd = [*target.argv, "-c", DEVICE_LAUNCHER, "run", "--config", str(cfg), "--max-rounds", "1"]
        env = {**os.environ, "PYTHONPATH": str(ROOT), **target.env}
        with open(dlog, "w") as out:
            daemon = subprocess.Popen(limit.wrap(device_cmd, cpu_list), cwd=ROOT, env=env, stdout=out,
                                      stderr=subprocess.STDOUT)
        t_daemon = time.time()
        deadline = t_daemon + timeout_s
        while daemon.poll() is None or coord.poll() is None:
            if daemon.poll() is None:
                if _affinity_applied(daemon.pid, cpu_list):
                    observed |= thread_cpus(daemon.pid)
            elif daemon.returncode != 0:
                first_exit = first_exit or "device"
                break  # the device is gone: the coordinator would only wait for it
            if coord.poll() not in (None, 0):
                first_exit = first_exit or "coordinator"
                break
            if time.time() > deadline:
                res.error = f"timed out after {timeout_s:.0f} s"
                break
            time.sleep(0.05)
    finally:
        res.daemon_exit, res.coordinator_exit = _stop(daemon), _stop(coord)
        res.total_s = time.time() - t0
        res.cgroup_peak_mb, res.oom_kills = limit.peak_mb(), limit.oom_kills()
        limit.close()
        if broker is not None:
            broker.stop()
        if tmp is not None and sys.exc_info()[0] is not None:
            tmp.cleanup()

    res.observed_cpus = sorted(observed)
    dev = _device_report(dlog)
    if dev.get("vm_hwm_kb"):
        res.peak_rss_mb = dev["vm_hwm_kb"] / 1024
    res.cpus_allowed_list = dev.get("cpus_allowed_list", "")
    res.torch_loaded = dev.get("torch_loaded")
    res.device_machine = dev.get("machine", "")
    stored = _round_from_db(db, device_id)
    res.runtime = stored.get("runtime", "") or (f"onnxruntime {dev['onnxruntime']}" if dev.get("onnxruntime") else "")
    res.round_state = stored.get("round_state", "")
    res.base_version, res.new_version = stored.get("base_version"), stored.get("new_version")
    res.upload_bytes = stored.get("upload_bytes")
    if stored.get("opened"):
        res.ready_s = stored["opened"] - t_daemon
        if stored.get("closed"):
            res.round_s = stored["closed"] - stored["opened"]
    res.daemon_log_tail, res.coordinator_log_tail = _tail(dlog), _tail(clog)
    if tmp is not None:
        tmp.cleanup()

    if not res.error:
        res.error = _diagnose(res, first_exit)
    res.ok = not res.error
    return res


def _diagnose(res: HilResult, first_exit: str = "") -> str:
    """The first thing that went wrong, in one line ("" when the round is complete and consistent);
    ``first_exit`` names the process that failed first, so the one we stopped after it is not blamed."""
    if res.oom_kills or (res.daemon_exit == -9 and res.memory_mode in ("cgroup1", "cgroup2")):
        return (f"device daemon killed by the kernel: out of memory under the {res.memory_limit_mb} MB limit "
                f"({res.memory_mode}, {res.oom_kills} OOM kill(s))")
    device_failed = res.daemon_exit not in (0, None)
    coordinator_failed = res.coordinator_exit not in (0, None)
    if device_failed and (first_exit != "coordinator" or not coordinator_failed):
        lines = [x for x in res.daemon_log_tail.splitlines() if x.strip() and not x.startswith(RESULT_TAG)]
        last = next((x for x in reversed(lines) if x.startswith("error:")), lines[-1] if lines else "no output")
        return f"device daemon exited with {res.daemon_exit}: {last}"
    if coordinator_failed:
        last = (res.coordinator_log_tail.splitlines() or ["no output"])[-1]
        return f"coordinator exited with {res.coordinator_exit}: {last}"
    if res.round_state != "closed" or res.upload_bytes is None:
        return f"round not completed (state {res.round_state or 'none'}, update stored: {res.upload_bytes is not None})"
    if res.new_version is None or res.base_version is None or res.new_version <= res.base_version:
        return f"update not aggregated (v{res.base_version} -> v{res.new_version})"
    if res.torch_loaded:
        return "torch was imported in the device process"
    return ""


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit so the harness's cleanup (child processes, broker, cgroup) runs."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def main(argv: list[str] | None = None) -> int:
    from edge_client.runtime.profile import list_profiles

    ap = argparse.ArgumentParser(prog="python -m hardware.hil", description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", required=True, help=f"{' | '.join(list_profiles())} or a profile TOML path")
    ap.add_argument("--format", default="onnx", choices=sorted(HIL_FORMATS))
    ap.add_argument("--emulate", default="auto", choices=["auto", "qemu", "native"])
    ap.add_argument("--model-dir", type=Path, default=Path("runs/model"), help="output of `fedge export`")
    ap.add_argument("--memory-mb", type=int, default=None, help="memory limit (default: the profile's memory)")
    ap.add_argument("--memory-mode", default="auto", choices=["auto", "cgroup2", "cgroup1", "rlimit_as", "none"])
    ap.add_argument("--cpus", default=None, help="explicit CPU list, e.g. 1 or 0,1 (default: the profile's cores)")
    ap.add_argument("--local-epochs", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=None, help="seconds for the whole run")
    ap.add_argument("--json", type=Path, default=None, help="write the result record here")
    args = ap.parse_args(argv)
    exit_on_sigterm()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cpus = [int(c) for c in args.cpus.split(",")] if args.cpus else None
        res = run_hil(args.profile, args.model_dir, fmt=args.format, emulate=args.emulate, memory_mb=args.memory_mb,
                      cpus=cpus, memory_mode=args.memory_mode, local_epochs=args.local_epochs,
                      timeout_s=args.timeout)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    record = res.as_dict()
    if args.json:
        args.json.write_text(json.dumps(record, indent=2))
    shown = {k: v for k, v in record.items() if not k.endswith("_log_tail")}
    print(json.dumps(shown, indent=2))
    if not res.ok:
        print(f"error: {res.error}\n--- device log ---\n{res.daemon_log_tail}", file=sys.stderr)
    return 0 if res.ok else 1


if __name__ == "__main__":
    sys.exit(main())
