"""Content-addressed blob files of the embedded store: ``blobs/ab/<sha256hex>``.

A blob is written to a temp file in its final directory, fsynced, renamed into place and
the directory fsynced, so a crash leaves either the whole blob or a stray temp file.
These functions block; the store runs them on a thread.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import time
from pathlib import Path

from gateway.store import NotFound, StoreError

_DIGEST = re.compile(r"[0-9a-f]{64}")
_STALE_TEMP_S = 3600.0  # temp files older than this are left over from a crash


def blob_path(blob_dir: Path, digest: str) -> Path:
    if not _DIGEST.fullmatch(digest):
        raise ValueError(f"not a sha256 hex digest: {digest!r}")
    return blob_dir / digest[:2] / digest


def put_blob(blob_dir: Path, data: bytes) -> str:
    digest = hashlib.sha256(data).hexdigest()
    path = blob_path(blob_dir, digest)
    try:
        if path.is_file() and path.stat().st_size == len(data):
            return digest
        _write_durably(path, data)
    except OSError as exc:
        raise StoreError("storage_error", f"cannot write blob {digest}: {exc}") from exc
    return digest


def read_blob(blob_dir: Path, digest: str) -> bytes:
    path = blob_path(blob_dir, digest)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise NotFound("blob_not_found", f"blob {digest} not found") from None
    except OSError as exc:
        raise StoreError("storage_error", f"cannot read blob {digest}: {exc}") from exc
    if hashlib.sha256(data).hexdigest() != digest:
        raise StoreError("blob_corrupt", f"blob {digest} does not match its digest")
    return data


def remove_stale_temp_files(blob_dir: Path) -> None:
    cutoff = time.time() - _STALE_TEMP_S
    for tmp in blob_dir.glob("*/.tmp-*"):
        try:
            if tmp.stat().st_mtime < cutoff:
                tmp.unlink()
        except FileNotFoundError:
            pass


def _write_durably(path: Path, data: bytes) -> None:
    new_dir = not path.parent.is_dir()
    path.parent.mkdir(mode=0o700, exist_ok=True)
    if new_dir:
        _fsync_dir(path.parent.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), 0o444)  # content-addressed: never changes
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
