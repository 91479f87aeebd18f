"""Deploy the example functions at start-up (``make run``)."""

from __future__ import annotations

import asyncio
import io
import json
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from .store import Conflict, FunctionConfig
from .upload import UploadError, UploadLimits, bundle_from_zip

if TYPE_CHECKING:
    from .app import Gateway

log = structlog.get_logger("nsfaas.deploy")
SKIP = {"__pycache__", ".git", ".venv", "function.json"}


def zip_folder(folder: Path) -> bytes:
    """Zip a function folder (regular files only, no symlinks) for upload."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(folder.rglob("*")):
            rel = path.relative_to(folder)
            if any(part in SKIP or part.startswith(".") for part in rel.parts):
                continue
            if path.is_file() and not path.is_symlink():
                zf.write(path, rel.as_posix())
    return buf.getvalue()


def _read_examples(folder: Path) -> list[tuple[Path, dict[str, Any]]]:
    found = []
    for sub in sorted(p for p in folder.iterdir() if (p / "handler.py").is_file()):
        meta_file = sub / "function.json"
        found.append((sub, json.loads(meta_file.read_text()) if meta_file.exists() else {}))
    return found


async def deploy_examples(gw: Gateway, folder: Path) -> None:
    """Each sub-folder with a handler.py is a function; its optional
    function.json holds the options (routes, public, timeout_s, ...).
    Skipped when the deployed digest is already the active one."""
    tenant = gw.default_tenant.id
    for sub, meta in await asyncio.to_thread(_read_examples, folder):
        name = sub.name
        config = FunctionConfig(
            routes=tuple(meta.get("routes", [])),
            timeout_s=float(meta.get("timeout_s", gw.settings.default_timeout_s)),
            memory_mb=int(meta.get("memory_mb", gw.settings.default_memory_mb)),
            env=tuple(sorted(meta.get("env", {}).items())),
            public=bool(meta.get("public", True)),
            egress_allow=tuple(meta.get("egress_allow", [])),
            entrypoint=str(meta.get("entrypoint", "handler:handler")),
        )
        try:
            raw = await asyncio.to_thread(zip_folder, sub)
            bundle = await asyncio.to_thread(
                bundle_from_zip, raw, entrypoint=config.entrypoint, limits=UploadLimits()
            )
            blob = bundle.to_zip()
        except UploadError as exc:
            log.error("example_invalid", function=name, code=exc.code, error=exc.message)
            continue
        digest = await gw.store.put_blob(blob)
        owner = await gw.store.find_function(name)
        if owner is not None:
            if owner.tenant_id != tenant:
                log.warning("example_name_taken", function=name)
                continue
            current = await gw.store.get_version(tenant, name, None)
            if current.digest == digest and current.config == config:
                await gw.version_changed(current)  # unpacked (again, if its code dir went)
                continue
        try:
            unpacked = bundle.disk_bytes()
            fv, _ = await gw.store.put_function(
                tenant, name, digest, len(blob), config, unpacked=unpacked
            )
        except Conflict as exc:
            log.error("example_conflict", function=name, error=exc.message)
            continue
        log.info("example_deployed", function=name, version=fv.version)
        await gw.version_changed(fv)  # unpacked now, not at the first call
    await gw.routes_changed()
