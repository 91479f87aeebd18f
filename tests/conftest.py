"""Shared fixtures: one real JailRunner per session, code deployment, a jail per test.

The runner is created once per session in a short directory under /tmp with
mode 0711, which the jail's unprivileged uid can traverse (pytest's tmp_path
is 0700, which nsjail cannot mount from), and removed at the end. The runner
fixture is sync (``JailRunner.create`` is); tests and the ``jail`` fixture are
function-scoped async. Helpers live in tests/jailtest.py.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from jail import JailRunner
from tests.jailtest import Deploy, Jail, make_deploy


@pytest.fixture(scope="session")
def runner() -> Iterator[JailRunner]:
    jail_dir = Path(tempfile.mkdtemp(prefix="nsfaas-t-", dir="/tmp"))
    os.chmod(jail_dir, 0o711)  # noqa: S103 (the jail uid must traverse it)
    try:
        # No prepared launchers here: this runner outlives each test's event loop,
        # and they are asyncio subprocesses of the loop that made them. The gateway
        # tests (one loop per app) and tests/jail/test_launcher.py cover them.
        r = JailRunner.create(jail_dir=jail_dir, spare_launchers=0)

        async def check() -> None:
            await r.self_check()
            await r.settle()

        asyncio.run(check())
        yield r
        r.config.slots.close()  # the free slot cgroups of this session
    finally:
        shutil.rmtree(jail_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def deploy(runner: JailRunner) -> Deploy:
    return make_deploy(runner)


@pytest.fixture
async def jail(runner: JailRunner, deploy: Deploy) -> AsyncIterator[Jail]:
    j = Jail(runner, deploy)
    try:
        yield j
    finally:
        await j.aclose()


@pytest.fixture(params=["cold", "warm"])
def mode(request: pytest.FixtureRequest) -> str:
    """Run a test against a fresh jail per call and against a warm worker."""
    return str(request.param)
