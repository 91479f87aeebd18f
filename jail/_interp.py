"""Which host files the jailed interpreter needs, bound one by one, read-only.

The jail's root is an empty tmpfs; only the interpreter binary, its stdlib
(with site-packages hidden) and the exact shared libraries it and its
extension modules load are bound in. Binding whole trees such as /usr/lib
would show the jail far more of the host than it needs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .errors import JailUnavailable

_PROBE = (
    "import json, sys, sysconfig;"
    "print(json.dumps({'exe': sys.executable, 'stdlib': sysconfig.get_path('stdlib'),"
    "'platstdlib': sysconfig.get_path('platstdlib'), 'version': sys.version.split()[0],"
    "'dynload': [p for p in sys.path if p.endswith('lib-dynload')]}))"
)
_LDD_LINE = re.compile(r"(?:=>\s*)?(/\S+)\s+\(0x[0-9a-f]+\)")


@dataclass(frozen=True, slots=True)
class Interpreter:
    """A host Python usable inside the jail, with what must be bound for it."""

    exe: str  # host path of the binary (resolved)
    version: str
    binds: tuple[tuple[str, str], ...]  # (host source, jail destination), read-only
    symlinks: tuple[tuple[str, str], ...]  # (target, jail path) for merged-/usr layouts
    hidden: tuple[str, ...]  # jail paths covered by an empty read-only tmpfs


def _reachable(path: Path) -> bool:
    """Can an unprivileged uid traverse every ancestor and read the file?"""
    for parent in path.parents:
        if not os.stat(parent).st_mode & 0o001:
            return False
    return bool(os.stat(path).st_mode & 0o004)


def candidates(preferred: str | None) -> list[str]:
    found = [preferred] if preferred else []
    found += ["/usr/bin/python3", "/usr/local/bin/python3"]
    which = shutil.which("python3")
    if which:
        found.append(which)
    return found


def _ldd(paths: list[str]) -> set[str]:
    ldd = shutil.which("ldd")
    if not ldd or not paths:
        return set()
    proc = subprocess.run(  # noqa: S603 (host tool on host files, fixed arguments)
        [ldd, *paths], capture_output=True, text=True, timeout=30, check=False
    )
    return {m.group(1) for m in _LDD_LINE.finditer(proc.stdout)}


def discover(preferred: str | None = None) -> Interpreter:
    """Find a host python3 the jail uid can read, and list what it needs.

    Runs the *host's own* interpreter once (trusted, fixed code) to ask where
    its stdlib lives; customer code is never involved.
    """
    errors = []
    for cand in candidates(preferred):
        path = Path(cand)
        if not path.exists():
            continue
        real = path.resolve()
        if not _reachable(real):
            errors.append(f"{real} is not readable by an unprivileged uid")
            continue
        try:
            proc = subprocess.run(  # noqa: S603 (host interpreter, fixed probe code)
                [str(real), "-I", "-S", "-c", _PROBE],
                capture_output=True,
                text=True,
                timeout=30,
                check=True,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            errors.append(f"{real}: {exc}")
            continue
        info = json.loads(proc.stdout)
        return _build(real, info)
    raise JailUnavailable(
        "no usable python3 for the jail: "
        + ("; ".join(errors) or "none found")
        + ". Install python3 in a world-readable location (e.g. /usr/bin/python3) "
        "or set NSFAAS_RUNTIME_PYTHON."
    )


def _build(real: Path, info: dict[str, object]) -> Interpreter:
    stdlib = str(info["stdlib"])
    dynload = [str(d) for d in info.get("dynload") or [] if isinstance(d, str)]  # type: ignore[attr-defined]
    exts = []
    for d in dynload:
        if os.path.isdir(d):
            exts += [os.path.join(d, f) for f in os.listdir(d) if f.endswith(".so")]
    libs = _ldd([str(real), *exts])
    binds: dict[str, str] = {str(real): "/usr/bin/python3", stdlib: stdlib}
    for d in dynload:
        if not d.startswith(stdlib + "/") and os.path.isdir(d):
            binds[d] = d
    for lib in sorted(libs):
        binds[os.path.realpath(lib)] = lib
    symlinks = []
    for top in ("/lib", "/lib64", "/lib32", "/libx32"):
        if os.path.islink(top):
            symlinks.append((os.readlink(top), top))
    # A bind destination under a merged-/usr symlink must use the real path.
    fixed: dict[str, str] = {}
    for src, dst in binds.items():
        for target, link in symlinks:
            if dst == link or dst.startswith(link + "/"):
                real_top = os.path.normpath(os.path.join("/", target))
                dst = real_top + dst[len(link) :]
                break
        fixed[src] = dst
    hidden = tuple(
        p
        for p in (os.path.join(stdlib, "site-packages"), os.path.join(stdlib, "dist-packages"))
        if os.path.isdir(p)
    )
    return Interpreter(
        exe=str(real),
        version=str(info.get("version", "")),
        binds=tuple(sorted(fixed.items(), key=lambda kv: kv[1])),
        symlinks=tuple(symlinks),
        hidden=hidden,
    )
