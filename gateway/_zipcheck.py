"""Reading zip archives safely, and writing their files to disk safely.

Nothing here trusts the archive: entry names are checked before anything is
written, declared sizes are checked before anything is decompressed, and every
entry is then decompressed with a bounded read, so neither a zip bomb nor a
lying header can make the gateway allocate more than the configured budget.
Writing never follows a symlink and never writes into an existing file.
"""

from __future__ import annotations

import errno
import io
import lzma
import os
import re
import shutil
import stat
import struct
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.upload import UploadErrorCode

__all__ = ["ZipBudget", "ZipRejected", "check_entry_name", "excerpt", "read_zip", "write_tree"]

# Entries smaller than this are never called bombs: tiny files of repeated
# bytes compress absurdly well and are harmless.
RATIO_FLOOR = 1024
# Longest path component, in UTF-8 bytes (NAME_MAX on Linux filesystems).
MAX_COMPONENT_BYTES = 255
# Archiver noise that is skipped rather than rejected (macOS Finder metadata).
_IGNORED_TOP_DIRS = frozenset({"__MACOSX"})
_IGNORED_NAMES = frozenset({".DS_Store"})

_EOCD_SIGNATURE = b"PK\x05\x06"
_EOCD_SIZE = 22
_CD_SIGNATURE = b"PK\x01\x02"
_ZIP64_TRAILER_SIZE = 56 + 20  # zip64 end record plus its locator
_LOCAL_HEADER_SIZE = 30
_FLAG_ENCRYPTED = 0x1
_FLAG_UTF8 = 0x800
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC

_DRIVE = re.compile(r"[A-Za-z]:")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_SPECIAL_TYPES = {
    stat.S_IFCHR: "character device",
    stat.S_IFBLK: "block device",
    stat.S_IFIFO: "fifo",
    stat.S_IFSOCK: "socket",
}
# zipfile and the decompressors raise a grab-bag of types on corrupt input;
# every one of them means "this is not an archive we can read".
_CORRUPT = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    zlib.error,
    lzma.LZMAError,
    EOFError,
    OSError,  # bz2 reports corrupt streams as OSError
    ValueError,  # includes UnicodeDecodeError for bad UTF-8 names
    NotImplementedError,  # unsupported compression method or zip version
    RuntimeError,  # encryption the header flag did not announce
    struct.error,
    OverflowError,
    IndexError,
    KeyError,
)


class ZipRejected(Exception):
    """An archive failed a check; translated into ``UploadError`` by the caller."""

    def __init__(
        self, code: UploadErrorCode, message: str, detail: dict[str, object] | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.detail: dict[str, object] = dict(detail or {})


@dataclass(frozen=True, slots=True)
class ZipBudget:
    """The limits one archive is read under."""

    max_files: int
    max_unpacked_bytes: int
    max_path_depth: int
    # None skips the ratio checks: used for bundles we wrote ourselves, whose
    # compression ratio says nothing about the customer's intent.
    max_ratio: float | None


def excerpt(text: str, limit: int = 80) -> str:
    """Return at most ``limit`` characters of user-supplied text for a message."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def check_entry_name(name: str, *, max_depth: int) -> tuple[str, ...]:
    """Return the components of a safe relative POSIX path, or raise ``zip_slip``."""
    reason = _unsafe_reason(name, max_depth=max_depth)
    if reason is not None:
        shown = excerpt(name)
        raise ZipRejected("zip_slip", f"unsafe entry name {shown!r}: {reason}", {"file": shown})
    return tuple(name.split("/"))


def _unsafe_reason(name: str, *, max_depth: int) -> str | None:
    if not name:
        return "empty name"
    if "\x00" in name:
        return "NUL byte in name"
    if "\\" in name:
        return "backslash in name"
    if name.startswith("/"):
        return "absolute path"
    if _DRIVE.match(name):
        return "drive letter"
    if _CONTROL.search(name):
        return "control character in name"
    parts = name.split("/")
    if len(parts) > max_depth:
        return f"deeper than {max_depth} components"
    for part in parts:
        if part in ("", ".", ".."):
            return f"{part or 'empty'!r} path component"
        if len(part.encode("utf-8", "surrogatepass")) > MAX_COMPONENT_BYTES:
            return f"component longer than {MAX_COMPONENT_BYTES} bytes"
    return None


def read_zip(data: bytes, budget: ZipBudget) -> list[tuple[str, bytes]]:
    """Check an archive and return its regular files as sorted ``(path, content)``.

    Directories are implied by the paths; ``__MACOSX/`` and ``.DS_Store`` are
    skipped; everything else that is not a plain file is rejected.
    """
    _check_end_record(data, budget.max_files)
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            infos = zf.infolist()
            if not infos:
                raise ZipRejected("bad_zip", "the zip archive is empty")
            if len(infos) > budget.max_files:
                raise _too_many(budget.max_files)
            files = _select_files(infos, len(data), budget)
            _check_no_overlap(infos, len(data))
            return [(name, _read_entry(zf, info, name)) for name, info in files]
    except _CORRUPT as exc:
        raise ZipRejected("bad_zip", f"not a readable zip archive ({excerpt(str(exc))})") from None


def _too_many(limit: int) -> ZipRejected:
    return ZipRejected("too_many_files", f"archive has more than {limit} entries", {"limit": limit})


def _check_end_record(data: bytes, max_files: int) -> None:
    """Refuse split archives, and a huge central directory before zipfile
    builds an object per entry."""
    end = _find_end_record(data)
    if end is None:
        return  # zipfile decides what is wrong with it
    disk, cd_disk, disk_entries, entries, cd_size = struct.unpack_from("<4HL", data, end + 4)
    # zipfile only notices a split archive in the zip64 record.
    if disk != 0 or cd_disk != 0 or disk_entries != entries:
        raise ZipRejected("bad_zip", "multi-disk (split) archives are not supported")
    if cd_size == 0xFFFFFFFF:
        # The size is in the zip64 record (zipfile reads the directory by its
        # size): without this, 115,000 entries became 115,000 objects before
        # the count applied. A zip64 record we cannot read: count everything.
        cd_size = _zip64_cd_size(data, end) or end
    # Every central directory entry starts with the signature, so this count
    # is never below the real number of entries.
    start = max(0, end - cd_size - _ZIP64_TRAILER_SIZE)
    if data.count(_CD_SIGNATURE, start, end) > max_files:
        raise _too_many(max_files)


def _zip64_cd_size(data: bytes, end: int) -> int | None:
    """The central directory's size from the zip64 end record, if there is one."""
    locator = end - 20
    if locator < 0 or data[locator : locator + 4] != b"PK\x06\x07":
        return None
    (record,) = struct.unpack_from("<Q", data, locator + 8)
    if record + 56 > locator or data[record : record + 4] != b"PK\x06\x06":
        return None
    (size,) = struct.unpack_from("<Q", data, record + 40)
    return int(size)


def _find_end_record(data: bytes) -> int | None:
    # Mirrors zipfile._EndRecData: the record without a comment, else the last
    # signature within the maximum comment length from the end.
    if data[-_EOCD_SIZE : -_EOCD_SIZE + 4] == _EOCD_SIGNATURE and data[-2:] == b"\0\0":
        return len(data) - _EOCD_SIZE
    index = data.rfind(_EOCD_SIGNATURE, max(0, len(data) - _EOCD_SIZE - 0xFFFF))
    if index < 0 or index + _EOCD_SIZE > len(data):
        return None
    return index


def _select_files(
    infos: list[zipfile.ZipInfo], archive_size: int, budget: ZipBudget
) -> list[tuple[str, zipfile.ZipInfo]]:
    seen: set[str] = set()
    dirs: set[str] = set()
    files: list[tuple[str, zipfile.ZipInfo]] = []
    total = 0
    for info in infos:
        raw = info.orig_filename
        is_dir = raw.endswith("/")
        name = raw[:-1] if is_dir else raw
        parts = check_entry_name(name, max_depth=budget.max_path_depth)
        shown = excerpt(name)
        if info.volume != 0:
            raise ZipRejected("bad_zip", "multi-disk (split) archives are not supported")
        if info.flag_bits & _FLAG_ENCRYPTED:
            raise ZipRejected("bad_zip", f"entry {shown!r} is encrypted", {"file": shown})
        kind = stat.S_IFMT(info.external_attr >> 16)
        if kind == stat.S_IFLNK:
            raise ZipRejected("symlink_in_zip", f"entry {shown!r} is a symlink", {"file": shown})
        if kind == stat.S_IFDIR:
            is_dir = True
        elif kind not in (0, stat.S_IFREG):
            what = _SPECIAL_TYPES.get(kind, f"file of type {kind:#o}")
            raise ZipRejected(
                "special_file_in_zip", f"entry {shown!r} is a {what}", {"file": shown}
            )
        if name in seen:
            raise ZipRejected("bad_zip", f"duplicate entry {shown!r}", {"file": shown})
        seen.add(name)
        if is_dir:
            if info.file_size:
                raise ZipRejected("bad_zip", f"directory {shown!r} has content", {"file": shown})
            dirs.add(name)
            continue
        if parts[0] in _IGNORED_TOP_DIRS or parts[-1] in _IGNORED_NAMES:
            continue
        total += info.file_size
        if total > budget.max_unpacked_bytes:
            raise ZipRejected(
                "zip_bomb",
                f"archive unpacks to more than {budget.max_unpacked_bytes} bytes",
                {"limit": budget.max_unpacked_bytes},
            )
        if budget.max_ratio is not None and _ratio_exceeded(
            info.file_size, info.compress_size, budget.max_ratio
        ):
            raise ZipRejected(
                "zip_bomb",
                f"entry {shown!r} compresses more than {budget.max_ratio:g}:1",
                {"file": shown, "limit": budget.max_ratio},
            )
        dirs.update("/".join(parts[:i]) for i in range(1, len(parts)))
        files.append((name, info))
    if budget.max_ratio is not None and _ratio_exceeded(total, archive_size, budget.max_ratio):
        raise ZipRejected(
            "zip_bomb",
            f"archive compresses more than {budget.max_ratio:g}:1",
            {"limit": budget.max_ratio},
        )
    for name, _ in files:
        if name in dirs:
            shown = excerpt(name)
            raise ZipRejected(
                "bad_zip", f"{shown!r} is both a file and a directory", {"file": shown}
            )
    files.sort(key=lambda item: item[0])
    return files


def _ratio_exceeded(unpacked: int, packed: int, max_ratio: float) -> bool:
    return unpacked > RATIO_FLOOR and unpacked > max_ratio * max(packed, 1)


def _check_no_overlap(infos: list[zipfile.ZipInfo], archive_size: int) -> None:
    """Refuse entries whose compressed data overlap (the non-recursive zip bomb).

    A local header is at least 30 bytes plus the name, which zipfile checks
    against the central directory, so consecutive entries must be that far
    apart plus the compressed size.
    """
    ordered = sorted(infos, key=lambda info: info.header_offset)
    for current, following in zip(ordered, [*ordered[1:], None], strict=True):
        encoding = "utf-8" if current.flag_bits & _FLAG_UTF8 else "cp437"
        name_size = len(current.orig_filename.encode(encoding, "surrogatepass"))
        end = current.header_offset + _LOCAL_HEADER_SIZE + name_size + current.compress_size
        limit = archive_size if following is None else following.header_offset
        if current.header_offset < 0 or end > limit:
            shown = excerpt(current.orig_filename)
            raise ZipRejected(
                "zip_bomb", f"entry {shown!r} overlaps another entry", {"file": shown}
            )


def _read_entry(zf: zipfile.ZipFile, info: zipfile.ZipInfo, name: str) -> bytes:
    # ZipExtFile never returns more than the declared size, which the budget
    # already covers; asking for one byte more makes a short stream visible.
    with zf.open(info) as stream:
        content = stream.read(info.file_size + 1)
    if len(content) != info.file_size:
        shown = excerpt(name)
        raise ZipRejected(
            "bad_zip", f"entry {shown!r} does not match its declared size", {"file": shown}
        )
    return content


def write_tree(files: list[tuple[str, bytes]], dest: Path) -> None:
    """Write checked ``(path, content)`` pairs to ``dest``, which must not exist.

    The tree is built in a new temporary directory beside ``dest`` and renamed
    into place, so readers see all of it or nothing.
    """
    _refuse_existing(dest)
    tmp = tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    try:
        root = os.open(tmp, _DIR_FLAGS)
        try:
            _write_files(root, files)
            os.fchmod(root, 0o755)
            os.fsync(root)
        finally:
            os.close(root)
        _refuse_existing(dest)
        # rename() never follows a symlink at dest; over a non-directory it
        # fails, and over an empty directory created since the check above it
        # replaces nothing of value.
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    parent = os.open(dest.parent, _DIR_FLAGS & ~os.O_NOFOLLOW)
    try:
        os.fsync(parent)
    finally:
        os.close(parent)


def _refuse_existing(dest: Path) -> None:
    if os.path.lexists(dest):
        raise FileExistsError(errno.EEXIST, "unpack destination already exists", str(dest))


def _write_files(root: int, files: list[tuple[str, bytes]]) -> None:
    """Write files below the directory ``root`` without following any symlink.

    Every directory is created here with mkdir and entered by descriptor with
    O_NOFOLLOW, and every file is created with O_EXCL, so nothing already on
    disk is written through. Only the current path's descriptors stay open.
    """
    path: list[tuple[str, int]] = []  # directories from root to the current one
    try:
        for name, content in files:
            *dirs, filename = name.split("/")  # checked by read_zip
            common = 0
            while common < min(len(path), len(dirs)) and path[common][0] == dirs[common]:
                common += 1
            while len(path) > common:
                os.close(path.pop()[1])
            for part in dirs[common:]:
                parent = path[-1][1] if path else root
                try:
                    os.mkdir(part, 0o755, dir_fd=parent)
                except FileExistsError:
                    pass  # made by an earlier entry; opened with O_NOFOLLOW below
                fd = os.open(part, _DIR_FLAGS, dir_fd=parent)
                path.append((part, fd))
                os.fchmod(fd, 0o755)
            _write_file(path[-1][1] if path else root, filename, content)
    finally:
        for _, fd in path:
            os.close(fd)


def _write_file(directory: int, filename: str, content: bytes) -> None:
    fd = os.open(filename, _FILE_FLAGS, 0o644, dir_fd=directory)
    try:
        os.fchmod(fd, 0o644)
        view = memoryview(content)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
