"""Bad input to the management API is a 4xx with a stable code, never a 500, and
leaves nothing behind: cursors, time filters, numbers, booleans and enums in query
strings; lone surrogates and NaN in JSON bodies; options of raw-body uploads."""

from __future__ import annotations

import base64
import io
import zipfile

import httpx
import pytest

from .conftest import Api

SRC = "def handler(request, ctx):\n    print('hello')\n    return 'ok'\n"
LOUD = (
    "def handler(request, ctx):\n"
    "    for i in range(1500):\n"
    "        print(f'line {i}')\n"
    "    return 'ok'\n"
)
LISTINGS = ("/api/v1/functions/res/logs", "/api/v1/invocations")


def cursor(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def assert_error(r: httpx.Response, status: int, code: str) -> str:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    error = r.json()["error"]
    assert error["code"] == code, r.text
    assert isinstance(error["message"], str) and error["message"]
    return str(error["message"])


async def deploy_with_logs(api: Api) -> None:
    """A function that has logged and been invoked: the listings then reach the store."""
    await api.deploy("res", SRC, public=True)
    assert (await api.client.get("/fn/res")).status_code == 200


async def function_names(api: Api) -> list[str]:
    r = await api.client.get("/api/v1/functions", headers=api.auth())
    assert r.status_code == 200, r.text
    return [f["name"] for f in r.json()["functions"]]


# --- query strings of the listings -------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b"[1.5,99999999999999999999999]",  # past int64: sqlite's OverflowError
        b"[1.5,-1]",
        b"[1e999,1]",  # json reads it as inf
        b"[NaN,1]",
        b"[-Infinity,1]",
        b"[1" + b"0" * 400 + b",1]",  # an int past float's range
        b'[1.5,"\\ud800"]',  # a lone surrogate cannot be bound as UTF-8
        b'[1.5,"' + b"a" * 300 + b'"]',
    ],
)
async def test_out_of_range_cursor_is_invalid_cursor_on_every_listing(api: Api, raw: bytes) -> None:
    await deploy_with_logs(api)
    for path in LISTINGS:
        r = await api.client.get(path, params={"cursor": cursor(raw)}, headers=api.auth())
        assert_error(r, 400, "invalid_cursor")


async def test_cursors_the_api_returns_still_page(api: Api) -> None:
    await deploy_with_logs(api)
    await api.client.get("/fn/res")
    for path in LISTINGS:
        r = await api.client.get(path, params={"limit": "1"}, headers=api.auth())
        assert r.status_code == 200, r.text
        r = await api.client.get(
            path, params={"limit": "1", "cursor": r.json()["cursor"]}, headers=api.auth()
        )
        assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    ("param", "value"),
    [
        ("since", "1e400"),
        ("since", "inf"),
        ("since", "-Infinity"),
        ("until", "nan"),
        ("until", "NaN"),
        ("since", "\u0661\u0662"),  # Arabic-Indic digits, which float() reads as 12
        ("since", "1_000"),
        ("since", " 12"),
        ("since", "9" * 400 + "d"),
        ("since", "10\u0661m"),
    ],
)
async def test_non_finite_or_odd_times_are_invalid_time(api: Api, param: str, value: str) -> None:
    await deploy_with_logs(api)
    for path in LISTINGS:
        r = await api.client.get(path, params={param: value}, headers=api.auth())
        assert_error(r, 400, "invalid_time")


async def test_valid_times_still_filter(api: Api) -> None:
    await deploy_with_logs(api)
    for path in LISTINGS:
        for value in ("10m", "1.5h", "1700000000", "1.7e9", "2026-01-01T00:00:00Z"):
            r = await api.client.get(path, params={"since": value}, headers=api.auth())
            assert r.status_code == 200, (path, value, r.text)
        r = await api.client.get(path, params={"since": "1e12"}, headers=api.auth())
        assert r.status_code == 200 and r.json()["cursor"] is None


@pytest.mark.parametrize("value", ["\u0668", "\u00b2", "1_0", "+5", "5.0", "0", "1001", ""])
async def test_limit_takes_ascii_integers_in_range(api: Api, value: str) -> None:
    await deploy_with_logs(api)
    for path in LISTINGS:
        r = await api.client.get(path, params={"limit": value}, headers=api.auth())
        assert_error(r, 400, "invalid_limit")


async def test_a_single_valued_parameter_given_twice_is_rejected(api: Api) -> None:
    await deploy_with_logs(api)
    for path in LISTINGS:
        for param, code in (("limit", "invalid_limit"), ("since", "invalid_time")):
            r = await api.client.get(f"{path}?{param}=5&{param}=6", headers=api.auth())
            assert_error(r, 400, code)


async def test_outcome_filter_takes_known_outcomes_only(api: Api) -> None:
    await deploy_with_logs(api)
    for value in ("bogus", "OK", ""):
        r = await api.client.get(
            "/api/v1/invocations", params={"outcome": value}, headers=api.auth()
        )
        message = assert_error(r, 400, "invalid_outcome")
        assert "timeout" in message  # names the values that are accepted
    for value in ("ok", "running", "error", "rejected", "jail_failure"):
        r = await api.client.get(
            "/api/v1/invocations", params={"outcome": value}, headers=api.auth()
        )
        assert r.status_code == 200, r.text
    r = await api.client.get("/api/v1/invocations?outcome=ok", headers=api.auth())
    assert [x["function"] for x in r.json()["invocations"]] == ["res"]


async def test_log_level_and_follow_reject_unknown_values(api: Api) -> None:
    await deploy_with_logs(api)
    path = "/api/v1/functions/res/logs"
    assert_error(
        await api.client.get(path, params={"follow": "maybe"}, headers=api.auth()),
        400,
        "invalid_follow",
    )
    assert_error(
        await api.client.get(path, params={"level": "loud"}, headers=api.auth()),
        400,
        "invalid_level",
    )
    r = await api.client.get(path, params={"follow": "0", "level": "info"}, headers=api.auth())
    assert r.status_code == 200 and [x["message"] for x in r.json()["logs"]] == ["hello"]


# --- invocation detail --------------------------------------------------------------------


async def test_invocation_detail_shows_the_last_1000_log_lines_oldest_first(api: Api) -> None:
    # The end of a log explains the outcome (a traceback, the truncation line), so the
    # record keeps it; README says so, and where the earlier lines are.
    await api.deploy("loud", LOUD, public=True)
    r = await api.client.get("/fn/loud")
    assert r.status_code == 200, r.text
    inv = r.headers["x-invocation-id"]
    r = await api.client.get(f"/api/v1/invocations/{inv}", headers=api.auth())
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["log_lines"] == 1500 > len(body["logs"])  # how a caller sees the cut
    assert [x["message"] for x in body["logs"]] == [f"line {i}" for i in range(500, 1500)]
    url, params = "/api/v1/functions/loud/logs", {"invocation": inv, "limit": "1000"}
    page = (await api.client.get(url, params=params, headers=api.auth())).json()
    rest = await api.client.get(
        url, params={**params, "cursor": page["cursor"]}, headers=api.auth()
    )
    assert [x["message"] for x in rest.json()["logs"]] == [f"line {i}" for i in range(499, -1, -1)]


# --- JSON bodies ----------------------------------------------------------------------------

LONE = "\\ud800"  # as it travels: a JSON escape, valid JSON, but no UTF-8 string
UPLOADS = [
    '{"source": "x = 1\\n' + LONE + '"}',
    '{"source": "def handler(r, c): pass", "env": {"A": "' + LONE + '"}}',
    '{"source": "def handler(r, c): pass", "env": {"A' + LONE + '": "x"}}',
    '{"source": "def handler(r, c): pass", "entrypoint": "h' + LONE + ':x"}',
    '{"source": "def handler(r, c): pass", "routes": ["GET /a' + LONE + '"]}',
    '{"source": "def handler(r, c): pass", "egress_allow": ["a' + LONE + '.com"]}',
    '{"archive": "' + LONE + '"}',
    '{"source": "def handler(r, c): pass", "x' + LONE + '": 1}',
    '{"source": "def handler(r, c): pass", "timeout_s": NaN}',
    '{"source": "def handler(r, c): pass", "memory_mb": Infinity}',
]


@pytest.mark.parametrize("body", UPLOADS)
async def test_upload_body_with_a_lone_surrogate_or_nan_is_invalid_json(
    api: Api, body: str
) -> None:
    before = await function_names(api)
    r = await api.client.put(
        "/api/v1/functions/sur",
        content=body.encode(),
        headers={**api.auth(), "content-type": "application/json"},
    )
    assert_error(r, 400, "invalid_json")
    assert await function_names(api) == before  # nothing was stored


async def test_every_json_endpoint_rejects_a_lone_surrogate(api: Api) -> None:
    await api.deploy("res", SRC)
    await api.deploy("res", SRC + "\n")
    json_headers = {**api.auth(), "content-type": "application/json"}
    tenants = (await api.client.get("/api/v1/tenants", headers=api.auth())).json()
    for body in ('{"name": "a' + LONE + '"}', '{"name": "ok", "x' + LONE + '": 1}'):
        r = await api.client.post("/api/v1/tenants", content=body.encode(), headers=json_headers)
        assert_error(r, 400, "invalid_json")
    assert (await api.client.get("/api/v1/tenants", headers=api.auth())).json() == tenants
    for body in ('{"version": 1, "x' + LONE + '": 1}', '{"version": "' + LONE + '"}'):
        r = await api.client.post(
            "/api/v1/functions/res/rollback", content=body.encode(), headers=json_headers
        )
        assert_error(r, 400, "invalid_json")
    r = await api.client.get("/api/v1/functions/res", headers=api.auth())
    assert r.json()["version"] == 2  # no rollback happened
    # KV values are stored verbatim as bytes (the KV API decides what it accepts); whatever
    # it answers, a lone surrogate must not crash it.
    r = await api.client.put(
        "/api/v1/kv/k", content=('"' + LONE + '"').encode(), headers=json_headers
    )
    assert r.status_code < 500, r.text
    # Listings that echo stored text still render.
    assert (await api.client.get("/api/v1/functions", headers=api.auth())).status_code == 200


# --- tenants and rollback: unknown fields, names ------------------------------------------


async def test_tenant_body_is_checked_like_an_upload_body(api: Api) -> None:
    tenants = (await api.client.get("/api/v1/tenants", headers=api.auth())).json()
    r = await api.client.post(
        "/api/v1/tenants", json={"name": "acme", "plan": "gold"}, headers=api.auth()
    )
    assert "plan" in assert_error(r, 400, "unknown_field")
    r = await api.client.post("/api/v1/tenants", json=["acme"], headers=api.auth())
    assert_error(r, 400, "invalid_json")
    r = await api.client.post("/api/v1/tenants", json={"name": "acme\n"}, headers=api.auth())
    assert_error(r, 400, "invalid_name")
    assert (await api.client.get("/api/v1/tenants", headers=api.auth())).json() == tenants
    r = await api.client.post("/api/v1/tenants", json={"name": "acme"}, headers=api.auth())
    assert r.status_code == 201, r.text


async def test_function_name_with_a_trailing_newline_is_invalid(api: Api) -> None:
    r = await api.client.put("/api/v1/functions/abc%0A", json={"source": SRC}, headers=api.auth())
    assert_error(r, 400, "invalid_name")
    assert await function_names(api) == []


async def test_rollback_rejects_unknown_fields_and_bad_versions(api: Api) -> None:
    await api.deploy("res", SRC)
    await api.deploy("res", SRC + "\n")
    url = "/api/v1/functions/res/rollback"
    r = await api.client.post(url, json={"version": 1, "force": True}, headers=api.auth())
    assert_error(r, 400, "unknown_field")
    for query in ("version=%D9%A1", "version=1&version=1", "version=0"):
        r = await api.client.post(f"{url}?{query}", headers=api.auth())
        assert_error(r, 400, "invalid_version")
    r = await api.client.get("/api/v1/functions/res", headers=api.auth())
    assert r.json()["version"] == 2
    r = await api.client.post(f"{url}?version=1", headers=api.auth())
    assert r.status_code == 200 and r.json()["version"] == 1


# --- egress_allow ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "entry",
    [
        "a.com:0",
        "a.com:65536",
        "a.com:99999",
        "a.com:\u0668\u0660",  # Arabic-Indic 80
        "a.com:\uff18\uff10",  # full-width 80
        "a.com\n",
        "\u212a.com",  # the Kelvin sign lower-cases to an ASCII k
        "a.com:",
    ],
)
async def test_egress_allow_takes_ascii_hosts_and_ports_1_to_65535(api: Api, entry: str) -> None:
    r = await api.client.put(
        "/api/v1/functions/eg", json={"source": SRC, "egress_allow": [entry]}, headers=api.auth()
    )
    assert_error(r, 400, "invalid_egress_allow")
    r = await api.client.put(
        "/api/v1/functions/eg",
        params={"egress_allow": entry},
        content=SRC.encode(),
        headers={**api.auth(), "content-type": "text/x-python"},
    )
    assert_error(r, 400, "invalid_egress_allow")
    assert await function_names(api) == []


async def test_egress_allow_edge_ports_are_accepted(api: Api) -> None:
    hosts = ["a.com:1", "b.com:65535", "*.C.com", "d.com:080"]
    r = await api.deploy("eg", SRC, egress_allow=hosts)
    assert r.json()["egress_allow"] == ["a.com:1", "b.com:65535", "*.c.com", "d.com:080"]


# --- raw-body uploads -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "code"),
    [
        ("bogus=1", "unknown_field"),
        ("env=A%3D1", "unknown_field"),
        ("source=x", "unknown_field"),
        ("public=maybe", "invalid_public"),
        ("public=", "invalid_public"),
        ("public=true&public=false", "invalid_public"),
        ("timeout_s=abc", "invalid_timeout"),
        ("timeout_s=nan", "invalid_timeout"),
        ("timeout_s=inf", "invalid_timeout"),
        ("timeout_s=1e400", "invalid_timeout"),
        ("timeout_s=1_0", "invalid_timeout"),
        ("timeout_s=%D9%A1", "invalid_timeout"),
        ("timeout_s=1&timeout_s=2", "invalid_timeout"),
        ("memory_mb=%D9%A8%D9%A0", "invalid_memory"),
        ("memory_mb=128.0", "invalid_memory"),
        ("memory_mb=99999999999999999999999", "invalid_memory"),
        ("entrypoint=a:b&entrypoint=c:d", "bad_entrypoint"),
    ],
)
async def test_raw_upload_query_is_checked_like_a_json_body(
    api: Api, query: str, code: str
) -> None:
    for ctype, content in (("text/x-python", SRC.encode()), ("application/zip", zipped(SRC))):
        r = await api.client.put(
            f"/api/v1/functions/raw?{query}",
            content=content,
            headers={**api.auth(), "content-type": ctype},
        )
        message = assert_error(r, 400, code)
        if query.startswith("env="):
            assert "JSON" in message
    assert await function_names(api) == []


@pytest.mark.parametrize(("value", "public"), [("1", True), ("Yes", True), ("off", False)])
async def test_raw_upload_booleans_take_the_settings_spellings(
    api: Api, value: str, public: bool
) -> None:
    r = await api.client.put(
        f"/api/v1/functions/raw?public={value}&timeout_s=2.5&memory_mb=64",
        content=SRC.encode(),
        headers={**api.auth(), "content-type": "text/x-python"},
    )
    assert r.status_code == 201, r.text
    body = r.json()
    assert (body["public"], body["timeout_s"], body["memory_mb"]) == (public, 2.5, 64)


# --- archives -------------------------------------------------------------------------------


def zipped(source: str | None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        if source is not None:
            zf.writestr("handler.py", source)
    return buf.getvalue()


async def test_empty_zip_is_bad_zip_with_a_human_message(api: Api) -> None:
    empty = zipped(None)
    r = await api.client.put(
        "/api/v1/functions/ez",
        content=empty,
        headers={**api.auth(), "content-type": "application/zip"},
    )
    assert assert_error(r, 400, "bad_zip") == "the zip archive is empty"
    r = await api.client.put(
        "/api/v1/functions/ez",
        json={"archive": base64.b64encode(empty).decode()},
        headers=api.auth(),
    )
    assert assert_error(r, 400, "bad_zip") == "the zip archive is empty"
    assert await function_names(api) == []
