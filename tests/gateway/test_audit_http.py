"""Audit findings: egress cookies shared across tenants, a response header
name ending in a newline, declared routes and "$", handlers the upload check
misjudged, and routes that claim every tenant's paths."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from gateway.routes_table import RouteTable
from gateway.store import RouteEntry

from .conftest import Api, QuietHandler, serve_http, zip_b64

# --- ctx.http.fetch keeps no cookies ---------------------------------------------------


class _CookieUpstream(QuietHandler):
    """/login sets a cookie, /login-then-echo sets one and redirects to /echo;
    every other path answers with the Cookie header it received."""

    def do_GET(self) -> None:
        if self.path == "/elsewhere":  # the same server under another origin
            self.send_response(302)
            self.send_header("Location", f"http://127.0.0.2:{self.server.server_address[1]}/echo")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if self.path in ("/login", "/login-then-echo"):
            self.send_response(302 if self.path == "/login-then-echo" else 200)
            self.send_header("Set-Cookie", "session=TENANT_A_SECRET; Path=/")
            self.send_header("Location", "/echo")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_body((self.headers.get("Cookie") or "no cookie").encode())


@pytest.fixture
def cookie_upstream() -> Iterator[int]:
    # 0.0.0.0: /elsewhere redirects to 127.0.0.2, a second origin on this server.
    with serve_http(_CookieUpstream, "0.0.0.0") as port:
        yield port


FETCH = """
def handler(request, ctx):
    headers = {"Cookie": request.query["cookie"]} if "cookie" in request.query else None
    r = ctx.http.fetch("GET", request.query["url"], headers=headers, timeout=5)
    return r.body.decode() or "status %d" % r.status
"""


async def test_a_cookie_one_fetch_received_goes_out_on_no_other(
    api: Api, cookie_upstream: int
) -> None:
    """httpx's client keeps a cookie jar for its lifetime, and the gateway
    has one client for every tenant: tenant A's session went out on tenant
    B's fetches to the same host."""
    base = f"http://127.0.0.1:{cookie_upstream}"
    allow = [f"127.0.0.1:{cookie_upstream}", f"127.0.0.2:{cookie_upstream}"]
    key_a, key_b = await api.tenant("ck-a"), await api.tenant("ck-b")
    await api.deploy("cka", FETCH, key=key_a, egress_allow=allow)
    await api.deploy("ckb", FETCH, key=key_b, egress_allow=allow)

    async def fetch(fn: str, key: str, path: str, **params: str) -> str:
        r = await api.client.get(
            f"/fn/{fn}", params={"url": base + path, **params}, headers=api.auth(key)
        )
        assert r.status_code == 200, r.text
        return r.text

    assert await fetch("cka", key_a, "/login") == "status 200"
    assert await fetch("ckb", key_b, "/echo") == "no cookie"  # another tenant
    assert await fetch("cka", key_a, "/echo") == "no cookie"  # the same function, later
    # A redirect hop does not carry what the hop before it set either.
    assert await fetch("cka", key_a, "/login-then-echo") == "no cookie"
    assert await fetch("ckb", key_b, "/echo") == "no cookie"
    # What a function passes itself is sent as it is, on a redirect to the
    # same origin too, but not to another one (as browsers and httpx do).
    assert await fetch("ckb", key_b, "/echo", cookie="mine=1") == "mine=1"
    assert await fetch("ckb", key_b, "/login-then-echo", cookie="mine=1") == "mine=1"
    assert await fetch("ckb", key_b, "/elsewhere", cookie="mine=1") == "no cookie"


# --- response header names: fullmatch, not "$" ----------------------------------------


@pytest.mark.parametrize("name", ["X-A\n", "X-A\r\n", "X A", ""])
async def test_a_header_name_with_a_newline_is_bad_response(api: Api, name: str) -> None:
    """ "$" also matches before a final newline: "X-A\\n" passed, uvicorn then
    refused to write it and the client got an empty reply, the record "ok"."""
    src = f"def handler(request, ctx):\n    return ('x', 200, {{{name!r}: 'v'}})\n"
    await api.deploy("lfname", src)
    r = await api.client.get("/fn/lfname", headers=api.auth())
    assert r.status_code == 502, r.text
    assert r.json()["error"]["code"] == "bad_response"
    rec = await api.client.get(
        f"/api/v1/invocations/{r.headers['x-invocation-id']}", headers=api.auth()
    )
    body = rec.json()
    assert (body["outcome"], body["error_type"]) == ("bad_response", "BadResponse"), body
    assert "invalid header name" in body["error_message"], body


# --- declared routes take a decoded path whole -----------------------------------------

ROUTED = """
def handler(request, ctx):
    return {"path": request.path, "params": request.path_params}
"""


async def test_a_declared_route_gets_the_raw_path(api: Api) -> None:
    """The app matched request.url.path, which urlsplit strips of tabs and
    newlines: /exact%0A was served by the /exact route, /shop/a%0A came to
    the function as /shop/a."""
    src = "def handler(request, ctx):\n    return {'path': request.path}\n"
    r = await api.deploy("exact", src, public=True, routes=["GET /exact", "GET /shop/{p:path}"])
    assert r.status_code == 201, r.text
    assert (await api.client.get("/exact")).json() == {"path": "/exact"}
    assert (await api.client.get("/exact%0A")).status_code == 404
    assert (await api.client.get("/exact%09")).status_code == 404
    assert (await api.client.get("/shop/a%0A")).json() == {"path": "/shop/a\n"}
    assert (await api.client.get("/shop/a%0Ab")).status_code == 404
    assert (await api.client.get("/shop/a%20b")).json() == {"path": "/shop/a b"}


def test_a_route_does_not_match_its_path_plus_a_newline() -> None:
    """Starlette's route pattern ends in "$": "/exact" also took "/exact\n",
    and a {p:path} tail stopped at a newline."""
    table = RouteTable(
        [
            RouteEntry("GET", "/exact", "t", "exact"),
            RouteEntry("GET", "/shop/{p:path}", "t", "shop"),
            RouteEntry("GET", "/u/{id}", "t", "user"),
        ]
    )
    assert table.match("GET", "/exact") is not None
    assert table.match("GET", "/exact\n") is None
    assert table.match("GET", "/exactly") is None
    shop = table.match("GET", "/shop/a\nb")
    assert shop is not None and shop.path_params == {"p": "a\nb"}
    shop = table.match("GET", "/shop/a\n")
    assert shop is not None and shop.path_params == {"p": "a\n"}
    user = table.match("GET", "/u/7\n")
    assert user is not None and user.path_params == {"id": "7\n"}


# --- the upload check of the entrypoint ------------------------------------------------


async def test_a_class_is_a_handler(api: Api) -> None:
    src = "class handler:\n    def __new__(cls, request, ctx):\n        return 'from a class'\n"
    r = await api.client.put(
        "/api/v1/functions/classy", json={"source": src, "public": True}, headers=api.auth()
    )
    assert r.status_code == 201, r.text
    r = await api.client.get("/fn/classy")
    assert (r.status_code, r.text) == (200, "from a class")


@pytest.mark.parametrize(
    ("src", "kind"),
    [
        ("handler = 5\n", "int"),
        ("handler = None\n", "None"),
        ("handler: str = 'x'\n", "str"),
        ("handler = {'a': 1}\n", "dict"),
        ("handler, other = [1], print\n", "list"),
        ("if True:\n    handler = 1\nelse:\n    handler = 'x'\n", "int, str"),
    ],
)
async def test_a_handler_bound_only_to_a_literal_is_refused(api: Api, src: str, kind: str) -> None:
    """Accepted before, and then every call failed: a literal is never callable."""
    for body in ({"source": src}, {"archive": zip_b64({"handler.py": src})}):
        r = await api.client.put("/api/v1/functions/literal", json=body, headers=api.auth())
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["code"] == "missing_handler", error
        assert f"literal{'s' if ',' in kind else ''} ({kind})" in error["message"], error
        assert error["detail"] == {"file": "handler.py", "function": "handler"}, error


@pytest.mark.parametrize(
    "files",
    [
        {"handler.py": "handler = None\nglobals()['handler'] = lambda r, c: 'late'\n"},
        {
            "handler.py": "handler = None\nimport setup\n",
            "setup.py": "import handler as h\nh.handler = lambda r, c: 'late'\n",
        },
        {
            "handler.py": "handler = None\nfrom pkg import install\ninstall(__name__)\n",
            "pkg/__init__.py": (
                "import sys\n"
                "def install(name):\n"
                "    sys.modules[name].handler = lambda r, c: 'late'\n"
            ),
        },
    ],
    ids=["globals", "other-module", "package-function"],
)
async def test_a_handler_set_where_the_ast_cannot_see_is_accepted(
    api: Api, files: dict[str, str]
) -> None:
    r = await api.client.put(
        "/api/v1/functions/late",
        json={"archive": zip_b64(files), "public": True},
        headers=api.auth(),
    )
    assert r.status_code == 201, r.text
    r = await api.client.get("/fn/late")
    assert (r.status_code, r.text) == (200, "late")


async def test_a_handler_not_callable_at_load_is_an_error_outcome(api: Api) -> None:
    """What no upload check can see fails like any import: the `error` outcome
    (500, README "Outcomes"), with the reason in the record, not a crash."""
    src = "def handler(request, ctx):\n    return 1\nglobals()['handler'] = 5\n"
    await api.deploy("notcallable", src, public=True)
    for _ in range(2):
        r = await api.client.get("/fn/notcallable")
        assert r.status_code == 500, r.text
        assert r.json()["error"]["code"] == "error"
        rec = (
            await api.client.get(
                f"/api/v1/invocations/{r.headers['x-invocation-id']}", headers=api.auth()
            )
        ).json()
        assert (rec["outcome"], rec["error_type"]) == ("error", "TypeError"), rec
        assert "handler:handler is not a callable" in rec["error_message"], rec


# --- a declared route begins with a literal segment --------------------------------------


@pytest.mark.parametrize(
    "route", ["GET /{p:path}", "ANY /{rest:path}", "GET /{id}", "POST /{id}/orders"]
)
async def test_a_route_must_begin_with_a_literal_segment(api: Api, route: str) -> None:
    """A route that begins with a parameter overlaps every other tenant's
    routes: the first tenant to declare "/{p:path}" had all of them refused."""
    key = await api.tenant("greedy")
    r = await api.client.put(
        "/api/v1/functions/greedy",
        json={"source": ROUTED, "routes": [route]},
        headers=api.auth(key),
    )
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "invalid_routes", error
    assert "must begin with a literal path segment" in error["message"], error
    # The raw-body upload takes routes in the query string: the same rule.
    r = await api.client.put(
        "/api/v1/functions/greedy",
        params={"routes": route},
        content=ROUTED.encode(),
        headers={**api.auth(key), "content-type": "text/x-python"},
    )
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "invalid_routes"
    # The admin (tenant "default") too: the rule has no exception.
    r = await api.client.put(
        "/api/v1/functions/greedy-admin",
        json={"source": ROUTED, "routes": [route]},
        headers=api.auth(),
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_routes", r.text


async def test_routes_under_a_literal_segment_leave_other_tenants_room(api: Api) -> None:
    one, two = await api.tenant("one"), await api.tenant("two")
    await api.deploy("shop", ROUTED, key=one, public=True, routes=["ANY /shop/{p:path}", "GET /"])
    await api.deploy("blog", ROUTED, key=two, public=True, routes=["GET /blog/{slug}"])
    r = await api.client.get("/shop/a/b")
    assert r.status_code == 200 and r.json()["params"] == {"p": "a/b"}, r.text
    r = await api.client.get("/blog/hello")
    assert r.status_code == 200 and r.json()["params"] == {"slug": "hello"}, r.text
    r = await api.client.put(
        "/api/v1/functions/shop2",
        json={"source": ROUTED, "routes": ["GET /shop/x"]},
        headers=api.auth(two),
    )
    assert r.status_code == 409 and r.json()["error"]["code"] == "route_conflict", r.text


async def test_a_long_path_reaches_the_function_whole_and_the_record_cut(api: Api) -> None:
    """A record kept the whole path: an anonymous caller of a public function
    sent 60 KB paths and grew the store by ~5 MB a second."""
    await api.deploy(
        "pathlen", "def handler(request, ctx):\n    return {'n': len(request.path)}\n", public=True
    )
    long = "/fn/pathlen/" + "p" * 20_000
    r = await api.client.get(long)
    assert r.status_code == 200 and r.json() == {"n": 1 + 20_000}
    rec = await api.client.get(
        f"/api/v1/invocations/{r.headers['x-invocation-id']}", headers=api.auth()
    )
    assert rec.json()["path"] == ("/" + "p" * 20_000)[:2048]
