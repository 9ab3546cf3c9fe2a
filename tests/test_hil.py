"""Hardware-in-loop: the real daemon, coordinator and Mosquitto for a full round under a device
profile's limits (CPU affinity, memory cgroup), the limits actually holding, a too-small memory limit
failing cleanly, and the same round on an emulated aarch64 CPython when qemu and the rootfs exist."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from edge_client.runtime.profile import load_profile
from hardware.emulation import EmulationUnavailable, qemu_python, resolve
from hardware.hil import main, parse_cpu_list, run_hil
from hardware.limits import MemoryLimit, allowed_cpus

ROOT = Path(__file__).resolve().parent.parent
LAST_CPU = max(os.sched_getaffinity(0))  # a strict subset of the host's CPUs whenever it has more than one


@pytest.mark.broker
def test_round_under_pi4_limits_completes_and_respects_them(tiny_export):
    profile = load_profile("pi4")
    res = run_hil(profile, tiny_export["dir"], emulate="native", memory_mb=300, cpus=[LAST_CPU])
    assert res.ok, f"{res.error}\n{res.daemon_log_tail}\n{res.coordinator_log_tail}"
    # a full round: the update was stored and aggregated into a new global version
    assert res.round_state == "closed" and (res.base_version, res.new_version) == (0, 1)
    assert res.upload_bytes and res.upload_bytes > 1000
    assert res.round_s is not None and res.ready_s is not None
    # the device ran as a device: torch never loaded, the profile's ORT thread count in its config
    assert res.torch_loaded is False and res.threads == profile.threads
    # CPU limit: the kernel's mask is the allowed set, and every thread sampled ran only there
    assert parse_cpu_list(res.cpus_allowed_list) == {LAST_CPU}
    assert res.observed_cpus and set(res.observed_cpus) <= {LAST_CPU}
    # memory limit: the peak resident set and the cgroup's peak charge stay under it
    assert res.peak_rss_mb is not None and 0 < res.peak_rss_mb <= res.memory_limit_mb == 300
    if res.memory_mode in ("cgroup1", "cgroup2"):
        assert res.cgroup_peak_mb is not None and res.cgroup_peak_mb <= 300
        assert res.oom_kills == 0


@pytest.mark.broker
def test_a_secure_round_runs_the_real_daemon_and_serve_over_tls_with_signed_messages(tiny_export):
    """`fedge fleet init/enroll`, the broker `fedge broker config` writes, `fedge serve --fleet-dir` and the daemon
    with its identity folder: the production set-up, one round, under the pi4 profile's limits."""
    res = run_hil("pi4", tiny_export["dir"], emulate="native", memory_mb=300, cpus=[LAST_CPU], secure=True)
    assert res.ok, f"{res.error}\n{res.daemon_log_tail}\n{res.coordinator_log_tail}"
    assert res.secure and res.round_state == "closed" and (res.base_version, res.new_version) == (0, 1)
    assert res.torch_loaded is False


@pytest.mark.broker
def test_tflite_backbone_round_under_profile_limits():
    """The LiteRT path of the daemon through the same harness (the committed tiny TFLite export)."""
    res = run_hil("pi5", ROOT / "tests/data/tflite", fmt="tflite", emulate="native", memory_mb=300, cpus=[LAST_CPU])
    assert res.ok, f"{res.error}\n{res.daemon_log_tail}\n{res.coordinator_log_tail}"
    # the runtime the device reported in its hello: a LiteRT interpreter (ai-edge-litert or tflite-runtime)
    assert ("litert" in res.runtime or "tflite" in res.runtime) and "onnxruntime" not in res.runtime, res.runtime
    assert res.threads == load_profile("pi5").threads
    assert (res.base_version, res.new_version) == (0, 1) and set(res.observed_cpus) <= {LAST_CPU}


@pytest.mark.broker
def test_too_small_memory_limit_fails_cleanly_not_hangs(tiny_export):
    probe = MemoryLimit.create(16)
    probe.close()
    if not probe.enforced:
        pytest.skip(f"no memory cgroup can be created here, so a limit cannot kill the daemon: {probe.note}")
    res = run_hil("pi4", tiny_export["dir"], emulate="native", memory_mb=16, cpus=[LAST_CPU], timeout_s=120)
    assert not res.ok
    assert "out of memory under the 16 MB limit" in res.error, res.error
    assert res.oom_kills >= 1 and res.daemon_exit == -9
    assert res.total_s is not None and res.total_s < 60  # ended by the death of the daemon, not the timeout
    assert res.new_version is None  # nothing was aggregated from a device that never answered


@pytest.mark.broker
def test_device_that_cannot_load_its_model_fails_with_its_own_error(tiny_export, tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    for name in ("backbone.onnx", "head.npz", "spec.json"):
        (model_dir / name).write_bytes((tiny_export["dir"] / name).read_bytes())
    (model_dir / "backbone.tflite").write_bytes(b"TFL3 but not a model")
    res = run_hil("pi4", model_dir, fmt="tflite", emulate="native", memory_mb=300, cpus=[LAST_CPU], timeout_s=120)
    assert not res.ok and res.daemon_exit == 2
    assert res.error.startswith("device daemon exited with 2: error:") and "backbone" in res.error, res.error
    assert res.total_s is not None and res.total_s < 60


def test_limits_are_applied_before_the_program_starts(tmp_path):
    """The wrapped child sees the mask and the cgroup (or rlimit) from its first instruction."""
    probe = (
        "import os, resource; print(sorted(os.sched_getaffinity(0)));"
        "print(resource.getrlimit(resource.RLIMIT_AS)[0]); print(open('/proc/self/cgroup').read())"
    )
    for mode in ("auto", "rlimit_as"):
        with MemoryLimit.create(256, mode) as limit:
            out = subprocess.run(limit.wrap([sys.executable, "-c", probe], [LAST_CPU]), capture_output=True,
                                 text=True, timeout=60, check=True).stdout.splitlines()
            assert out[0] == f"[{LAST_CPU}]"
            if limit.mode == "rlimit_as":
                assert int(out[1]) == (256 + 2048) * 1024 * 1024
            elif limit.enforced:
                assert limit.path is not None and limit.path.name in "\n".join(out[2:])
        assert limit.path is None or not limit.path.exists()  # the cgroup is removed afterwards


def test_cpu_selection_is_capped_by_the_host_and_checked():
    host = sorted(os.sched_getaffinity(0))
    assert allowed_cpus(64) == host  # a profile with more cores than the host gets all of them
    assert allowed_cpus(1) == host[-1:]
    with pytest.raises(ValueError, match="not available"):
        allowed_cpus(1, [max(host) + 1000])
    assert parse_cpu_list("0-2,5") == {0, 1, 2, 5} and parse_cpu_list("3") == {3}


def test_missing_emulation_is_reported_with_its_reason(monkeypatch, tmp_path):
    monkeypatch.setenv("FEDGE_AARCH64_ROOTFS", str(tmp_path / "no-rootfs"))
    with pytest.raises(EmulationUnavailable, match="no aarch64 rootfs"):
        qemu_python()
    target = resolve("auto", "aarch64")
    if target.arch != "aarch64":  # on a real aarch64 host auto runs natively, which is right
        assert not target.emulated and "no aarch64 rootfs" in target.note
    assert not resolve("native", "aarch64").emulated
    with pytest.raises(ValueError):
        resolve("sometimes", "aarch64")


def test_cli_rejects_bad_arguments_clearly(tmp_path, capsys):
    assert main(["--profile", "pi9", "--model-dir", str(tmp_path)]) == 2
    assert "unknown device profile" in capsys.readouterr().err
    assert main(["--profile", "pi4", "--model-dir", str(tmp_path)]) == 2
    assert "not an export directory" in capsys.readouterr().err


def _aarch64_or_skip():
    try:
        return qemu_python()
    except EmulationUnavailable as exc:
        pytest.skip(f"aarch64 emulation unavailable: {exc}")


@pytest.mark.broker
@pytest.mark.slow
def test_round_on_emulated_aarch64_python(tiny_export):
    """Runs only where hardware/qemu/make-rootfs.sh has been run (CI does not build the rootfs)."""
    _aarch64_or_skip()
    res = run_hil("pi4", tiny_export["dir"], emulate="qemu", memory_mb=600, cpus=[LAST_CPU])
    assert res.ok, f"{res.error}\n{res.daemon_log_tail}\n{res.coordinator_log_tail}"
    assert res.emulated and res.device_machine == "aarch64" and "emulat" in res.emulation_note
    assert (res.base_version, res.new_version) == (0, 1) and res.torch_loaded is False
    assert set(res.observed_cpus) <= {LAST_CPU} and res.peak_rss_mb is not None and res.peak_rss_mb <= 600
