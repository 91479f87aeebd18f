"""Fixtures: a real app (real store, real jails) behind httpx's ASGI transport."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from gateway.app import create_app
from gateway.config import Settings
from jail import choose_jail_dir

ADMIN = "test-admin-key"


@dataclass
class Api:
    client: httpx.AsyncClient
    settings: Settings
    app: object

    def auth(self, key: str = ADMIN) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"}

    async def deploy(
        self, name: str, source: str, key: str = ADMIN, **opts: object
    ) -> httpx.Response:
        resp = await self.client.put(
            f"/api/v1/functions/{name}", json={"source": source, **opts}, headers=self.auth(key)
        )
        assert resp.status_code in (200, 201), resp.text
        return resp

    async def tenant(self, name: str) -> str:
        resp = await self.client.post("/api/v1/tenants", json={"name": name}, headers=self.auth())
        assert resp.status_code == 201, resp.text
        return str(resp.json()["key"])


def make_settings(data_dir: Path, **kw: object) -> Settings:
    base: dict[str, object] = {
        "data_dir": data_dir,
        "admin_key": ADMIN,
        "default_timeout_s": 5.0,
        "warm_idle_s": 30.0,
        "queue_size": 256,
        "queue_timeout_s": 60.0,
    }
    base.update(kw)
    return Settings(**base)  # type: ignore[arg-type]


@pytest.fixture
async def api(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Api]:
    """Warm by default; ``@pytest.mark.parametrize("api", ["warm", "cold"], indirect=True)``."""
    mode = getattr(request, "param", "warm")
    settings = make_settings(tmp_path / "data", warm=mode == "warm")
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://nsfaas.test", timeout=30
        ) as client:
            yield Api(client, settings, app)
    shutil.rmtree(choose_jail_dir(settings.data_dir), ignore_errors=True)
