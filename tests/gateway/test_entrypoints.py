"""Entrypoints that could never load are refused at upload; a package's
__init__.py can be one."""

from __future__ import annotations

import pytest

from .conftest import Api, zip_b64

SRC = "def handler(r, c):\n    return {'from': __name__}\n"


@pytest.mark.parametrize(
    "module",
    ["os", "json", "email.mine", "nsfaas", "bootstrap", "_frames",
     "__main__", "__phello__", "__hello_alias__", "xxsubtype"],
)
async def test_a_module_name_the_jail_resolves_first_is_refused(api: Api, module: str) -> None:
    """Accepted, every call was a 500: the standard library's (or the
    runtime's) module of that name was imported instead."""
    for body in ({"source": SRC}, {"archive": zip_b64({module.replace(".", "/") + ".py": SRC})}):
        r = await api.client.put(
            "/api/v1/functions/shadow",
            json={**body, "entrypoint": f"{module}:handler"},
            headers=api.auth(),
        )
        assert r.status_code == 400, r.text
        assert r.json()["error"]["code"] == "bad_entrypoint", r.text
        assert repr(module.split(".")[0]) in r.json()["error"]["message"], r.text


@pytest.mark.parametrize(
    ("files", "entrypoint"),
    [
        ({"handler.py": SRC, "handler/__init__.py": ""}, "handler:handler"),
        ({"app.py": "", "app/main.py": SRC}, "app.main:handler"),
        ({"handler.py": SRC, "handler.so": "x"}, "handler:handler"),
        ({"app/main.py": SRC, "app/main.cpython-311-x86_64-linux-gnu.so": "x"}, "app.main:handler"),
    ],
)
async def test_a_module_and_a_package_of_one_name_are_refused(
    api: Api, files: dict[str, str], entrypoint: str
) -> None:
    r = await api.client.put(
        "/api/v1/functions/both",
        json={"archive": zip_b64(files), "entrypoint": entrypoint},
        headers=api.auth(),
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "bad_entrypoint", r.text
    message = r.json()["error"]["message"]
    assert "imports only one of them" in message or "instead of" in message, message


async def test_a_package_init_is_an_entrypoint(api: Api) -> None:
    r = await api.client.put(
        "/api/v1/functions/pkg",
        json={"archive": zip_b64({"mypkg/__init__.py": SRC}), "entrypoint": "mypkg:handler",
              "public": True},
        headers=api.auth(),
    )
    assert r.status_code == 201, r.text
    r = await api.client.get("/fn/pkg")
    assert (r.status_code, r.json()) == (200, {"from": "mypkg"}), r.text


@pytest.mark.parametrize(
    ("opts", "code"),
    [
        ({"timeout_s": 1e-9}, "invalid_timeout"),  # accepted, every call timed out
        ({"timeout_s": 0.05}, "invalid_timeout"),
        ({"egress_allow": [("a" * 60 + ".") * 5 + "com"]}, "invalid_egress_allow"),  # > 253
        ({"egress_allow": ["*." + ("a" * 60 + ".") * 5 + "com:443"]}, "invalid_egress_allow"),
    ],
)
async def test_options_no_call_could_use_are_refused(
    api: Api, opts: dict[str, object], code: str
) -> None:
    r = await api.client.put(
        "/api/v1/functions/opt", json={"source": SRC, **opts}, headers=api.auth()
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == code, r.text
    ok = {"timeout_s": 0.1} if "timeout_s" in opts else {"egress_allow": [("a" * 60 + ".") * 4 + "com"]}
    r = await api.client.put("/api/v1/functions/opt", json={"source": SRC, **ok}, headers=api.auth())
    assert r.status_code in (200, 201), r.text


async def test_routes_are_stored_as_the_gateway_writes_them(api: Api) -> None:
    """`get /x`, `GET\\t/x` and `GET  /x` were kept as sent (and a route could
    be listed twice): what a function's config shows is now canonical."""
    r = await api.client.put(
        "/api/v1/functions/routed",
        json={"source": SRC, "routes": ["get /r/{id}", "POST\t/r", "ANY  /r/x"]},
        headers=api.auth(),
    )
    assert r.status_code == 201, r.text
    assert r.json()["routes"] == ["GET /r/{id}", "POST /r", "ANY /r/x"], r.json()
    r = await api.client.put(
        "/api/v1/functions/routed",
        json={"source": SRC, "routes": ["GET /r/{id}", "get  /r/{id}"]},
        headers=api.auth(),
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_routes", r.text
    assert "repeats" in r.json()["error"]["message"]
    r = await api.client.put(
        "/api/v1/functions/routed",
        json={"source": SRC, "routes": ["GET /r/{id}", "GET /r/{other}"]},
        headers=api.auth(),
    )
    assert r.status_code == 400 and "repeats 'GET /r/{id}'" in r.json()["error"]["message"]
