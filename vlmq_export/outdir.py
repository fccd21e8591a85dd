"""The output directory contract: manifest.json, atomic publication, completeness checks."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from .errors import OutputDirError

SCHEMA_VERSION = 1
TOOL = "vlmq-export"
MANIFEST = "manifest.json"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def library_versions() -> dict:
    import importlib.metadata as md

    out = {"python": sys.version.split()[0]}
    for dist in ("vlmq-export", "torch", "transformers", "onnx", "onnx-ir", "onnxruntime", "onnxscript"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = None
    return out


def read_manifest(out: Path) -> dict:
    path = Path(out) / MANIFEST
    if not path.is_file():
        raise OutputDirError(f"{out}: not a vlmq-export output (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text())
    except ValueError:
        raise OutputDirError(f"{path}: unreadable manifest") from None
    if manifest.get("tool") != TOOL:
        raise OutputDirError(f"{path}: not written by {TOOL}")
    return manifest


def check_complete(out: Path, verify_hashes: bool = True) -> dict:
    """The manifest of a complete output directory, or a one-line OutputDirError saying what is wrong."""
    out = Path(out)
    if not out.is_dir():
        raise OutputDirError(f"{out}: no such output directory")
    manifest = read_manifest(out)
    if manifest.get("status") != "complete":
        raise OutputDirError(f"{out}: export did not complete (status: {manifest.get('status')})")
    for name, comp in manifest.get("components", {}).items():
        f = out / comp["file"]
        if not f.is_file():
            raise OutputDirError(f"{out}: {comp['file']} ({name}) is missing")
        if verify_hashes and sha256_file(f) != comp.get("sha256"):
            raise OutputDirError(f"{out}: {comp['file']} does not match its sha256 in the manifest")
    if not (out / "processor" / "config.json").is_file():
        raise OutputDirError(f"{out}: processor/ is missing")
    return manifest


def write_manifest(out: Path, manifest: dict) -> None:
    tmp = Path(out) / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False, default=str))
    os.replace(tmp, Path(out) / MANIFEST)


def check_target(out: Path) -> None:
    """Refuse an OUT that exists and is not a vlmq-export directory (never overwrite foreign files)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        try:
            read_manifest(out)
        except OutputDirError:
            raise OutputDirError(f"{out} exists and is not a vlmq-export output directory; choose another -o") from None


def check_writable(out: Path) -> None:
    """``check_target``, and that OUT can be made: its nearest existing ancestor is a directory in which a
    file can be created (tried with a temporary file, removed at once: nothing is left behind)."""
    out = Path(out).absolute()
    check_target(out)
    parent = out.parent
    while not parent.exists() and not parent.is_symlink():
        parent = parent.parent
    if not parent.is_dir():
        raise OutputDirError(f"cannot create {out}: {parent} is not a directory")
    try:
        tempfile.TemporaryFile(dir=parent).close()
    except OSError as exc:
        raise OutputDirError(f"cannot create {out}: {parent} is not writable ({exc.strerror or exc})") from None


class Staging:
    """Build an output directory beside its destination and publish it with a rename at the end.

    A run killed at any point leaves at most a hidden ``.NAME.partial-PID`` folder, never an OUT
    that claims to be complete.
    """

    def __init__(self, out: Path):
        self.out = Path(out).resolve()
        check_target(self.out)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        for stale in self.out.parent.glob(f".{self.out.name}.partial-*"):
            pid = stale.name.rsplit("-", 1)[-1]
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(stale, ignore_errors=True)
        self.path = self.out.parent / f".{self.out.name}.partial-{os.getpid()}"
        shutil.rmtree(self.path, ignore_errors=True)
        self.path.mkdir()

    def publish(self) -> Path:
        old = None
        if self.out.exists():
            check_target(self.out)
            old = self.out.parent / f".{self.out.name}.old-{os.getpid()}-{int(time.time())}"
            os.replace(self.out, old)
        os.replace(self.path, self.out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.out

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
