"""Upload validation: sources, archives, bundles and unpacking.

Archives are built in memory with zipfile; the hostile ones are then patched
byte by byte where zipfile itself refuses to write them.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import stat
import struct
import time
import warnings
import zipfile
from pathlib import Path

import pytest

from gateway.upload import (
    DEFAULT_ENTRYPOINT,
    CodeBundle,
    UploadError,
    UploadLimits,
    bundle_from_source,
    bundle_from_zip,
    unpack_bundle,
)

LIMITS = UploadLimits()
HANDLER = b"def handler(request, ctx):\n    return {'hello': 'world'}\n"

Entry = tuple[str | zipfile.ZipInfo, bytes]


def make_zip(entries: list[Entry], *, compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicates we want
        with zipfile.ZipFile(buffer, "w", compression) as zf:
            for name, content in entries:
                zf.writestr(name, content)
    return buffer.getvalue()


def typed_entry(name: str, mode: int, content: bytes = b"") -> Entry:
    info = zipfile.ZipInfo(name)
    info.create_system = 3
    info.external_attr = mode << 16
    return info, content


def central_header(data: bytes) -> int:
    """Offset of the last central directory header (the last entry's)."""
    return data.rindex(b"PK\x01\x02")


def patch(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    buffer = bytearray(data)
    struct.pack_into(fmt, buffer, offset, value)
    return bytes(buffer)


def reject_source(source: bytes, **kwargs: object) -> UploadError:
    with pytest.raises(UploadError) as info:
        bundle_from_source(source, entrypoint=None, limits=UploadLimits(**kwargs))  # type: ignore[arg-type]
    return info.value


def reject_zip(data: bytes, *, entrypoint: str | None = None, **kwargs: object) -> UploadError:
    with pytest.raises(UploadError) as info:
        bundle_from_zip(data, entrypoint=entrypoint, limits=UploadLimits(**kwargs))  # type: ignore[arg-type]
    return info.value


# --- sources ------------------------------------------------------------------------


def test_source_becomes_handler_py() -> None:
    bundle = bundle_from_source(HANDLER, entrypoint=None, limits=LIMITS)
    assert bundle.files == (("handler.py", HANDLER),)
    assert bundle.entrypoint == DEFAULT_ENTRYPOINT == "handler:handler"


def test_source_with_custom_entrypoint_goes_to_its_module_file() -> None:
    bundle = bundle_from_source(
        b"def run(r, c):\n    pass\n", entrypoint="pkg.mod:run", limits=LIMITS
    )
    assert bundle.files == (("pkg/mod.py", b"def run(r, c):\n    pass\n"),)
    assert bundle.entrypoint == "pkg.mod:run"


def test_syntax_error_reports_file_line_and_column() -> None:
    error = reject_source(b"def handler(request, ctx):\n    return (1 +* 2)\n")
    assert error.code == "syntax_error"
    assert error.detail == {"file": "handler.py", "line": 2, "column": 16}
    assert error.message == "handler.py:2:16: invalid syntax"


@pytest.mark.parametrize(
    ("source", "line", "column"),
    [
        (b"def handler(r, c):\n    return 1\n  x = 2\n", 3, 8),  # IndentationError
        (b"import os\ndef handler(r, c):\n\treturn 1\n        pass\n", 4, 1),  # TabError
        (b"def handler(r, c):\n    return 'open\n", 2, 12),
        (b"def handler(r, c):\n    return (1,\n", 2, 12),
    ],
)
def test_syntax_error_subclasses_are_located(source: bytes, line: int, column: int) -> None:
    error = reject_source(source)
    assert error.code == "syntax_error"
    assert (error.detail["line"], error.detail["column"]) == (line, column)


def test_null_byte_is_a_syntax_error_at_its_position() -> None:
    error = reject_source(b"def handler(r, c):\n    return 1\x00\n")
    assert error.code == "syntax_error"
    assert error.detail == {"file": "handler.py", "line": 2, "column": 13}


def test_invalid_utf8_is_bad_encoding() -> None:
    error = reject_source(b"def handler(r, c):\n    return '\xff'\n")
    assert error.code == "bad_encoding"
    assert error.detail == {"file": "handler.py", "line": 2, "column": 13}


def test_non_utf8_coding_declaration_is_bad_encoding() -> None:
    error = reject_source(b"#!/usr/bin/env python\n# -*- coding: latin-1 -*-\n" + HANDLER)
    assert error.code == "bad_encoding"
    assert error.detail["line"] == 2


@pytest.mark.parametrize(
    "prefix", [b"# -*- coding: utf-8 -*-\n", b"# vim: set fileencoding=utf8 :\n", b"\xef\xbb\xbf"]
)
def test_utf8_declaration_and_bom_are_accepted(prefix: bytes) -> None:
    bundle_from_source(prefix + HANDLER, entrypoint=None, limits=LIMITS)


def test_invalid_escape_warning_does_not_reject_source() -> None:
    # pytest turns warnings into errors here; the parser's DeprecationWarning
    # must not become a SyntaxError.
    source = b'import re\nPATTERN = re.compile("\\d+")\n' + HANDLER
    bundle_from_source(source, entrypoint=None, limits=LIMITS)


def test_source_over_the_size_limit_is_too_large() -> None:
    error = reject_source(HANDLER + b"#" * 100, max_source_bytes=100)
    assert error.code == "too_large"
    assert error.detail["file"] == "handler.py"


def test_source_with_too_many_tokens_is_too_large() -> None:
    error = reject_source(HANDLER + b"x = [" + b"1, " * 200 + b"]\n", max_source_tokens=300)
    assert error.code == "too_large"


def test_one_megabyte_line_is_accepted() -> None:
    head = HANDLER + b'DATA = "'
    source = head + b"a" * (LIMITS.max_source_bytes - len(head) - 2) + b'"\n'
    assert len(source) == LIMITS.max_source_bytes
    bundle_from_source(source, entrypoint=None, limits=LIMITS)
    assert reject_source(source + b"\n").code == "too_large"


def test_deeply_nested_source_is_rejected_fast() -> None:
    started = time.perf_counter()
    error = reject_source(b"(" * 100_000)
    assert time.perf_counter() - started < 1.0
    assert error.code == "source_too_deep"
    assert error.detail == {"file": "handler.py", "line": 1, "column": LIMITS.max_ast_depth + 1}


@pytest.mark.parametrize(
    "source",
    [
        b"x = " + b"-" * 100_000 + b"1\n",
        b"x = " + b"not " * 50_000 + b"y\n",
        b"x = a" + b" + a" * 100_000 + b"\n",
        b"x = a" + b".b" * 100_000 + b"\n",
        b"x = " + b"lambda: " * 50_000 + b"1\n",
        b"x = " + b"y if z else " * 20_000 + b"y\n",
    ],
    ids=["unary", "not", "binop", "attribute", "lambda", "conditional"],
)
def test_deep_expressions_without_brackets_are_source_too_deep(source: bytes) -> None:
    error = reject_source(source)
    assert error.code == "source_too_deep"
    assert error.detail == {"file": "handler.py"}


def test_deep_indentation_is_source_too_deep() -> None:
    lines = [b"    " * level + b"if x:" for level in range(30)] + [b"    " * 30 + b"pass"]
    error = reject_source(b"\n".join(lines) + b"\n", max_ast_depth=20)
    assert error.code == "source_too_deep"
    assert error.detail["line"] == 22


def test_deep_fstring_is_source_too_deep() -> None:
    error = reject_source(b'x = f"{' + b"(" * 300 + b"1" + b")" * 300 + b'}"\n')
    assert error.code == "source_too_deep"


def test_infinite_loop_at_module_level_is_accepted_because_nothing_runs() -> None:
    source = b"while True:\n    pass\n\n" + HANDLER
    bundle_from_source(source, entrypoint=None, limits=LIMITS)


@pytest.mark.parametrize(
    "source",
    [
        b"async def handler(request, ctx):\n    return 1\n",
        b"def make():\n    return print\nhandler = make()\n",
        b"handler, other = print, 2\n",
        b"handler: object = print\n",
        b"from os import path as handler\n",
        b"import json as handler\n",
        b"try:\n    from fast import handler\nexcept ImportError:\n    def handler(r, c):\n"
        b"        return 1\n",
        b"if True:\n    def handler(r, c):\n        return 1\n",
    ],
    ids=["async", "assign", "unpack", "annotated", "from-import", "import", "try", "if"],
)
def test_handler_forms_are_accepted(source: bytes) -> None:
    bundle_from_source(source, entrypoint=None, limits=LIMITS)


@pytest.mark.parametrize(
    "source",
    [
        b"def other(request, ctx):\n    return 1\n",
        b"def outer():\n    def handler(r, c):\n        return 1\n",
        b"class App:\n    def handler(self, r, c):\n        return 1\n",
        b"handler: object\n",
        b"from helpers import *\n",
        b"",
    ],
    ids=["other-name", "nested", "method", "annotation-only", "star-import", "empty"],
)
def test_missing_handler(source: bytes) -> None:
    error = reject_source(source)
    assert error.code == "missing_handler"
    assert error.detail == {"file": "handler.py", "function": "handler"}
    assert "'handler'" in error.message


@pytest.mark.parametrize(
    ("entrypoint", "module_file"),
    [
        ("handler:handler", "handler.py"),
        ("app:main", "app.py"),
        ("pkg.mod:main", "pkg/mod.py"),
        ("_p.m_2.Deep:main", "_p/m_2/Deep.py"),
    ],
)
def test_valid_entrypoints(entrypoint: str, module_file: str) -> None:
    bundle = bundle_from_source(b"main = handler = print\n", entrypoint=entrypoint, limits=LIMITS)
    assert bundle.files[0][0] == module_file
    assert bundle.entrypoint == entrypoint


@pytest.mark.parametrize(
    "entrypoint",
    [
        "",
        "handler",
        "handler:",
        ":handler",
        "a..b:f",
        ".a:f",
        "a.:f",
        "1a:f",
        "a:1f",
        "a:f:g",
        "a/b:f",
        "a:f\n",
        " a:f",
        "a-b:f",
        "é:f",
        "def:f",
        "a:class",
        "a:" + "f" * 300,
        "a." * 16 + "a:f",  # deeper than max_path_depth
    ],
)
def test_bad_entrypoints(entrypoint: str) -> None:
    with pytest.raises(UploadError) as info:
        bundle_from_source(HANDLER, entrypoint=entrypoint, limits=LIMITS)
    assert info.value.code == "bad_entrypoint"
    assert len(info.value.message) < 200


# --- archives -----------------------------------------------------------------------


def test_zip_with_packages_data_and_directories() -> None:
    data = make_zip(
        [
            typed_entry("lib/", stat.S_IFDIR | 0o755),
            ("lib/util.py", b"def helper():\n    return 1\n"),
            ("lib/table.json", b"{}"),
            ("handler.py", b"from lib.util import helper\n" + HANDLER),
            ("__MACOSX/._handler.py", b"\x00\x05\x16\x07 apple double"),
            ("lib/.DS_Store", b"\x00\x00\x00\x01Bud1"),
        ]
    )
    bundle = bundle_from_zip(data, entrypoint=None, limits=LIMITS)
    assert [name for name, _ in bundle.files] == ["handler.py", "lib/table.json", "lib/util.py"]
    assert bundle.entrypoint == "handler:handler"


def test_zip_with_custom_entrypoint() -> None:
    data = make_zip(
        [("pkg/__init__.py", b""), ("pkg/app.py", b"async def main(r, c):\n    pass\n")]
    )
    bundle = bundle_from_zip(data, entrypoint="pkg.app:main", limits=LIMITS)
    assert bundle.entrypoint == "pkg.app:main"
    error = reject_zip(data)
    assert error.code == "missing_handler"
    assert error.detail["file"] == "handler.py"


def test_zip_entrypoint_function_missing() -> None:
    error = reject_zip(make_zip([("handler.py", b"def other(r, c):\n    pass\n")]))
    assert error.code == "missing_handler"
    assert error.detail == {"file": "handler.py", "function": "handler"}


def test_zip_checks_every_python_file() -> None:
    data = make_zip([("handler.py", HANDLER), ("lib/util.py", b"x = 1\ny = (1 +* 2)\n")])
    error = reject_zip(data)
    assert error.code == "syntax_error"
    assert error.detail == {"file": "lib/util.py", "line": 2, "column": 9}
    assert error.message.startswith("lib/util.py:2:9: ")


def test_errors_quote_only_an_excerpt_of_long_names() -> None:
    name = "/".join(["d" * 200] * 15) + "/m.py"
    error = reject_zip(make_zip([("handler.py", HANDLER), (name, b"x = (1 +* 2)\n")]))
    assert error.code == "syntax_error"
    assert len(error.message) < 200
    assert len(str(error.detail["file"])) <= 120


def test_zip_python_file_not_utf8_is_bad_encoding() -> None:
    error = reject_zip(make_zip([("handler.py", HANDLER), ("lib/old.py", b"x = '\xe9'\n")]))
    assert error.code == "bad_encoding"
    assert error.detail["file"] == "lib/old.py"


def test_zip_python_file_over_source_limit_is_too_large() -> None:
    data = make_zip([("handler.py", HANDLER), ("big.py", b"#" * 500)])
    error = reject_zip(data, max_source_bytes=400)
    assert error.code == "too_large"
    assert error.detail["file"] == "big.py"


def test_archive_over_size_limit_is_too_large() -> None:
    assert (
        reject_zip(make_zip([("handler.py", HANDLER)]), max_archive_bytes=100).code == "too_large"
    )


@pytest.mark.parametrize(
    "name",
    [
        "../x.py",
        "/etc/x",
        "a/../../x",
        "C:\\x",
        "C:/x",
        "a\\..\\x",
        "lib\\util.py",
        "a//b.py",
        "./handler.py",
        "a/./b",
        "x\n.py",
        "a/" * 16 + "x.py",
        "a" * 256,
    ],
)
def test_zip_slip(name: str) -> None:
    error = reject_zip(make_zip([("handler.py", HANDLER), (name, b"x")]))
    assert error.code == "zip_slip"
    assert len(error.message) < 200


def test_zip_slip_on_a_directory_entry() -> None:
    error = reject_zip(make_zip([("handler.py", HANDLER), typed_entry("../d/", stat.S_IFDIR)]))
    assert error.code == "zip_slip"


def test_zip_slip_nul_in_name() -> None:
    # zipfile truncates names at NUL when writing, so patch the bytes afterwards.
    data = make_zip([("handler.py", HANDLER), ("evil.pyX../../x", b"x")])
    data = data.replace(b"evil.pyX", b"evil.py\x00")
    assert reject_zip(data).code == "zip_slip"


def test_symlink_entry_is_rejected() -> None:
    data = make_zip([("handler.py", HANDLER), typed_entry("link", stat.S_IFLNK | 0o777, b"/etc")])
    error = reject_zip(data)
    assert error.code == "symlink_in_zip"
    assert error.detail == {"file": "link"}


@pytest.mark.parametrize("kind", [stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK])
def test_special_file_entry_is_rejected(kind: int) -> None:
    data = make_zip([("handler.py", HANDLER), typed_entry("dev", kind | 0o644)])
    assert reject_zip(data).code == "special_file_in_zip"


def test_duplicate_names_are_bad_zip() -> None:
    data = make_zip([("handler.py", HANDLER), ("handler.py", HANDLER)])
    assert reject_zip(data).code == "bad_zip"


def test_file_and_directory_with_the_same_path_are_bad_zip() -> None:
    data = make_zip([("handler.py", HANDLER), ("lib", b"x"), ("lib/util.py", b"")])
    assert reject_zip(data).code == "bad_zip"


def test_too_many_files() -> None:
    entries: list[Entry] = [("handler.py", HANDLER), ("a", b""), ("b", b""), ("c", b"")]
    assert reject_zip(make_zip(entries), max_files=3).code == "too_many_files"


def test_too_many_files_is_refused_before_parsing_the_directory() -> None:
    entries: list[Entry] = [(f"f{i}", b"") for i in range(LIMITS.max_files + 1)]
    assert reject_zip(make_zip(entries, compression=zipfile.ZIP_STORED)).code == "too_many_files"


def test_zip_bomb_declared_size() -> None:
    # 100 MB of zeros deflate to ~100 KB; streamed so the test never holds it.
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        zf.writestr("handler.py", HANDLER)
        chunk = bytes(1 << 20)
        with zf.open("zeros.bin", "w", force_zip64=True) as stream:
            for _ in range(100):
                stream.write(chunk)
    data = buffer.getvalue()
    assert len(data) < 200_000
    started = time.perf_counter()
    error = reject_zip(data)
    assert time.perf_counter() - started < 1.0
    assert error.code == "zip_bomb"


def test_zip_bomb_compression_ratio_under_size_cap() -> None:
    data = make_zip([("handler.py", HANDLER), ("zeros.bin", bytes(2_000_000))])
    error = reject_zip(data)
    assert error.code == "zip_bomb"
    assert error.detail["file"] == "zeros.bin"


def test_small_compressible_files_are_not_bombs() -> None:
    data = make_zip([("handler.py", HANDLER), ("zeros.bin", bytes(1000))])
    bundle_from_zip(data, entrypoint=None, limits=LIMITS)


def test_zip_lying_about_its_size_is_bad_zip() -> None:
    data = make_zip([("handler.py", HANDLER), ("blob.bin", os.urandom(4096))])
    # Declare fewer bytes than the stream holds: the read stops at the
    # declared size and the CRC no longer matches.
    smaller = patch(data, central_header(data) + 24, "<L", 100)
    assert reject_zip(smaller).code == "bad_zip"
    # Declare more: the stream ends early.
    larger = patch(data, central_header(data) + 24, "<L", 8192)
    assert reject_zip(larger).code == "bad_zip"


def test_overlapping_entries_are_a_zip_bomb() -> None:
    data = make_zip([("a.bin", os.urandom(2000)), ("handler.py", HANDLER)])
    first = data.index(b"PK\x01\x02")
    (compress_size,) = struct.unpack_from("<L", data, first + 20)
    assert reject_zip(patch(data, first + 20, "<L", compress_size + 50)).code == "zip_bomb"


def test_encrypted_entry_is_bad_zip() -> None:
    data = make_zip([("handler.py", HANDLER)])
    data = patch(data, central_header(data) + 8, "<H", 0x1)
    error = reject_zip(data)
    assert error.code == "bad_zip"
    assert "encrypted" in error.message


def test_multi_disk_archive_is_bad_zip() -> None:
    data = make_zip([("handler.py", HANDLER)])
    assert reject_zip(patch(data, data.rindex(b"PK\x05\x06") + 4, "<H", 1)).code == "bad_zip"


def test_unsupported_compression_method_is_bad_zip() -> None:
    data = make_zip([("handler.py", HANDLER)])
    data = patch(data, central_header(data) + 10, "<H", 99)
    data = patch(data, 8, "<H", 99)
    assert reject_zip(data).code == "bad_zip"


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not a zip at all",
        b"PK\x03\x04" + bytes(100),
        make_zip([("handler.py", HANDLER)])[:-30],
    ],
    ids=["empty", "text", "local-header-only", "truncated"],
)
def test_not_a_zip_is_bad_zip(data: bytes) -> None:
    assert reject_zip(data).code == "bad_zip"


def test_corrupt_archives_only_raise_upload_error() -> None:
    original = make_zip(
        [("handler.py", HANDLER), ("lib/util.py", b"x = 1\n" * 50), ("data.bin", os.urandom(300))]
    )
    rng = random.Random(1234)  # noqa: S311 -- deterministic fuzzing, not cryptography
    for _ in range(400):
        data = bytearray(original)
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        if rng.random() < 0.2:
            del data[rng.randrange(len(data)) :]
        try:
            bundle_from_zip(bytes(data), entrypoint=None, limits=LIMITS)
        except UploadError:
            pass


# --- bundles ------------------------------------------------------------------------


def test_to_zip_is_deterministic() -> None:
    files = [("handler.py", HANDLER), ("lib/util.py", b"X = 1\n"), ("assets/a.txt", b"hello")]
    first = make_zip(list(files))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as zf:
        for name, content in reversed(files):
            info = zipfile.ZipInfo(name, date_time=(2024, 5, 6, 7, 8, 10))
            info.external_attr = (stat.S_IFREG | 0o755) << 16
            zf.writestr(info, content)
    a = bundle_from_zip(first, entrypoint=None, limits=LIMITS)
    b = bundle_from_zip(buffer.getvalue(), entrypoint=None, limits=LIMITS)
    assert a == b
    assert a.to_zip() == b.to_zip() == a.to_zip()
    assert hashlib.sha256(a.to_zip()).digest() == hashlib.sha256(b.to_zip()).digest()
    with zipfile.ZipFile(io.BytesIO(a.to_zip())) as zf:
        assert [info.filename for info in zf.infolist()] == [name for name, _ in a.files]
        for info in zf.infolist():
            assert info.date_time == (1980, 1, 1, 0, 0, 0)
            assert info.external_attr >> 16 == stat.S_IFREG | 0o644
    assert bundle_from_zip(a.to_zip(), entrypoint=a.entrypoint, limits=LIMITS) == a


def test_code_bundle_requires_sorted_unique_files() -> None:
    with pytest.raises(ValueError):
        CodeBundle(files=(("b.py", b""), ("a.py", b"")))
    with pytest.raises(ValueError):
        CodeBundle(files=(("a.py", b""), ("a.py", b"")))


# --- unpacking ----------------------------------------------------------------------


def sample_bundle() -> CodeBundle:
    data = make_zip(
        [("handler.py", HANDLER), ("lib/util.py", b"X = 1\n"), ("lib/data/t.json", b"{}")]
    )
    return bundle_from_zip(data, entrypoint=None, limits=LIMITS)


def test_unpack_writes_files_0644_and_dirs_0755(tmp_path: Path) -> None:
    bundle = sample_bundle()
    dest = tmp_path / "code"
    old_umask = os.umask(0o077)
    try:
        unpack_bundle(bundle.to_zip(), dest)
    finally:
        os.umask(old_umask)
    for directory in (dest, dest / "lib", dest / "lib/data"):
        assert stat.S_IMODE(directory.lstat().st_mode) == 0o755
        assert stat.S_ISDIR(directory.lstat().st_mode)
    for name, content in bundle.files:
        path = dest / name
        assert stat.S_ISREG(path.lstat().st_mode)
        assert stat.S_IMODE(path.lstat().st_mode) == 0o644
        assert path.read_bytes() == content
    assert sorted(p.name for p in tmp_path.iterdir()) == ["code"]


def test_unpack_refuses_a_symlink_at_dest(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.mkdir()
    dest = tmp_path / "code"
    dest.symlink_to(target)
    with pytest.raises(FileExistsError):
        unpack_bundle(sample_bundle().to_zip(), dest)
    assert dest.is_symlink()
    assert list(target.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["code", "target"]


def test_unpack_refuses_an_existing_directory(tmp_path: Path) -> None:
    dest = tmp_path / "code"
    dest.mkdir()
    with pytest.raises(FileExistsError):
        unpack_bundle(sample_bundle().to_zip(), dest)
    assert list(dest.iterdir()) == []


def test_unpack_refuses_an_escaping_archive(tmp_path: Path) -> None:
    data = make_zip([("handler.py", HANDLER), ("../evil.py", b"x")])
    with pytest.raises(UploadError) as info:
        unpack_bundle(data, tmp_path / "code")
    assert info.value.code == "zip_slip"
    assert list(tmp_path.iterdir()) == []


def test_unpack_accepts_highly_compressible_stored_code(tmp_path: Path) -> None:
    # A source upload is never ratio-checked, so its stored zip may compress
    # far beyond max_ratio; unpacking our own bundle must still work.
    source = HANDLER + b'PAD = "' + b"a" * 500_000 + b'"\n'
    bundle = bundle_from_source(source, entrypoint=None, limits=LIMITS)
    unpack_bundle(bundle.to_zip(), tmp_path / "code")
    assert (tmp_path / "code" / "handler.py").read_bytes() == source


def test_a_zip64_directory_is_counted_before_parsing_too() -> None:
    """The end record's directory size 0xFFFFFFFF defers to the zip64 record;
    that deferral skipped the early count, and zipfile built an object for each
    of 115,000 entries (70 MB) before the limit applied."""
    from gateway._zipcheck import ZipRejected, _check_end_record

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as zf:
        for i in range(66_000):  # past 65,535 entries zipfile writes zip64 records
            zf.writestr(f"{i}", b"")
    data = bytearray(buffer.getvalue())
    end = data.rfind(b"PK\x05\x06")
    struct.pack_into("<L", data, end + 12, 0xFFFFFFFF)  # "see the zip64 record"
    with pytest.raises(ZipRejected) as error:
        _check_end_record(bytes(data), LIMITS.max_files)
    assert error.value.code == "too_many_files"
    assert reject_zip(bytes(data)).code == "too_many_files"
