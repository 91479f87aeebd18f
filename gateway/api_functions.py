"""Admin API: tenants, functions, versions, rollback."""

from __future__ import annotations

import asyncio
import base64
import binascii
import re
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .errors import ApiError
from .http import (
    Principal,
    client_gone,
    parse_json_object,
    query_bool,
    query_int,
    query_number,
    query_single,
    read_body,
    reject_unknown_query,
)
from .store import (
    Conflict,
    FunctionConfig,
    FunctionInfo,
    FunctionVersion,
    NotFound,
    UploadQuota,
    parse_route,
    route_shape,
)
from .upload import UploadError, UploadLimits

if TYPE_CHECKING:
    from .app import Gateway

# \Z, not $: "$" also matches before a final newline, which would let "name\n" through
# (app.py matches NAME_RE with .match()).
NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,62}\Z")
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}\Z")
# [0-9], not \d, which takes any script's digits; _egress_ok checks the port's range.
HOST_RE = re.compile(
    r"^(\*\.)?[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*"
    r"(:(?P<port>[0-9]{1,5}))?\Z"
)
MAX_ROUTES = 20
MAX_ENV = 64
MAX_ENV_BYTES = 16 * 1024
JSON_KEYS = {
    "source",
    "archive",
    "routes",
    "timeout_s",
    "memory_mb",
    "env",
    "public",
    "egress_allow",
    "entrypoint",
}
# Options of a raw-body upload, in the query string; the lists may repeat.
# Uploads of one tenant waiting to be checked (one at a time: each parses up to
# 50 MB of code); past it 429.
# A waiting upload holds its body (up to ~14 MB of base64 JSON) in the
# gateway's shared body budget: 16 of them held 225 of its 256 MiB, and other
# tenants' calls got 429.
MAX_UPLOADS_PER_TENANT = 4
# Shorter than a warm call's own overhead under load: every call would time out.
MIN_TIMEOUT_S = 0.1
QUERY_KEYS = {"timeout_s", "memory_mb", "public", "entrypoint", "routes", "egress_allow"}
ROLLBACK_KEYS = {"version"}
TENANT_KEYS = {"name"}


def check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise ApiError(
            400,
            "invalid_name",
            "function names match ^[a-z][a-z0-9-]{0,62}$ (lowercase, digits, dashes)",
        )
    return name


def version_json(fv: FunctionVersion) -> dict[str, Any]:
    return {
        "name": fv.name,
        "version": fv.version,
        "digest": fv.digest,
        "size": fv.size,
        "created_at": fv.created_at,
        **fv.config.to_json(),
    }


def info_json(info: FunctionInfo, fv: FunctionVersion) -> dict[str, Any]:
    return {
        "name": info.name,
        "tenant": info.tenant_id,
        "version": info.active_version,
        "latest_version": info.latest_version,
        "created_at": info.created_at,
        "updated_at": info.updated_at,
        "digest": fv.digest,
        **fv.config.to_json(),
    }


def _config(gw: Gateway, opts: dict[str, Any]) -> FunctionConfig:
    s = gw.settings
    routes = opts.get("routes", [])
    if not isinstance(routes, list) or not all(isinstance(r, str) for r in routes):
        raise ApiError(400, "invalid_routes", "routes must be a list of strings like 'GET /path'")
    if len(routes) > MAX_ROUTES:
        raise ApiError(400, "invalid_routes", f"at most {MAX_ROUTES} routes per function")
    routes = _check_routes(routes)
    timeout = opts.get("timeout_s", s.default_timeout_s)
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, int | float)
        or not (MIN_TIMEOUT_S <= timeout <= s.max_timeout_s)
    ):
        raise ApiError(
            400,
            "invalid_timeout",
            f"timeout_s must be a number in [{MIN_TIMEOUT_S:g}, {s.max_timeout_s:g}]",
        )
    memory = opts.get("memory_mb", s.default_memory_mb)
    if (
        isinstance(memory, bool)
        or not isinstance(memory, int)
        or not 32 <= memory <= s.max_memory_mb
    ):
        raise ApiError(
            400, "invalid_memory", f"memory_mb must be an integer in [32, {s.max_memory_mb}]"
        )
    env = opts.get("env", {})
    if not isinstance(env, dict) or len(env) > MAX_ENV:
        raise ApiError(400, "invalid_env", f"env must be an object of at most {MAX_ENV} strings")
    size = 0
    for k, v in env.items():
        if not ENV_NAME_RE.match(k) or not isinstance(v, str) or "\x00" in v:
            raise ApiError(
                400, "invalid_env", "env names match [A-Za-z_][A-Za-z0-9_]*, values are strings"
            )
        # Bytes, as the cap says and as the jail gets them: a character can be four.
        size += len(k.encode()) + len(v.encode("utf-8", "surrogatepass"))
    if size > MAX_ENV_BYTES:
        raise ApiError(400, "invalid_env", f"env exceeds {MAX_ENV_BYTES} bytes")
    public = opts.get("public", False)
    if not isinstance(public, bool):
        raise ApiError(400, "invalid_public", "public must be true or false")
    egress = opts.get("egress_allow", [])
    if not isinstance(egress, list) or len(egress) > 64 or not all(map(_egress_ok, egress)):
        raise ApiError(
            400,
            "invalid_egress_allow",
            "egress_allow is a list of ASCII host names, optionally with :port (1-65535) "
            "or a *. prefix",
        )
    entrypoint = opts.get("entrypoint") or "handler:handler"
    if not isinstance(entrypoint, str):
        raise ApiError(400, "bad_entrypoint", "entrypoint must be a string 'module:function'")
    return FunctionConfig(
        routes=tuple(routes),
        timeout_s=float(timeout),
        memory_mb=memory,
        env=tuple(sorted(env.items())),
        public=public,
        egress_allow=tuple(h.lower() for h in egress),
        entrypoint=entrypoint,
    )


def _check_routes(routes: list[str]) -> list[str]:
    """The routes as the gateway writes them ("GET /x"), each once."""
    canonical: list[str] = []
    shapes: dict[tuple[str, str], str] = {}
    for r in routes:
        try:
            method, path = parse_route(r)
        except ValueError as exc:
            raise ApiError(400, "invalid_routes", str(exc)) from None
        route = f"{method} {path}"
        twin = shapes.setdefault((method, route_shape(path)), route)
        if twin != route or route in canonical:
            # "GET /q/{a}" and "GET /q/{b}": the second could never match.
            raise ApiError(400, "invalid_routes", f"route {route!r} repeats {twin!r}")
        canonical.append(route)
    return canonical


def _egress_ok(entry: object) -> bool:
    # ASCII before lower(): "\u212a" (the Kelvin sign) lower-cases to an ASCII "k".
    if not isinstance(entry, str) or not entry.isascii():
        return False
    match = HOST_RE.match(entry.lower())
    return (
        match is not None
        and len(entry.split(":")[0].removeprefix("*.")) <= 253  # a DNS name's limit
        and (match["port"] is None or 1 <= int(match["port"]) <= 65535)
    )


def _query_opts(gw: Gateway, request: Request) -> dict[str, Any]:
    """Options for raw uploads come from the query string, with the codes, ranges and
    messages of the same options in a JSON body (`_config` then checks them again)."""
    s = gw.settings
    q = request.query_params
    hint = "; env is only accepted in a JSON body" if "env" in q else ""
    reject_unknown_query(q, QUERY_KEYS, hint=hint)
    opts: dict[str, Any] = {}
    timeout = query_number(q, "timeout_s", low=0, high=s.max_timeout_s, code="invalid_timeout")
    if timeout is not None:
        opts["timeout_s"] = timeout  # its lower bound: _config
    memory = query_int(q, "memory_mb", low=32, high=s.max_memory_mb, code="invalid_memory")
    if memory is not None:
        opts["memory_mb"] = memory
    public = query_bool(q, "public", code="invalid_public")
    if public is not None:
        opts["public"] = public
    entrypoint = query_single(q, "entrypoint", "bad_entrypoint")
    if entrypoint is not None:
        opts["entrypoint"] = entrypoint
    for listed in ("routes", "egress_allow"):
        if listed in q:
            opts[listed] = q.getlist(listed)
    return opts


def _b64(text: str) -> bytes:
    """Base64 as tools write it: wrapped lines (`base64` wraps at 76), missing
    padding and the URL-safe alphabet are fine; anything else is an error."""
    packed = "".join(text.split())
    packed = packed.replace("-", "+").replace("_", "/")
    return base64.b64decode(packed + "=" * (-len(packed) % 4), validate=True)


async def read_small_body(gw: Gateway, request: Request) -> bytes:
    """A body of at most 4 KiB (rollback, tenants), counted in the gateway's
    body budget while it arrives."""
    body = await read_body(request, 4096, gw.bodies, gw.settings.body_timeout_s)
    gw.bodies.release(len(body))
    return body


async def put_function(gw: Gateway, request: Request) -> Response:
    who = await gw.auth(request)
    name = check_name(request.path_params["name"])
    s = gw.settings
    # base64 grows the archive by 4/3: allow for it on JSON bodies. Held in the
    # gateway's body budget while read and used: 40 slow 13 MB uploads held
    # 600 MB before they counted.
    cap = s.max_upload_bytes * 4 // 3 + 65536
    body = await read_body(request, cap, gw.bodies, timeout_s=s.body_timeout_s)
    try:
        return await _put_function(gw, request, who, name, body)
    finally:
        gw.bodies.release(len(body))


async def _put_function(
    gw: Gateway, request: Request, who: Principal, name: str, body: bytes
) -> Response:
    s = gw.settings
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    limits = UploadLimits(max_archive_bytes=s.max_upload_bytes)
    source: bytes | None = None
    archive: bytes | None = None
    if ctype in ("text/x-python", "text/plain", "text/x-script.python"):
        opts, source = _query_opts(gw, request), body
    elif ctype in ("application/zip", "application/x-zip-compressed"):
        opts, archive = _query_opts(gw, request), body
    elif ctype in ("application/json", ""):
        data = parse_json_object(body, JSON_KEYS)
        opts = data
        if ("source" in data) == ("archive" in data):
            raise ApiError(400, "missing_code", "give exactly one of 'source' or 'archive'")
        if "source" in data:
            if not isinstance(data["source"], str):
                raise ApiError(400, "missing_code", "'source' must be a string")
            source = data["source"].encode("utf-8", "surrogatepass")
        else:
            if not isinstance(data["archive"], str):
                raise ApiError(400, "missing_code", "'archive' must be a base64 string")
            try:
                archive = _b64(data["archive"])
            except (binascii.Error, ValueError):
                raise ApiError(400, "bad_zip", "'archive' is not valid base64") from None
    else:
        raise ApiError(
            415, "unsupported_media_type", "send application/json, text/x-python or application/zip"
        )
    config = _config(gw, opts)
    if source is not None and len(source) > limits.max_source_bytes:
        raise ApiError(413, "too_large", f"source exceeds {limits.max_source_bytes} bytes")
    if archive is not None and len(archive) > limits.max_archive_bytes:
        raise ApiError(413, "too_large", f"archive exceeds {limits.max_archive_bytes} bytes")
    lock, waiting = gw.tenant_uploads.get(who.tenant_id) or (asyncio.Lock(), 0)
    if waiting >= MAX_UPLOADS_PER_TENANT:
        raise ApiError(
            429,
            "too_many_uploads",
            f"at most {MAX_UPLOADS_PER_TENANT} uploads of a tenant are checked or wait at once",
            headers={"Retry-After": "1"},
        )
    gw.tenant_uploads[who.tenant_id] = (lock, waiting + 1)
    try:
        gone = asyncio.ensure_future(client_gone(request.receive))
        try:
            async with lock:
                await asyncio.sleep(0)  # a disconnect already read is seen now
                if gone.done():
                    # Its turn came after its client left: a check (up to the
                    # time limit) nobody waits for would hold a checker.
                    raise ApiError(499, "client_gone", "the client went away before the check")
                blob, unpacked = await _check_code(
                    gw, source, archive, config.entrypoint, limits
                )
        finally:
            gone.cancel()
    finally:
        lock, waiting = gw.tenant_uploads[who.tenant_id]
        if waiting > 1:
            gw.tenant_uploads[who.tenant_id] = (lock, waiting - 1)
        else:
            del gw.tenant_uploads[who.tenant_id]
    owner = await gw.store.find_function(name)
    if owner is not None and owner.tenant_id != who.tenant_id:
        raise ApiError(409, "name_taken", f"the function name {name!r} is taken")
    # Every version is kept, so uploads are what could fill the disk: the store
    # checks these in the version's own write (concurrent uploads cannot overshoot)
    # and drops the blob of an upload it refuses.
    quota = UploadQuota(
        s.max_functions_per_tenant, s.max_versions_per_function, s.tenant_code_bytes
    )
    for attempt in range(2):
        digest = await gw.store.put_blob(blob)
        try:
            fv, created = await gw.store.put_function(
                who.tenant_id, name, digest, len(blob), config, unpacked=unpacked, quota=quota
            )
            break
        except Conflict as exc:
            raise ApiError(409, exc.code, exc.message) from None
        except NotFound as exc:
            # The same code's last other version was deleted meanwhile and its
            # blob collected between our write and our version: write it again.
            if attempt or exc.code != "blob_not_found":
                raise
    else:  # pragma: no cover (the loop breaks or raises)
        raise AssertionError
    await gw.routes_changed()
    await gw.version_changed(fv)
    return JSONResponse(version_json(fv), status_code=201 if created else 200)


async def _check_code(
    gw: Gateway, source: bytes | None, archive: bytes | None, entrypoint: str,
    limits: UploadLimits,
) -> tuple[bytes, int]:
    """The zip the store keeps and its unpacked size on disk; ApiError if refused."""
    try:
        return await gw.checker.check(source, archive, entrypoint, limits)
    except UploadError as exc:
        status = 413 if exc.code in _TOO_BIG else 400
        raise ApiError(status, exc.code, exc.message, detail=exc.detail) from None


_TOO_BIG = frozenset({"too_large", "too_many_files", "zip_bomb", "too_complex"})


async def _own(gw: Gateway, request: Request) -> tuple[str, str]:
    who = await gw.auth(request)
    name = check_name(request.path_params["name"])
    tenant = who.tenant_id
    if who.admin:
        info = await gw.store.find_function(name)
        if info is not None:
            tenant = info.tenant_id
    return tenant, name


async def get_function(gw: Gateway, request: Request) -> Response:
    tenant, name = await _own(gw, request)
    try:
        info = await gw.store.get_function(tenant, name)
        fv = await gw.store.get_version(tenant, name, None)
    except NotFound:
        raise ApiError(404, "function_not_found", f"no function named {name!r}") from None
    return JSONResponse(info_json(info, fv))


async def list_functions(gw: Gateway, request: Request) -> Response:
    who = await gw.auth(request)
    items = []
    for info in await gw.store.list_functions(who.scope()):
        fv = await gw.store.get_version(info.tenant_id, info.name, None)
        items.append(info_json(info, fv))
    usage = {
        "code_bytes": await gw.store.code_usage(who.tenant_id),
        "code_bytes_limit": gw.settings.tenant_code_bytes or None,
    }
    return JSONResponse({"functions": items, "usage": usage})


async def delete_function(gw: Gateway, request: Request) -> Response:
    tenant, name = await _own(gw, request)
    try:
        used = [v.digest for v in await gw.store.list_versions(tenant, name)]
        await gw.store.delete_function(tenant, name)  # and the blobs no version uses
    except NotFound:
        raise ApiError(404, "function_not_found", f"no function named {name!r}") from None
    await gw.routes_changed()
    if gw.pool is not None:
        gw.pool.forget(f"{tenant}/{name}")
    if gw.invoker is not None:
        gw.invoker.forget_code(tenant, used)  # the tenant's copies it no longer uses
    return Response(status_code=204)


async def list_versions(gw: Gateway, request: Request) -> Response:
    tenant, name = await _own(gw, request)
    try:
        info = await gw.store.get_function(tenant, name)
        versions = await gw.store.list_versions(tenant, name)
    except NotFound:
        raise ApiError(404, "function_not_found", f"no function named {name!r}") from None
    return JSONResponse(
        {"active_version": info.active_version, "versions": [version_json(v) for v in versions]}
    )


async def rollback(gw: Gateway, request: Request) -> Response:
    tenant, name = await _own(gw, request)
    # Whatever the framing: a chunked body has no Content-Length, and was ignored.
    body = await read_small_body(gw, request)
    data = parse_json_object(body, ROLLBACK_KEYS) if body else {}
    version = data.get("version")
    in_query = query_int(
        request.query_params, "version", low=1, high=2**31 - 1, code="invalid_version"
    )
    if version is None:
        version = in_query
    elif in_query is not None and in_query != version:
        raise ApiError(
            400, "invalid_version", f"version {in_query} in the query, {version!r} in the body"
        )
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= 2**31 - 1:
        raise ApiError(400, "invalid_version", 'give the version to roll back to: {"version": N}')
    try:
        await gw.store.get_function(tenant, name)
    except NotFound:
        raise ApiError(404, "function_not_found", f"no function named {name!r}") from None
    try:
        target = await gw.store.get_version(tenant, name, version)
        # A version stored before a route rule (gateway/store.py parse_route)
        # existed must not bring back what the rule now refuses.
        _check_routes(list(target.config.routes))
        fv = await gw.store.rollback(tenant, name, version)
    except NotFound:
        raise ApiError(404, "version_not_found", f"{name!r} has no version {version}") from None
    except Conflict as exc:
        raise ApiError(409, exc.code, exc.message) from None
    await gw.routes_changed()
    await gw.version_changed(fv)
    return JSONResponse(version_json(fv))


async def create_tenant(gw: Gateway, request: Request) -> Response:
    who = await gw.auth(request)
    if not who.admin:
        raise ApiError(403, "forbidden", "only the admin key can create tenants")
    data = parse_json_object(
        await read_small_body(gw, request), TENANT_KEYS
    )
    name = data.get("name")
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ApiError(400, "invalid_name", "tenant name must match ^[a-z][a-z0-9-]{0,62}$")
    try:
        tenant, key = await gw.store.create_tenant(name)
    except Conflict as exc:
        raise ApiError(409, exc.code, exc.message) from None
    return JSONResponse(
        {"id": tenant.id, "name": tenant.name, "key": key, "created_at": tenant.created_at},
        status_code=201,
    )


async def list_tenants(gw: Gateway, request: Request) -> Response:
    who = await gw.auth(request)
    if not who.admin:
        raise ApiError(403, "forbidden", "only the admin key can list tenants")
    return JSONResponse(
        {
            "tenants": [
                {"id": t.id, "name": t.name, "created_at": t.created_at}
                for t in await gw.store.list_tenants()
            ]
        }
    )
