"""The operator's HTTP listener: the fleet's metrics for Prometheus and its state as JSON, for operators only.

Every request must carry an operator's credential (``dress-fleet operators add NAME``) as ``Authorization: Bearer
...``: Prometheus sends it with ``authorization: {credentials: ...}`` in its scrape config. With the fleet's
certificates it speaks TLS only (the coordinator's server certificate); without, plaintext on loopback only, as
the coordinator's other listeners.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Annotated, Any

import uvicorn
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from contracts.credentials import SCHEME
from coordinator.metrics import FleetMetrics
from coordinator.registry import Registry
from runtime.certificates import CertificateError, FleetCertificates, is_loopback

log = logging.getLogger(__name__)

MAX_PAGE = 500  # devices per page: a page of the fleet stays well under a megabyte at any fleet size
START_TIMEOUT_S = 10.0


def operator_app(registry: Registry, metrics: FleetMetrics) -> FastAPI:
    """The listener's routes, each behind an operator's credential."""

    def operator(request: Request) -> str:
        header = request.headers.get("authorization", "")
        name = registry.operator_for(header[len(SCHEME):]) if header.startswith(SCHEME) else None
        if name is None:
            raise HTTPException(401, "an operator's credential is required (dress-fleet operators add NAME), "
                                     "sent as 'Authorization: Bearer CREDENTIAL'",
                                headers={"WWW-Authenticate": "Bearer"})
        return name

    app = FastAPI(title="dress-fleet coordinator", docs_url=None, redoc_url=None, openapi_url=None,
                  dependencies=[Depends(operator)])

    @app.get("/metrics")
    def scrape() -> Response:
        return Response(generate_latest(metrics.collectors), media_type=CONTENT_TYPE_LATEST)

    @app.get("/api/devices")
    def devices(offset: Annotated[int, Query(ge=0)] = 0,
                limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100) -> dict[str, Any]:
        """One page of the fleet, by name: what `dress-fleet devices` lists."""
        everyone = registry.list_devices()
        return {"total": len(everyone), "offset": offset, "devices": [{
            "name": d.name, "profile": d.profile, "status": str(d.status), "density": d.current_density,
            "last_seen": d.last_seen.isoformat(),
            "budget": None if d.last_budget is None else {
                "latency_ms": d.last_budget.latency_ms, "memory_mb": d.last_budget.memory_mb,
                "battery": d.last_budget.battery},
        } for d in everyone[offset:offset + limit]]}

    return app


class OperatorListener:
    """``operator_app`` served by uvicorn on a thread of this process; ``stop`` ends it."""

    def __init__(self, app: FastAPI, host: str, port: int, certs: FleetCertificates | None) -> None:
        if certs is None and not is_loopback(host):
            raise CertificateError(f"plaintext is for loopback only; the operator listener on {host} needs the "
                                   "fleet's certificates")
        tls = {"ssl_certfile": str(certs.server_cert), "ssl_keyfile": str(certs.server_key)} if certs else {}
        self.address = f"{host}:{port}"
        self.scheme = "https" if certs else "http"
        self._server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                                     access_log=False, ws="none", **tls))
        self._thread = threading.Thread(target=self._server.run, name="operator-listener", daemon=True)

    def start(self) -> OperatorListener:
        """Serving when it returns; RuntimeError when it could not start (the port is taken)."""
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the operator listener could not start on {self.address} (is the port taken?)")
            time.sleep(0.05)
        log.info("operator listener on %s://%s", self.scheme, self.address)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
