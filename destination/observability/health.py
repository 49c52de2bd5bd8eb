"""The operator's HTTP port: ``/metrics`` (Prometheus), ``/healthz`` and ``/readyz``.

``/healthz`` answers 200 while the pipeline runs, 503 with the reason once a part of it
has stopped on a bug (a crashed component: restarting the pod is the cure), never
because Gist is down; ``/readyz`` answers 200 only while the worker consumes and Gist
accepts its key, 503 with the reason otherwise.
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest


class HealthServer:
    def __init__(
        self,
        host: str,
        port: int,
        readiness: Callable[[], str | None],
        liveness: Callable[[], str | None] = lambda: None,
    ) -> None:
        """``readiness()`` returns None when ready, else why not; ``liveness()`` None
        while healthy, else what broke."""
        self._host = host
        self._port = port
        self._readiness = readiness
        self._liveness = liveness
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port)
        await site.start()
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else self._port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _metrics(self, _: web.Request) -> web.Response:
        body = generate_latest(REGISTRY)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, _: web.Request) -> web.Response:
        broken = self._liveness()
        if broken is None:
            return web.json_response({"status": "alive"})
        return web.json_response({"status": "broken", "reason": broken}, status=503)

    async def _readyz(self, _: web.Request) -> web.Response:
        reason = self._readiness()
        if reason is None:
            return web.json_response({"status": "ready"})
        return web.json_response({"status": "not ready", "reason": reason}, status=503)
