"""The OpenAPI 3.1 document of the admin API (tests validate real responses against it)."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

NUM = {"type": "number"}
INT = {"type": "integer"}
STR = {"type": "string"}
BOOL = {"type": "boolean"}
NSTR = {"type": ["string", "null"]}
NNUM = {"type": ["number", "null"]}
NINT = {"type": ["integer", "null"]}


def _obj(props: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    return {"type": "object", "properties": props, "required": required or list(props)}


CONFIG = {
    "routes": {"type": "array", "items": STR},
    "timeout_s": NUM,
    "memory_mb": INT,
    "env": {"type": "object", "additionalProperties": STR},
    "public": BOOL,
    "egress_allow": {"type": "array", "items": STR},
    "entrypoint": STR,
}
SCHEMAS: dict[str, Any] = {
    "Error": _obj(
        {"error": _obj({"code": STR, "message": STR, "invocation_id": NSTR}, ["code", "message"])}
    ),
    "Version": _obj(
        {"name": STR, "version": INT, "digest": STR, "size": INT, "created_at": NUM, **CONFIG}
    ),
    "Function": _obj(
        {
            "name": STR,
            "tenant": STR,
            "version": INT,
            "latest_version": INT,
            "created_at": NUM,
            "updated_at": NUM,
            "digest": STR,
            **CONFIG,
        }
    ),
    "FunctionList": _obj(
        {
            "functions": {"type": "array", "items": {"$ref": "#/components/schemas/Function"}},
            "usage": _obj({"code_bytes": INT, "code_bytes_limit": NINT}),
        }
    ),
    "VersionList": _obj(
        {
            "active_version": INT,
            "versions": {"type": "array", "items": {"$ref": "#/components/schemas/Version"}},
        }
    ),
    "Upload": {
        "type": "object",
        "properties": {
            "source": STR,
            "archive": {"type": "string", "contentEncoding": "base64"},
            **CONFIG,
        },
        "additionalProperties": False,
    },
    "Tenant": _obj({"id": STR, "name": STR, "created_at": NUM}),
    "NewTenant": _obj({"id": STR, "name": STR, "key": STR, "created_at": NUM}),
    "TenantList": _obj(
        {"tenants": {"type": "array", "items": {"$ref": "#/components/schemas/Tenant"}}}
    ),
    "Invocation": _obj(
        {
            "id": STR,
            "tenant": STR,
            "function": STR,
            "version": INT,
            "trigger": STR,
            "method": STR,
            "path": STR,
            "status": NINT,
            "outcome": STR,
            "started_at": NUM,
            "wall_ms": NNUM,
            "cpu_ms": NNUM,
            "peak_memory_mb": NNUM,
            "start": NSTR,
            "timeout_s": NUM,
            "memory_mb": INT,
            "request_bytes": INT,
            "response_bytes": NINT,
            "log_lines": INT,
            "logs_truncated": BOOL,
            "error_type": NSTR,
            "error_message": NSTR,
            "limit_name": NSTR,
            "limit_value": NNUM,
        }
    ),
    "LogLine": _obj(
        {
            "id": INT,
            "ts": NUM,
            "invocation_id": NSTR,
            "function": STR,
            "level": STR,
            "message": STR,
            "fields": {"type": "object"},
        }
    ),
    "InvocationList": _obj(
        {
            "invocations": {"type": "array", "items": {"$ref": "#/components/schemas/Invocation"}},
            "cursor": NSTR,
        }
    ),
    "LogList": _obj(
        {
            "logs": {"type": "array", "items": {"$ref": "#/components/schemas/LogLine"}},
            "cursor": NSTR,
        }
    ),
}


def _ref(name: str) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}}}


def _resp(
    ok: str, code: str = "200", errors: tuple[str, ...] = ("400", "401", "404")
) -> dict[str, Any]:
    out: dict[str, Any] = {code: {"description": "success", **_ref(ok)}}
    for e in errors:
        out[e] = {"description": "error", **_ref("Error")}
    return out


NAME = {
    "name": "name",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": "^[a-z][a-z0-9-]{0,62}$"},
}


def Q(name: str, kind: str = "string") -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": {"type": kind}}


DOCUMENT: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "nsfaas admin API", "version": "1"},
    "components": {
        "schemas": SCHEMAS,
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
    },
    "security": [{"bearer": []}],
    "paths": {
        "/api/v1/tenants": {
            "post": {
                "summary": "Create a tenant (admin); the key is shown once",
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _obj({"name": STR})}},
                },
                "responses": _resp("NewTenant", "201", ("400", "401", "403", "408", "409", "413")),
            },
            "get": {
                "summary": "List tenants (admin)",
                "responses": _resp("TenantList", errors=("401", "403")),
            },
        },
        "/api/v1/functions": {
            "get": {
                "summary": "List functions",
                "responses": _resp("FunctionList", errors=("401",)),
            },
        },
        "/api/v1/functions/{name}": {
            "parameters": [NAME],
            "put": {
                "summary": "Deploy a new version",
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/Upload"}},
                        "text/x-python": {"schema": STR},
                        "application/zip": {"schema": {"type": "string", "format": "binary"}},
                    },
                },
                "responses": {
                    **_resp("Version", "201", ("400", "401", "408", "409", "413", "415")),
                    "200": {"description": "new version", **_ref("Version")},
                },
            },
            "get": {"summary": "Show a function", "responses": _resp("Function")},
            "delete": {
                "summary": "Delete a function and its versions",
                "responses": {
                    "204": {"description": "deleted"},
                    "400": {"description": "error", **_ref("Error")},
                    "401": {"description": "error", **_ref("Error")},
                    "404": {"description": "error", **_ref("Error")},
                },
            },
        },
        "/api/v1/functions/{name}/versions": {
            "parameters": [NAME],
            "get": {"summary": "List versions", "responses": _resp("VersionList")},
        },
        "/api/v1/functions/{name}/rollback": {
            "parameters": [NAME],
            "post": {
                "summary": "Make an earlier version active",
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _obj({"version": INT})}},
                },
                "responses": _resp("Version", errors=("400", "401", "404", "408", "409", "413")),
            },
        },
        "/api/v1/functions/{name}/logs": {
            "parameters": [
                NAME,
                Q("since"),
                Q("until"),
                Q("level"),
                Q("q"),
                Q("invocation"),
                Q("limit", "integer"),
                Q("cursor"),
                Q("follow"),
            ],
            "get": {
                "summary": "Query log lines (newest first); follow=1 streams SSE",
                "responses": _resp("LogList"),
            },
        },
        "/api/v1/invocations": {
            "parameters": [
                Q("function"),
                Q("outcome"),
                Q("since"),
                Q("until"),
                Q("limit", "integer"),
                Q("cursor"),
            ],
            "get": {
                "summary": "List invocation records (newest first)",
                "responses": _resp("InvocationList", errors=("400", "401")),
            },
        },
        "/api/v1/invocations/{id}": {
            "parameters": [{"name": "id", "in": "path", "required": True, "schema": STR}],
            "get": {
                "summary": "One invocation record with its log lines",
                "responses": _resp("Invocation", errors=("401", "404")),
            },
        },
    },
}


async def endpoint(request: Request) -> Response:
    return JSONResponse(DOCUMENT)
