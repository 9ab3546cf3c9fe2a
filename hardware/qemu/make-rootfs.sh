#!/usr/bin/env bash
# Build an aarch64 (arm64) userland with CPython 3.11 and the fedge device stack, for running the
# device daemon under qemu-user emulation on an x86-64 host (hardware/hil.py --emulate qemu).
#
# Why this recipe: containers and CI sandboxes rarely have binfmt_misc, so the arm64 rootfs cannot
# be chrooted into and debootstrap's second stage cannot run. We only need files, not an installed
# system: debootstrap --foreign downloads Debian's arm64 packages (python3.11 and its libraries),
# dpkg-deb -x unpacks them into the rootfs, and pip installs manylinux aarch64 wheels of the device
# dependencies into a directory inside it. The harness then runs
#     qemu-aarch64 -L ROOTFS ROOTFS/usr/bin/python3.11 ...
# which needs no chroot and no binfmt_misc.
#
# qemu must be >= 8.1: older qemu-user passes the host's x86 /proc/cpuinfo through, and ONNX Runtime's
# cpuinfo library dereferences NULL while parsing it (SIGSEGV at `import onnxruntime`; seen with
# bookworm's qemu 7.2). So the recipe also fetches trixie's statically linked qemu-user (10.x) with a
# private apt configuration (the host's apt sources are untouched) and keeps only qemu-aarch64.
#
# Needs (x86-64 Debian/Ubuntu host, root): debootstrap, dpkg-deb, apt-get, python3 -m pip.
#     apt-get install -y debootstrap
# Usage: hardware/qemu/make-rootfs.sh [ROOTFS]   (default ~/.cache/fedge/aarch64-rootfs; ~500 MB, a few minutes)
set -euo pipefail

ROOTFS="${1:-${FEDGE_AARCH64_ROOTFS:-$HOME/.cache/fedge/aarch64-rootfs}}"
SUITE="${FEDGE_DEBIAN_SUITE:-bookworm}"          # bookworm ships CPython 3.11, the project's version
MIRROR="${FEDGE_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
PIP="${PIP:-python3 -m pip}"
SITE="$ROOTFS/opt/fedge/site-packages"          # the harness puts this on the emulated PYTHONPATH
QEMU="$(dirname "$ROOTFS")/qemu-aarch64"         # where hardware/emulation.py looks for it
QEMU_SUITE="${FEDGE_QEMU_SUITE:-trixie}"
# The device install of pyproject.toml's default dependencies (no torch) with both backbone runtimes
# (fedge[onnx,litert]): the harness runs every format.
DEVICE_DEPS=(numpy onnxruntime "paho-mqtt>=2.0" msgpack "pydantic>=2.6" cryptography click ai-edge-litert)
# bookworm's glibc is 2.36: accept every manylinux tag up to it (ai-edge-litert 2.x is manylinux_2_27 only)
PLATFORMS=(--platform manylinux2014_aarch64)
for v in 17 24 26 27 28 31 34 35 36; do PLATFORMS+=(--platform "manylinux_2_${v}_aarch64"); done

for tool in debootstrap dpkg-deb apt-get; do
    command -v "$tool" >/dev/null || { echo "error: $tool not found (apt-get install -y debootstrap)" >&2; exit 2; }
done

if [[ ! -x "$QEMU" ]]; then
    echo "== qemu-user from Debian $QEMU_SUITE -> $QEMU"
    APT_DIR="$(mktemp -d)"
    trap 'rm -rf "$APT_DIR"' EXIT
    mkdir -p "$APT_DIR/lists/partial" "$APT_DIR/cache/archives/partial"
    echo "deb $MIRROR $QEMU_SUITE main" > "$APT_DIR/sources.list"
    APT_OPTS=(-o "Dir::Etc::SourceList=$APT_DIR/sources.list" -o Dir::Etc::SourceParts=/dev/null
              -o "Dir::State::Lists=$APT_DIR/lists" -o "Dir::Cache=$APT_DIR/cache" -o APT::Sandbox::User=root)
    apt-get "${APT_OPTS[@]}" update -qq
    (cd "$APT_DIR" && apt-get "${APT_OPTS[@]}" download -qq qemu-user)
    dpkg-deb -x "$APT_DIR"/qemu-user_*.deb "$APT_DIR/x"
    mkdir -p "$(dirname "$QEMU")"
    cp "$APT_DIR/x/usr/bin/qemu-aarch64" "$QEMU"
fi
"$QEMU" --version | head -1

if [[ -x "$ROOTFS/usr/bin/python3.11" && -f "$ROOTFS/.fedge-rootfs-ok" ]]; then
    echo "aarch64 rootfs already built at $ROOTFS"
    exit 0
fi

# Build beside the target and rename at the end, so an interrupted build is never mistaken for a good one.
FINAL="$ROOTFS"
ROOTFS="$FINAL.partial"
SITE="$ROOTFS/opt/fedge/site-packages"
rm -rf "$ROOTFS"
mkdir -p "$ROOTFS"
echo "== debootstrap --foreign arm64 $SUITE -> $ROOTFS"
# --foreign: download and unpack only; the second stage would need to execute arm64 binaries.
debootstrap --foreign --arch=arm64 --variant=minbase \
    --include=python3.11-minimal,libpython3.11-stdlib,libssl3,libffi8,zlib1g,libexpat1,libsqlite3-0,libbz2-1.0,liblzma5,libstdc++6,libgcc-s1,ca-certificates \
    "$SUITE" "$ROOTFS" "$MIRROR"

echo "== unpacking the downloaded .debs (no maintainer scripts needed for a Python runtime)"
for deb in "$ROOTFS"/var/cache/apt/archives/*.deb; do
    dpkg-deb -x "$deb" "$ROOTFS"
done

echo "== pip: manylinux aarch64 wheels of the device dependencies -> $SITE"
mkdir -p "$SITE"
$PIP install --quiet --no-cache-dir --target "$SITE" "${PLATFORMS[@]}" --only-binary=:all: --python-version 3.11 \
    --implementation cp "${DEVICE_DEPS[@]}"

echo "== smoke test under qemu"
"$QEMU" -L "$ROOTFS" "$ROOTFS/usr/bin/python3.11" -c "
import sys, platform
sys.path.insert(0, '$SITE')
import numpy, onnxruntime, paho.mqtt, msgpack, pydantic, cryptography, ai_edge_litert.interpreter
print(platform.machine(), sys.version.split()[0], 'numpy', numpy.__version__, 'onnxruntime', onnxruntime.__version__)
"
touch "$ROOTFS/.fedge-rootfs-ok"
rm -rf "$FINAL"
mv "$ROOTFS" "$FINAL"
echo "aarch64 rootfs ready at $FINAL"
