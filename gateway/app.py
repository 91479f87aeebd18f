"""The Starlette app: create_app(settings), its lifespan, and the invocation routes."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import structlog
import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Match, Route

from jail import JailRunner, JailUnavailable, Limits, choose_jail_dir
from jail.pool import WarmPool

from . import api_functions as fns
from . import api_kv, api_logs, openapi
from .checker import CheckerPool
from .config import Settings, load_admin_key
from .deploy import deploy_examples
from .errors import (
    ApiError,
    api_error_handler,
    error_response,
    http_error_handler,
    unhandled_error_handler,
)
from .http import (
    DEFAULT_TENANT,
    ByteBudget,
    Principal,
    client_gone,
    path_is_utf8,
    read_body,
    require,
)
from .invoke import Call, Invoker, new_invocation_id, to_http
from .logbus import LogBudget, LogBus
from .metrics import Metrics
from .middleware import INVOCATION, RequestContextMiddleware
from .proxy_api import ProxyService
from .routes_table import RouteTable
from .scheduler import Scheduler
from .store import FunctionVersion, NotFound, Store, Tenant, open_store

log = structlog.get_logger("nsfaas.gateway")
RESERVED = ("/api/", "/fn/", "/healthz", "/metrics")
# Log lines deleted per store write. Every record waits while one runs: 1,000
# lines (with their search index entries) took 28 ms of the writer, 200 take 4
# (bench: a function at its 100,000-line cap, 1 KB lines). 500 of them per pass
# every 5 s delete up to 20,000 lines a second.
RETENTION_BATCH = 200
RETENTION_BATCHES = 500
CHECKERS = 2  # upload checker processes (gateway.checker.CheckerPool)


class Gateway:
    """The long-lived services of one app, created in the lifespan."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.logbus = LogBus(
            max_tails=settings.max_log_tails,
            max_tails_per_tenant=settings.max_log_tails_per_tenant,
        )
        self.log_budget = LogBudget(settings.log_rate_bytes, settings.log_burst_bytes)
        self.scheduler = Scheduler(
            max_concurrency=settings.max_concurrency,
            function_concurrency=settings.function_concurrency,
            tenant_concurrency=settings.tenant_concurrency,
            queue_size=settings.queue_size,
            queue_timeout_s=settings.queue_timeout_s,
        )
        self.store: Store = open_store(settings.data_dir)
        self.bodies = ByteBudget(settings.max_buffered_bytes)
        # Checking an upload parses its code (16 MB of source: 10 s of CPU), in
        # checker processes (CHECKERS of them): concurrent uploads queue
        # instead of all taking CPU from the calls, and each tenant's one at a
        # time (a per-tenant lock first), so one tenant's burst queues behind
        # itself, and holds at most one checker.
        self.checker = CheckerPool(
            CHECKERS,
            timeout_s=settings.upload_check_timeout_s,
            memory_mb=settings.upload_check_memory_mb,
        )
        self.tenant_uploads: dict[str, tuple[asyncio.Lock, int]] = {}
        self.searching: dict[str, int] = {}  # log searches with q running, per tenant
        self.reading: dict[str, int] = {}  # record lists and log pages running, per tenant
        self.runner: JailRunner | None = None
        self.pool: WarmPool | None = None
        self.unavailable: str | None = "starting"
        self.admin_key = ""
        self.default_tenant = Tenant("", DEFAULT_TENANT, 0.0)
        self.routes = RouteTable()
        self._route_changes = 0  # routes_changed calls so far
        self._routes_hold = 0  # the changes self.routes is known to hold
        self._route_refresh: asyncio.Task[None] | None = None
        self._active: dict[str, FunctionVersion] = {}
        self._generation = 0
        self.invoker: Invoker | None = None
        self.proxy: ProxyService | None = None
        self._tasks: list[asyncio.Task[None]] = []

    async def auth(self, request: Request) -> Principal:
        return await require(request, self.store, self.admin_key, self.default_tenant)

    async def active_version(self, name: str) -> FunctionVersion | None:
        """The active version of a function, from a cache that every deploy,
        rollback and delete of this gateway clears (two store reads saved per
        invocation). A scale-out backend would need a TTL or notifications."""
        fv = self._active.get(name)
        if fv is not None:
            return fv
        generation = self._generation
        info = await self.store.find_function(name)
        if info is None:
            return None
        try:
            fv = await self.store.get_version(info.tenant_id, name, None)
        except NotFound:
            return None
        if generation == self._generation:  # no change landed while we read
            if len(self._active) > 10_000:
                self._active.clear()
            self._active[name] = fv
        return fv

    async def routes_changed(self) -> None:
        """Called after every deploy, rollback and delete (once written): returns
        once the route table holds the change. Changes that arrive while the
        routes are being read share the next read: one at a time, whatever the
        number of concurrent deploys."""
        self._generation += 1
        self._active.clear()
        self._route_changes += 1
        change = self._route_changes
        while self._routes_hold < change:  # no read that began after this change is in
            if self._route_refresh is None:
                self._route_refresh = asyncio.create_task(self._refresh_routes())
            await asyncio.shield(self._route_refresh)

    async def _refresh_routes(self) -> None:
        try:
            upto = self._route_changes
            entries = await self.store.all_routes()  # in a reader thread
            # On the loop: a dict lookup per route; only new routes are parsed,
            # and only the buckets they join or leave sorted again.
            self.routes = RouteTable(entries, previous=self.routes)
            self._routes_hold = upto
        finally:
            self._route_refresh = None

    async def version_changed(self, fv: FunctionVersion) -> None:
        """A version became active: warm it up if a warm minimum is configured."""
        if self.invoker is not None:
            await self.invoker.prewarm(fv)

    async def start(self) -> None:
        s = self.settings
        s.data_dir.mkdir(parents=True, exist_ok=True)
        self.admin_key, key_file = load_admin_key(s)
        if key_file is not None:
            log.info("admin_key_file", path=str(key_file))
        await self.store.open()
        tenants = {t.name: t for t in await self.store.list_tenants()}
        self.default_tenant = (
            tenants.get(DEFAULT_TENANT) or (await self.store.create_tenant(DEFAULT_TENANT))[0]
        )
        await self.routes_changed()
        try:
            jail_dir = choose_jail_dir(s.data_dir, s.jail_dir)
            self.runner = await asyncio.to_thread(
                JailRunner.create,
                jail_dir=jail_dir,
                nsjail=s.nsjail,
                python=s.runtime_python,
                base_cfg=s.jail_config,
                spare_launchers=s.spare_launchers,
                uid_base=s.jail_uid_base,
                penalty_box_cpu_ms_per_sec=s.penalty_box_cpu_ms_per_sec,
                usual_limits=Limits(
                    memory_mb=s.default_memory_mb, pids=s.pids, cpu_ms_per_sec=s.cpu_ms_per_sec
                ),
            )
            await self.runner.self_check()
            self.unavailable = None
        except JailUnavailable as exc:
            if self.runner is not None:
                await self.runner.aclose()  # its spare launchers and slots
            self.runner = None
            self.unavailable = str(exc)
            log.error("jails_unavailable", reason=str(exc))
        self.proxy = ProxyService(self)
        if self.runner is not None:
            self.runner.proxy_handler = self.proxy.handle
            self.runner.proxy_rate_per_s = s.proxy_rate_per_s
        if self.runner is not None and s.warm:
            self.pool = WarmPool(
                self.runner.config,
                max_idle_per_key=s.warm_max_workers,
                idle_s=s.warm_idle_s,
                memory_budget_mb=s.warm_memory_budget_mb,
                on_change=lambda n: self.metrics.warm_workers.set(n),
                proxy_handler=self.proxy.handle,
                proxy_rate_per_s=s.proxy_rate_per_s,
            )
            self.pool.start()
        self.invoker = Invoker(
            settings=s,
            store=self.store,
            runner=self.runner,
            pool=self.pool,
            scheduler=self.scheduler,
            metrics=self.metrics,
            on_logs=self.logbus.notify,
            log_budget=self.log_budget,
        )
        self.invoker.unavailable_reason = self.unavailable
        await self.invoker.sweep_code()
        self._tasks.append(asyncio.create_task(self._retention_loop()))
        if s.examples_dir is not None:
            await deploy_examples(self, s.examples_dir)
        if s.warm_min_workers > 0:
            for info in await self.store.list_functions(None):
                await self.version_changed(
                    await self.store.get_version(info.tenant_id, info.name, None)
                )

    async def _retention_loop(self) -> None:
        s = self.settings
        while True:
            try:
                # Small batches, repeated while there is work: each holds the
                # store's writer for milliseconds, not a quarter of a second.
                for _ in range(RETENTION_BATCHES):
                    deleted = await self.store.enforce_retention(
                        max_lines_per_function=s.log_retention_lines,
                        max_age_s=s.log_retention_s,
                        batch=RETENTION_BATCH,
                        max_records=s.max_invocation_records,
                    )
                    if deleted < RETENTION_BATCH:
                        break
            except Exception:
                log.exception("retention_failed")
            await asyncio.sleep(5.0)

    def stop_invocations(self) -> int:
        """End the invocations still waiting or running (the shutdown's
        deadline): their jails are killed, and each is answered and recorded
        as ``killed`` (GatewayStopped), not cut off without an answer."""
        if self.invoker is None:
            return 0
        n = self.invoker.stop_all()
        if n:
            log.warning("invocations_stopped", count=n, reason="the gateway is stopping")
        return n

    async def stop(self, deadline_s: float = 10.0) -> None:
        """Finish in-flight invocations up to a deadline (those still running
        then are ended: stop_invocations), then close every jail."""
        try:
            await asyncio.wait_for(self.scheduler.wait_idle(), deadline_s)
        except TimeoutError:
            self.stop_invocations()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.scheduler.wait_idle(), 5.0)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.invoker is not None:
            self.invoker.cancel_removals()  # the next start's sweep does them
        self.logbus.close()
        self.checker.close()
        if self.pool is not None:
            await self.pool.aclose()
        if self.proxy is not None:
            await self.proxy.aclose()
        if self.runner is not None:
            await self.runner.aclose()
        await self.store.aclose()


class GatewayServer(uvicorn.Server):
    """uvicorn's server, with a shutdown that ends the gateway's invocations
    itself before uvicorn's own deadline (``timeout_graceful_shutdown``) would
    cancel their requests: ``drain_s`` after the shutdown begins (SIGTERM),
    the invocations still running are killed and answered (502 ``killed``, a
    JSON error with the invocation id, recorded as GatewayStopped) instead of
    uvicorn's plain-text 500 and a record blaming the client."""

    def __init__(self, config: uvicorn.Config, gateway: Gateway, *, drain_s: float) -> None:
        super().__init__(config)
        self.gateway = gateway
        self.drain_s = drain_s

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        timer = asyncio.get_running_loop().call_later(self.drain_s, self.gateway.stop_invocations)
        try:
            await super().shutdown(sockets)
        finally:
            timer.cancel()


def create_app(settings: Settings) -> Starlette:
    gw = Gateway(settings)

    def bind(
        fn: Callable[[Gateway, Request], Awaitable[Response]],
    ) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            return await fn(gw, request)

        endpoint.__name__ = fn.__name__
        return endpoint

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await gw.start()
        # What start-up loaded lives as long as the process: out of the cyclic
        # collector's reach, a full collection no longer walks it (those walks
        # stalled the event loop ~25 ms at a time in the soak).
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            await gw.stop()

    async def healthz(request: Request) -> Response:
        body: dict[str, Any] = {
            "status": "ok" if gw.unavailable is None else "degraded",
            "jails": "ok" if gw.unavailable is None else "unavailable",
        }
        if gw.unavailable is not None:
            body["reason"] = gw.unavailable
        return JSONResponse(body, status_code=200 if gw.unavailable is None else 503)

    async def metrics(request: Request) -> Response:
        # The admin's: its labels name every tenant's functions, private ones
        # included, with their outcome counts.
        who = await gw.auth(request)
        if not who.admin:
            raise ApiError(403, "forbidden", "only the admin key can read the metrics")
        gw.metrics.queued.set(gw.scheduler.queued)
        if gw.pool is not None:
            gw.metrics.sync_pool(gw.pool.stats.replaced)
        return Response(generate_latest(gw.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def invoke_named(request: Request) -> Response:
        name = request.path_params["name"]
        sub = "/" + request.path_params.get("path", "")
        fv = await gw.active_version(name) if fns.NAME_RE.match(name) else None
        if fv is None:
            return error_response(
                404,
                "function_not_found",
                f"no function named {name!r}",
                invocation_id=new_invocation_id(),
            )
        return await _invoke(request, fv.tenant_id, name, sub, {})

    async def invoke_declared(request: Request) -> Response:
        # The raw path, not request.url.path: URL parsing drops tabs and newlines,
        # so /exact%0A would be served by the /exact route.
        path = request.scope.get("root_path", "") + request.scope["path"]
        if path.startswith(RESERVED):
            # A known API path with another method is a 405, not "no route".
            for route in app.routes[:-1]:
                found, _ = route.matches(request.scope)
                if found == Match.PARTIAL:
                    raise HTTPException(405, f"{request.method} is not allowed on {path}")
            raise HTTPException(404, f"no API route {path}")
        # Matched on the raw path, split before it is decoded: "%2F" is part of
        # a segment, not a separator (gateway/routes_table.py).
        raw = request.scope.get("raw_path")
        if isinstance(raw, bytes):  # (older httpx ASGI transports put the query in it)
            target = raw.partition(b"?")[0].decode("utf-8", "replace")
            match = gw.routes.match(request.method, target)
        else:
            match = gw.routes.match(request.method, path, encoded=False)
        if match is None:
            raise HTTPException(404, f"no route for {request.method} {path}")
        # A GET route answers HEAD with the GET's headers: the function is
        # asked the GET (one that told HEAD apart, as the todos example's
        # `method == "GET"` did, answered 404 to a HEAD of its 200).
        method = "GET" if request.method == "HEAD" and match.method == "GET" else None
        return await _invoke(
            request, match.tenant_id, match.name, path, match.path_params, method
        )

    async def _invoke(
        request: Request,
        tenant: str,
        name: str,
        path: str,
        params: dict[str, str],
        method: str | None = None,
    ) -> Response:
        head = len(request.scope.get("raw_path") or b"") + len(request.scope["query_string"])
        if head + sum(len(k) + len(v) for k, v in request.headers.raw) > settings.max_header_bytes:
            # `nsfaas serve` refuses such a head before the app (gateway/httpproto.py);
            # this is for any other server: past the cap it cannot reach a jail.
            return error_response(
                431,
                "headers_too_large",
                f"request line and headers exceed {settings.max_header_bytes} bytes",
                invocation_id=new_invocation_id(),
            )
        if "\ufffd" in path and not path_is_utf8(request):
            # Two different paths would reach the function as one.
            return error_response(
                400,
                "invalid_path",
                "the path must be UTF-8 once percent-decoded",
                invocation_id=new_invocation_id(),
            )
        fv = await gw.active_version(name)
        if fv is None or fv.tenant_id != tenant:
            return error_response(
                404,
                "function_not_found",
                f"no function named {name!r}",
                invocation_id=new_invocation_id(),
            )
        try:
            await _authorize(request, fv)
            body = await read_body(
                request, settings.max_request_bytes, gw.bodies, settings.body_timeout_s
            )
        except ApiError as exc:
            return error_response(
                exc.status,
                exc.code,
                exc.message,
                headers=exc.headers,
                invocation_id=new_invocation_id(),
            )
        assert gw.invoker is not None
        request.scope[INVOCATION] = True  # its invocation_finished line is its access log
        call = Call(
            method=method or request.method,
            path=path,
            # From the scope: request.url parses the whole URL for this one part.
            query_string=request.scope["query_string"].decode("utf-8", "replace"),
            headers=tuple(
                (k.decode("latin-1"), v.decode("latin-1"))
                for k, v in request.headers.raw
                if k.lower() != b"authorization"
            ),
            body=body,
            path_params=params,
            client_gone=functools.partial(client_gone, request.receive),
        )
        try:
            result, inv_id, report = await gw.invoker.invoke_reporting_later(fv, call)
        finally:
            gw.bodies.release(len(body))
        response = to_http(result, inv_id)
        if request.method == "HEAD":
            # The GET answer without its body: the same headers, Content-Length
            # included (RFC 9110 §9.3.2), by construction (a HEAD of a 205 said
            # the length of a body its GET does not send).
            response.body = b""

        async def after_response() -> None:  # async: a sync task would go to a thread
            report()

        response.background = BackgroundTask(after_response)
        return response

    async def _authorize(request: Request, fv: FunctionVersion) -> None:
        if fv.config.public:
            return
        who = await gw.auth(request)
        if not who.admin and who.tenant_id != fv.tenant_id:
            raise ApiError(404, "function_not_found", f"no function named {fv.name!r}")

    methods = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
    routes = [
        # Invocations first: the router tries routes in order, one regex each,
        # and these carry nearly all the traffic (no other route can match them).
        Route("/fn/{name}", invoke_named, methods=methods),
        Route("/fn/{name}/{path:path}", invoke_named, methods=methods),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/api/v1/openapi.json", openapi.endpoint, methods=["GET"]),
        Route("/api/v1/tenants", bind(fns.create_tenant), methods=["POST"]),
        Route("/api/v1/tenants", bind(fns.list_tenants), methods=["GET"]),
        Route("/api/v1/functions", bind(fns.list_functions), methods=["GET"]),
        Route("/api/v1/functions/{name}", bind(fns.put_function), methods=["PUT"]),
        Route("/api/v1/functions/{name}", bind(fns.get_function), methods=["GET"]),
        Route("/api/v1/functions/{name}", bind(fns.delete_function), methods=["DELETE"]),
        Route("/api/v1/functions/{name}/versions", bind(fns.list_versions), methods=["GET"]),
        Route("/api/v1/functions/{name}/rollback", bind(fns.rollback), methods=["POST"]),
        *api_logs.routes(bind),
        *api_kv.routes(bind),
        Route("/{path:path}", invoke_declared, methods=methods),
    ]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={
            ApiError: api_error_handler,
            HTTPException: http_error_handler,
            Exception: unhandled_error_handler,
        },
    )
    app.state.gateway = gw
    app.add_middleware(RequestContextMiddleware)
    return app
