"""The example functions (``make run``): deployed at start, ready to run."""

from __future__ import annotations

from pathlib import Path

import httpx

from gateway.app import create_app
from gateway.invoke import code_key
from jail import choose_jail_dir
from tests.gateway.conftest import make_settings

EXAMPLES = Path(__file__).resolve().parents[2] / "functions"


async def test_examples_are_deployed_and_unpacked_before_their_first_call(
    tmp_path: Path,
) -> None:
    settings = make_settings(tmp_path / "data", examples_dir=EXAMPLES)
    app = create_app(settings)
    names = sorted(p.name for p in EXAMPLES.iterdir() if (p / "handler.py").is_file())
    assert "hello" in names
    async with app.router.lifespan_context(app):
        gw = app.state.gateway
        code = choose_jail_dir(settings.data_dir) / "code"
        for name in names:
            fv = await gw.active_version(name)
            assert fv is not None, name
            unpacked = code / code_key(fv.tenant_id, fv.digest)
            assert (unpacked / "handler.py").is_file(), name  # no call yet
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://nsfaas.test", timeout=30) as client:
            r = await client.get("/fn/hello", params={"name": "ada"})
            assert r.status_code == 200, r.text
            assert "ada" in r.text
