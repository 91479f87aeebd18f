"""Validation of uploaded function code, and unpacking of stored bundles.

Customer code is never imported or executed on the host. A source file is
only tokenized and parsed (``compile(..., PyCF_ONLY_AST)``), after cheap checks
that bound what the parser may spend on it; an archive is read with bounded
decompression (``gateway._zipcheck``). Everything here is synchronous and
CPU-bound: the gateway runs it in a process of its own (``gateway.checker``).
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.machinery
import io
import keyword
import re
import stat
import sys
import threading
import tokenize
import warnings
import zipfile
from pathlib import Path
from typing import Literal

from gateway._zipcheck import ZipBudget, ZipRejected, excerpt, read_zip, write_tree
from jail.runner import BYTECODE_RATIO, BYTECODE_SLACK

__all__ = [
    "DEFAULT_ENTRYPOINT",
    "CodeBundle",
    "UploadError",
    "UploadErrorCode",
    "UploadLimits",
    "bundle_from_source",
    "bundle_from_zip",
    "unpack_bundle",
]

DEFAULT_ENTRYPOINT = "handler:handler"

UploadErrorCode = Literal[
    "bad_encoding",  # a .py file is not UTF-8, or declares another encoding
    "bad_entrypoint",  # the entrypoint is not "module.path:function"
    "bad_zip",  # not a zip, corrupt, encrypted, multi-disk, duplicate or clashing names
    "missing_handler",  # the entrypoint module or its top-level function is absent
    "source_too_deep",  # nesting beyond max_ast_depth, or too deep for the parser
    "special_file_in_zip",  # a device, fifo or socket entry
    "symlink_in_zip",  # a symlink entry
    "syntax_error",  # a .py file does not parse (detail: file, line, column)
    "too_complex",  # the checker ran out of time or memory on it (gateway.checker)
    "too_large",  # a source file, the archive, or a file's token count is over its limit
    "too_many_files",  # more entries than max_files
    "zip_bomb",  # unpacked size, compression ratio or overlapping entries over the limits
    "zip_slip",  # an entry name that is absolute, climbs out, or is otherwise unsafe
]


@dataclasses.dataclass(frozen=True, slots=True)
class UploadLimits:
    """Bounds on what one upload may make the gateway read, parse and store."""

    max_source_bytes: int = 1_000_000  # one .py file
    max_archive_bytes: int = 10_000_000  # compressed zip
    max_unpacked_bytes: int = 50_000_000  # sum of uncompressed sizes
    max_files: int = 1000  # zip entries, directories included
    max_ratio: float = 100.0  # per entry and overall compression ratio (zip bomb)
    max_path_depth: int = 16  # components in an entry name
    max_ast_depth: int = 200  # bracket plus indent nesting, checked before compile()
    # Tokens in one .py file. The parser needs roughly 1 KB per token and holds
    # the GIL throughout, so this bounds one compile() at ~250 MB and well under
    # a second; hand-written code has ~1 token per 5 bytes, so real files fit.
    max_source_tokens: int = 250_000

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            if getattr(self, field.name) <= 0:
                raise ValueError(f"UploadLimits.{field.name} must be positive")


class UploadError(Exception):
    """An upload was rejected. ``code`` is stable; ``message`` is for humans."""

    code: UploadErrorCode
    message: str
    detail: dict[str, object]

    def __init__(
        self, code: UploadErrorCode, message: str, detail: dict[str, object] | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.detail = dict(detail or {})

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.code, self.message, self.detail))


@dataclasses.dataclass(frozen=True, slots=True)
class CodeBundle:
    """Validated function code: sorted relative POSIX paths of regular files."""

    files: tuple[tuple[str, bytes], ...]
    entrypoint: str = DEFAULT_ENTRYPOINT

    def __post_init__(self) -> None:
        names = [name for name, _ in self.files]
        if names != sorted(set(names)):
            raise ValueError("CodeBundle.files must be sorted and unique")

    def disk_bytes(self) -> int:
        """What the jail dir may hold for it: the files, plus the most bytecode
        the gateway writes for them (jail.runner's budget)."""
        py = sum(len(c) for name, c in self.files if name.endswith(".py"))
        return sum(len(c) for _, c in self.files) + BYTECODE_RATIO * py + BYTECODE_SLACK

    def to_zip(self) -> bytes:
        """Return a deterministic zip: equal files give equal bytes (and sha256)."""
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, compresslevel=6) as zf:
            for name, content in self.files:
                info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
                info.compress_type = zipfile.ZIP_DEFLATED
                info.create_system = 3  # Unix, so external_attr carries the mode
                info.external_attr = (stat.S_IFREG | 0o644) << 16
                zf.writestr(info, content)
        return buffer.getvalue()


def bundle_from_source(
    source: bytes, *, entrypoint: str | None, limits: UploadLimits
) -> CodeBundle:
    """Validate one Python file; it becomes the entrypoint's module file."""
    ep, module_file, function = _parse_entrypoint(entrypoint, limits)
    tree = _parse_source(module_file, source, limits)
    _require_function(tree, module_file, function)
    return CodeBundle(files=((module_file, source),), entrypoint=ep)


def bundle_from_zip(data: bytes, *, entrypoint: str | None, limits: UploadLimits) -> CodeBundle:
    """Validate a zip archive: safe names, bounded sizes, and every .py file parses."""
    ep, module_file, function = _parse_entrypoint(entrypoint, limits)
    if len(data) > limits.max_archive_bytes:
        raise UploadError(
            "too_large",
            f"archive is larger than {limits.max_archive_bytes} bytes",
            {"limit": limits.max_archive_bytes},
        )
    budget = ZipBudget(
        max_files=limits.max_files,
        max_unpacked_bytes=limits.max_unpacked_bytes,
        max_path_depth=limits.max_path_depth,
        max_ratio=limits.max_ratio,
    )
    files = _read_zip(data, budget)
    names = {name for name, _ in files}
    package_init = module_file[: -len(".py")] + "/__init__.py"
    if module_file not in names and package_init in names:
        module_file = package_init  # "pkg:handler" with pkg/__init__.py
    _refuse_shadowing(module_file, names)
    entry_tree: ast.Module | None = None
    for name, content in files:
        if name.endswith(".py"):
            tree = _parse_source(name, content, limits)
            if name == module_file:
                entry_tree = tree
    if entry_tree is None:
        raise UploadError(
            "missing_handler",
            f"entrypoint module {module_file} is not in the archive",
            {"file": module_file, "entrypoint": ep},
        )
    local = frozenset(name.split("/")[0].removesuffix(".py") for name, _ in files)
    _require_function(entry_tree, module_file, function, local)
    return CodeBundle(files=tuple(files), entrypoint=ep)


def _refuse_shadowing(module_file: str, names: set[str]) -> None:
    """A module and a package of one name (x.py and x/): Python imports only one
    of them (a package with __init__.py wins, a namespace package loses), so the
    code that was checked here would not be what runs."""
    parts = module_file.removesuffix("/__init__.py").removesuffix(".py").split("/")
    for i in range(1, len(parts) + 1):
        path = "/".join(parts[:i])
        native = [n for n in names if n.startswith(path + ".") and n.endswith(_EXTENSION_SUFFIXES)]
        if native:
            raise UploadError(
                "bad_entrypoint",
                f"the archive has {native[0]}, which Python would import instead of "
                f"{path}.py (and which cannot load in the jail): remove it",
                {"file": native[0]},
            )
        if f"{path}.py" in names and any(n.startswith(path + "/") for n in names):
            raise UploadError(
                "bad_entrypoint",
                f"the archive has both {path}.py and a package {path}/, and Python imports "
                "only one of them: rename one",
                {"file": f"{path}.py"},
            )


def unpack_bundle(zip_bytes: bytes, dest: Path, *, limits: UploadLimits | None = None) -> None:
    """Materialise a stored bundle at ``dest``, which must not exist yet.

    The tree is written into a new temporary directory beside ``dest`` and
    renamed into place, so readers see all of it or nothing. Directories are
    0755 and files 0644 whatever the umask; nothing is opened through a
    symlink. Raises ``UploadError`` for an archive that fails the structural
    checks, ``FileExistsError`` if ``dest`` exists (a symlink included), and
    ``OSError`` for I/O failures.
    """
    limits = limits or UploadLimits()
    budget = ZipBudget(
        max_files=limits.max_files,
        max_unpacked_bytes=limits.max_unpacked_bytes,
        max_path_depth=limits.max_path_depth,
        max_ratio=None,  # we wrote this archive; see ZipBudget
    )
    write_tree(_read_zip(zip_bytes, budget), Path(dest))


# --- entrypoint ----------------------------------------------------------------

_IDENTIFIER = r"[A-Za-z_][A-Za-z0-9_]*"
_ENTRYPOINT = re.compile(rf"{_IDENTIFIER}(?:\.{_IDENTIFIER})*:{_IDENTIFIER}")
_MAX_ENTRYPOINT_LENGTH = 200
# Module names the jail's interpreter resolves before /function: the standard
# library's and the runtime's own (jail/runtime: bootstrap, _frames, nsfaas).
# Built-in and frozen modules too (xxsubtype, __hello__, __phello__), and
# __main__ (the runtime itself); any __dunder__ name is refused with them.
_TAKEN_MODULES = (
    frozenset(sys.stdlib_module_names)
    | frozenset(sys.builtin_module_names)
    | {"bootstrap", "_frames", "nsfaas"}
)
# What Python's importer loads before a .py of the same name (extension
# modules), for every suffix its interpreters use (this one's, the jail's).
_EXTENSION_SUFFIXES = (".so", ".pyd", ".abi3.so", *importlib.machinery.EXTENSION_SUFFIXES)


def _parse_entrypoint(entrypoint: str | None, limits: UploadLimits) -> tuple[str, str, str]:
    """Return ``(entrypoint, module file, function name)`` or raise ``bad_entrypoint``."""
    ep = DEFAULT_ENTRYPOINT if entrypoint is None else entrypoint
    valid = len(ep) <= _MAX_ENTRYPOINT_LENGTH and _ENTRYPOINT.fullmatch(ep) is not None
    if valid:
        module, function = ep.split(":")
        parts = module.split(".")
        valid = len(parts) <= limits.max_path_depth and not any(
            keyword.iskeyword(word) for word in [*parts, function]
        )
    if not valid:
        raise UploadError(
            "bad_entrypoint",
            f"entrypoint {excerpt(ep)!r} is not of the form 'module.path:function'",
            {"entrypoint": excerpt(ep)},
        )
    if parts[0] in _TAKEN_MODULES or (parts[0].startswith("__") and parts[0].endswith("__")):
        # The runtime and the standard library come first on sys.path: this
        # name would import theirs, and every call would fail to load.
        raise UploadError(
            "bad_entrypoint",
            f"the entrypoint's module name {parts[0]!r} is taken by Python's standard library "
            "or the runtime (it would be imported instead of yours): rename it",
            {"entrypoint": excerpt(ep)},
        )
    return ep, "/".join(parts) + ".py", function


def _require_function(
    tree: ast.Module, module_file: str, function: str, local_modules: frozenset[str] = frozenset()
) -> None:
    """The entrypoint must be bound at top level, and not only to a literal.

    ``local_modules`` are the top-level modules of the archive (none for a
    single source file): code in them may set the name when imported.
    """
    bindings = _top_level_bindings(tree).get(function)
    if not bindings:
        raise UploadError(
            "missing_handler",
            f"{module_file} does not define {function!r} at top level "
            "(looked for def, async def, class, an assignment or an import)",
            {"file": module_file, "function": function},
        )
    literals = [value for value in bindings if isinstance(value, _LITERALS)]
    if len(literals) == len(bindings) and not _may_rebind(tree, function, local_modules):
        # Accepted, every call would fail at load ("... is not a callable").
        literals.sort(key=lambda node: (node.lineno, node.col_offset))
        kinds = ", ".join(dict.fromkeys(_literal_kind(node) for node in literals))
        what = "literals" if "," in kinds else "a literal"
        raise UploadError(
            "missing_handler",
            f"{module_file} binds {function!r} only to {what} ({kinds}), which cannot be called",
            {"file": module_file, "function": function},
        )


# Expressions whose value is never callable.
_LITERALS = (
    ast.Constant,
    ast.JoinedStr,
    ast.List,
    ast.Tuple,
    ast.Set,
    ast.Dict,
    ast.ListComp,
    ast.SetComp,
    ast.DictComp,
    ast.GeneratorExp,
)


def _literal_kind(node: ast.expr) -> str:
    if isinstance(node, ast.Constant):
        return "None" if node.value is None else type(node.value).__name__
    if isinstance(node, ast.JoinedStr):
        return "str"
    if isinstance(node, ast.GeneratorExp):
        return "generator"
    return type(node).__name__.removesuffix("Comp").lower()


# Ways a module can set a global the AST of its assignments does not show:
# globals()["handler"] = f, setattr(sys.modules[__name__], ...), exec(...).
_DYNAMIC_NAMES = frozenset(
    {"globals", "vars", "locals", "setattr", "exec", "eval", "__import__", "import_module"}
)
_DYNAMIC_ATTRS = frozenset({"modules", "__dict__", "setattr", "import_module"})


def _may_rebind(tree: ast.Module, function: str, local_modules: frozenset[str]) -> bool:
    """Whether the module may set ``function`` in a way other than its
    top-level assignments (which all bind a literal): refusing is only right
    when the AST is sure, so anything it cannot follow counts."""
    top_level_targets = {id(target) for target in _literal_targets(tree, function)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            if node.id in _DYNAMIC_NAMES:
                return True
            if node.id == function and isinstance(node.ctx, ast.Store):
                if id(node) not in top_level_targets:
                    return True  # for, with, walrus, a nested scope's global
        elif isinstance(node, ast.Attribute):
            if node.attr in _DYNAMIC_ATTRS:
                return True
            if node.attr == function and isinstance(node.ctx, ast.Store):
                return True  # a module object's attribute: maybe this module's
        elif isinstance(node, ast.Global | ast.Nonlocal):
            if function in node.names:
                return True
        elif isinstance(node, ast.Constant):
            if node.value == function:
                return True  # a name as a string: setattr, a dict of globals
        elif isinstance(node, ast.ImportFrom):
            if node.level or any(alias.name == "*" for alias in node.names):
                return True
            if (node.module or "").split(".")[0] in local_modules:
                return True
        elif isinstance(node, ast.Import):
            if any(alias.name.split(".")[0] in local_modules for alias in node.names):
                return True  # the archive's code runs at that import, and may set it
    return False


def _literal_targets(tree: ast.Module, function: str) -> list[ast.expr]:
    """The ``ast.Name`` targets through which top-level statements bind
    ``function`` to a literal (see _top_level_bindings)."""
    found: list[ast.expr] = []
    for target, value in _walk_bindings(tree):
        if isinstance(target, ast.Name) and target.id == function and isinstance(value, _LITERALS):
            found.append(target)
    return found


def _top_level_bindings(tree: ast.Module) -> dict[str, list[ast.expr | None]]:
    """Names bound at module scope by def, class, assignment or import, each
    with the expressions assigned to it (None: a def, a class, an import, or
    a value the unpacking does not show)."""
    bindings: dict[str, list[ast.expr | None]] = {}
    for target, value in _walk_bindings(tree):
        name = target.id if isinstance(target, ast.Name) else target
        assert isinstance(name, str)
        bindings.setdefault(name, []).append(value)
    return bindings


def _walk_bindings(tree: ast.Module) -> list[tuple[ast.Name | str, ast.expr | None]]:
    """Top-level bindings as (target, value): an ``ast.Name`` target for an
    assignment, the bound name for a def, class or import.

    Blocks of compound statements (if, try, with, ...) run at module level too,
    so they are searched; function and class bodies are not. Iterative, so a
    deep tree cannot exhaust the stack.
    """
    found: list[tuple[ast.Name | str, ast.expr | None]] = []
    statements: list[ast.stmt] = list(tree.body)
    while statements:
        node = statements.pop()
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            found.append((node.name, None))
        elif isinstance(node, ast.Assign):
            pairs: list[tuple[ast.expr, ast.expr | None]] = [(t, node.value) for t in node.targets]
            while pairs:
                target, value = pairs.pop()
                if isinstance(target, ast.Name):
                    found.append((target, value))
                elif isinstance(target, ast.Tuple | ast.List):
                    # a, b = f, 2: element by element when the sides line up.
                    elts = value.elts if isinstance(value, ast.Tuple | ast.List) else None
                    if elts is not None and (
                        len(elts) != len(target.elts)
                        or any(isinstance(e, ast.Starred) for e in elts)
                    ):
                        elts = None
                    for i, elt in enumerate(target.elts):
                        pairs.append((elt, None if elts is None else elts[i]))
                elif isinstance(target, ast.Starred):
                    pairs.append((target.value, None))
        elif isinstance(node, ast.AnnAssign):
            if node.value is not None and isinstance(node.target, ast.Name):
                found.append((node.target, node.value))
        elif isinstance(node, ast.Import):
            found.extend((alias.asname or alias.name.split(".")[0], None) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            found.extend(
                (alias.asname or alias.name, None) for alias in node.names if alias.name != "*"
            )
        elif isinstance(node, ast.With | ast.AsyncWith):
            statements.extend(node.body)
        elif isinstance(node, ast.If | ast.For | ast.AsyncFor | ast.While):
            statements.extend(node.body)
            statements.extend(node.orelse)
        elif isinstance(node, ast.Try | ast.TryStar):
            statements.extend(node.body)
            statements.extend(node.orelse)
            statements.extend(node.finalbody)
            for handler in node.handlers:
                statements.extend(handler.body)
        elif isinstance(node, ast.Match):
            for case in node.cases:
                statements.extend(case.body)
    return found


# --- source checks ---------------------------------------------------------------

# PEP 263, as tokenize.detect_encoding reads it.
_CODING = re.compile(r"^[ \t\f]*#.*?coding[:=][ \t]*([-\w.]+)", re.ASCII)
_BLANK = re.compile(r"^[ \t\f]*(?:[#\r\n]|\Z)", re.ASCII)
_OPENERS = frozenset("([{")
_CLOSERS = frozenset(")]}")
_BRACKETS = re.compile(r"[()\[\]{}]")
# compile() reports warnings about the customer's code through the global,
# thread-unsafe warnings filters (and with -W error they become SyntaxErrors):
# silence those categories one parse at a time. Serialising parses also bounds
# the parser memory held at once to one file's worth.
_PARSE_LOCK = threading.Lock()


def _parse_source(name: str, source: bytes, limits: UploadLimits) -> ast.Module:
    """Check one .py file without executing it and return its AST."""
    name = excerpt(name, 120)  # only used in messages; archive paths can be long
    if len(source) > limits.max_source_bytes:
        raise UploadError(
            "too_large",
            f"{name} is larger than {limits.max_source_bytes} bytes",
            {"file": name, "limit": limits.max_source_bytes},
        )
    text = _decode(name, source)
    null = text.find("\x00")
    if null >= 0:
        line, column = _position(text, null)
        raise _syntax_error("syntax_error", name, "source contains a null byte", line, column)
    _check_nesting(name, text, limits)
    try:
        with _PARSE_LOCK, warnings.catch_warnings():
            # Invalid escape sequences: DeprecationWarning in 3.11, SyntaxWarning later.
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", SyntaxWarning)
            tree = compile(text, name, "exec", flags=ast.PyCF_ONLY_AST, dont_inherit=True)
    except SyntaxError as exc:  # IndentationError and TabError included
        raise _syntax_error(
            "syntax_error", name, exc.msg or "invalid syntax", exc.lineno, exc.offset
        ) from None
    except (RecursionError, MemoryError):
        # CPython's parser guards its own stack and reports too-deep input as
        # one of these; our nesting scan does not see every kind of depth
        # (a chain like "a+a+a+..." has no brackets).
        raise _syntax_error(
            "source_too_deep", name, "source is nested too deeply to parse", None, None
        ) from None
    except ValueError as exc:
        raise _syntax_error("syntax_error", name, str(exc), None, None) from None
    assert isinstance(tree, ast.Module)
    return tree


def _decode(name: str, source: bytes) -> str:
    try:
        text = source.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = source.count(b"\n", 0, exc.start) + 1
        column = exc.start - (source.rfind(b"\n", 0, exc.start) + 1) + 1
        raise _syntax_error("bad_encoding", name, "not valid UTF-8", line, column) from None
    text = text.removeprefix("\ufeff")
    for number, head in enumerate(text.split("\n", 2)[:2], start=1):
        match = _CODING.match(head)
        if match:
            declared = match.group(1)
            normal = declared[:12].lower().replace("_", "-")
            if normal not in ("utf-8", "utf8") and not normal.startswith(("utf-8-", "utf8-")):
                raise _syntax_error(
                    "bad_encoding",
                    name,
                    f"declares encoding {excerpt(declared, 40)!r}; only UTF-8 is accepted",
                    number,
                    match.start(1) + 1,
                )
            break
        if not _BLANK.match(head):
            break
    return text


def _check_nesting(name: str, text: str, limits: UploadLimits) -> None:
    """Bound bracket plus indent nesting, and the token count, before compile().

    tokenize is pure Python, so this scan is interruptible and its cost is
    bounded by ``max_source_tokens``. It stops quietly on the errors tokenize
    raises (an unterminated string or bracket at end of file, a bad dedent):
    compile() then reports them precisely, having seen no more than we did.
    """
    brackets = 0
    indent = 0
    count = 0
    tokens = tokenize.generate_tokens(io.StringIO(text).readline)
    try:
        for token in tokens:
            count += 1
            if count > limits.max_source_tokens:
                raise UploadError(
                    "too_large",
                    f"{name} has more than {limits.max_source_tokens} tokens",
                    {"file": name, "limit": limits.max_source_tokens},
                )
            inner = 0
            if token.type == tokenize.OP:
                if token.string in _OPENERS:
                    brackets += 1
                elif token.string in _CLOSERS:
                    brackets = max(brackets - 1, 0)
            elif token.type == tokenize.INDENT:
                indent += 1
            elif token.type == tokenize.DEDENT:
                indent = max(indent - 1, 0)
            elif token.type == tokenize.STRING:
                inner = _fstring_depth(token.string)
            if brackets + indent + inner > limits.max_ast_depth:
                line, column = token.start
                raise _syntax_error(
                    "source_too_deep",
                    name,
                    f"nesting deeper than {limits.max_ast_depth} levels",
                    line,
                    column + 1,
                )
    except (tokenize.TokenError, SyntaxError):
        return
    finally:
        tokens.close()


def _fstring_depth(literal: str) -> int:
    """Deepest bracket nesting inside an f-string, which tokenize keeps whole."""
    prefix = literal[: len(literal) - len(literal.lstrip("rRbBuUfF"))]
    if "f" not in prefix.lower():
        return 0
    depth = deepest = 0
    for match in _BRACKETS.finditer(literal):
        depth = depth + 1 if match.group() in _OPENERS else max(depth - 1, 0)
        deepest = max(deepest, depth)
    return deepest


def _position(text: str, index: int) -> tuple[int, int]:
    line = text.count("\n", 0, index) + 1
    column = index - (text.rfind("\n", 0, index) + 1) + 1
    return line, column


def _syntax_error(
    code: UploadErrorCode, name: str, message: str, line: int | None, column: int | None
) -> UploadError:
    """Build an error located as ``file:line:column`` (1-based), like a compiler."""
    message = excerpt(message, 200)
    detail: dict[str, object] = {"file": name}
    where = name
    if line is not None:
        line = max(line, 1)
        column = max(column or 1, 1)
        detail.update(line=line, column=column)
        where = f"{name}:{line}:{column}"
    return UploadError(code, f"{where}: {message}", detail)


# --- archives ----------------------------------------------------------------------


def _read_zip(data: bytes, budget: ZipBudget) -> list[tuple[str, bytes]]:
    try:
        return read_zip(data, budget)
    except ZipRejected as exc:
        raise UploadError(exc.code, exc.message, exc.detail) from None
