"""The shipped model folder as one xz archive inside the wheel, and unpacked again where the coordinator reads it.

Why: every install of the one `fedge` distribution carries the shipped model as package data, devices included
(issue 14 caps a device install at 100 MB), although a device gets its model through signed bundles. Its files are
one set of weights in several formats -- the torch checkpoint, ONNX fp32 and int8, TFLite fp32 and int8, the head as
npz and ONNX -- so one xz stream over all of them (a 64 MB dictionary sees the repeats across files) is less than
half the folder (3.6 of 8.4 MB for tsfm-tiny-v1), with every file kept byte for byte. The repository keeps the
plain folder (it is what ``benchmarks/foundation.py ship`` writes and what a checkout or an editable install reads);
``setup.py`` packs it into the wheel with :func:`pack`, and :func:`unpacked` restores it once into a cache the
first time an installed coordinator asks for it.

Stdlib only: ``setup.py`` loads this file by path at build time, before any dependency is installed.
"""

from __future__ import annotations

import hashlib
import io
import lzma
import os
import shutil
import tarfile
import tempfile
from pathlib import Path

SUFFIX = ".tar.xz"
PRESET = 9 | lzma.PRESET_EXTREME  # 64 MB dictionary: spans the whole folder, so repeated weights cost nothing
DONE = ".unpacked"  # written last: a folder without it is an interrupted unpack, never used


def pack(folder: Path, archive: Path) -> Path:
    """Write every regular file of `folder` (no subfolders) into `archive`, reproducibly: sorted names, zero
    mtimes and owners, so one folder always gives the same bytes (and the same wheel)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for path in sorted(p for p in folder.iterdir() if p.is_file()):
            data = path.read_bytes()
            info = tarfile.TarInfo(path.name)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))
    archive.parent.mkdir(parents=True, exist_ok=True)
    archive.write_bytes(lzma.compress(buf.getvalue(), format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, preset=PRESET))
    return archive


def cache_root() -> Path:
    """Where unpacked folders live: $FEDGE_CACHE (as hardware/emulation.py) or ~/.cache/fedge."""
    return Path(os.environ.get("FEDGE_CACHE", Path.home() / ".cache" / "fedge")) / "pretrained"


def _extract(archive: Path, into: Path) -> None:
    """Plain files with plain names only (a tampered archive cannot write outside `into`); xz's CRC64 fails a
    damaged archive before anything is used."""
    with tarfile.open(archive, mode="r:xz") as tar:
        for member in tar:
            name = member.name
            if not member.isfile() or name != os.path.basename(name) or name in ("", ".", "..") or name == DONE:
                raise ValueError(f"{archive.name}: unexpected member {name!r}")
            src = tar.extractfile(member)
            assert src is not None  # a regular file always has a stream
            with src, open(into / name, "wb") as dst:
                shutil.copyfileobj(src, dst)


def unpacked(archive: Path, root: Path | None = None) -> Path:
    """The folder `archive` holds, unpacked once under `root` (default :func:`cache_root`) into a name keyed by the
    archive's sha256, so an upgraded package never reads an older model's files. Concurrent first calls are safe:
    each unpacks into its own temporary folder and renames it into place; a loser uses the winner's folder."""
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()[:16]
    base = root if root is not None else cache_root()
    target = base / f"{archive.name.removesuffix(SUFFIX)}-{digest}"
    if (target / DONE).is_file():
        return target
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=base, prefix=".unpack-"))
    try:
        _extract(archive, tmp)
        (tmp / DONE).write_text(digest + "\n")
        try:
            tmp.rename(target)
        except OSError:  # another process finished first, or an interrupted unpack left `target` behind
            if not (target / DONE).is_file():
                shutil.rmtree(target, ignore_errors=True)
                tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
