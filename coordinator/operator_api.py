"""The operator's HTTP listener: the live dashboard, the fleet's state as JSON and its Prometheus metrics, for
operators only.

Every request but the login page must carry an operator's credential (``dress-fleet operators add NAME``): as
``Authorization: Bearer ...`` (Prometheus: ``authorization: {credentials: ...}`` in its scrape config; scripts), or
as the cookie the login page sets for a browser (HttpOnly, SameSite=Strict, Secure on TLS). With the fleet's
certificates it speaks TLS only (the coordinator's server certificate); without, plaintext on loopback only, as
the coordinator's other listeners. The dashboard is three files in ``coordinator/dashboard`` (no CDN): it polls the
JSON below every two seconds, and every answer is paged or aggregated here, so a page stays small at any fleet size.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import uvicorn
from fastapi import Depends, FastAPI, Form, HTTPException, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from contracts.credentials import SCHEME
from coordinator.metrics import FleetMetrics
from coordinator.registry import DeviceInfo, Registry
from coordinator.registry.rollouts import version_in
from runtime.certificates import CertificateError, FleetCertificates, is_loopback

log = logging.getLogger(__name__)

DASHBOARD = Path(__file__).with_name("dashboard")
ASSETS = {"app.js": "text/javascript", "style.css": "text/css"}
COOKIE = "dress_operator"
MAX_PAGE = 500  # devices per page: a page of the fleet stays well under a megabyte at any fleet size
MAX_ROUNDS = 1000  # rounds per answer; the dashboard asks for those after the last it has
MAX_VERSIONS = 20  # the newest model versions the summary lists
START_TIMEOUT_S = 10.0
LOGIN_PAGE = """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>dress-fleet: sign in</title>
<link rel="stylesheet" href="/static/style.css"></head><body class="login"><form method="post" action="/login">
<h1>dress-fleet</h1><p>An operator's credential (<code>dress-fleet operators add NAME</code>):</p>
<input type="password" name="credential" autocomplete="current-password" autofocus required>
<button type="submit">Sign in</button>{error}</form></body></html>"""


class SignInRequired(Exception):
    """A browser's page without a valid credential: it is sent to the login page."""


def device_json(d: DeviceInfo, rollout: tuple[str | None, str | None, float]) -> dict[str, Any]:
    """One device as the dashboard shows it; ``rollout`` (``Registry.rollout``) says which version it is given:
    ``model_version`` is that version once the device reports serving it, else None (still fetching or checking)."""
    return {"id": d.id, "name": d.name, "profile": d.profile, "status": str(d.status), "density": d.current_density,
            "last_seen": d.last_seen.isoformat(), "given_version": version_in(rollout, d.name),
            "model_version": d.model_version,
            "budget": None if d.last_budget is None else {
                "latency_ms": d.last_budget.latency_ms, "memory_mb": d.last_budget.memory_mb,
                "battery": d.last_budget.battery}}


def operator_app(registry: Registry, metrics: FleetMetrics, secure_cookie: bool = True,
                 reference: Mapping[float, float] | None = None) -> FastAPI:
    """The listener's routes. ``secure_cookie``: the login cookie only travels over TLS (False on a loopback
    listener without it); ``reference``: the centralized accuracy per density, when one is known, for the gap."""

    def credential_of(request: Request) -> str | None:
        header = request.headers.get("authorization", "")
        secret = header[len(SCHEME):] if header.startswith(SCHEME) else request.cookies.get(COOKIE)
        return registry.operator_for(secret) if secret else None

    def operator(request: Request) -> str:
        if (name := credential_of(request)) is None:
            raise HTTPException(401, "an operator's credential is required (dress-fleet operators add NAME), "
                                     "sent as 'Authorization: Bearer CREDENTIAL'",
                                headers={"WWW-Authenticate": "Bearer"})
        return name

    def signed_in(request: Request) -> str:
        if (name := credential_of(request)) is None:
            raise SignInRequired
        return name

    app = FastAPI(title="dress-fleet coordinator", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(SignInRequired)
    def to_login(request: Request, exc: SignInRequired) -> RedirectResponse:
        return RedirectResponse("/login", status_code=303)

    @app.get("/login", response_class=HTMLResponse)
    def login_page() -> str:
        return LOGIN_PAGE.format(error="")

    @app.post("/login")
    def login(credential: Annotated[str, Form(max_length=128)]) -> Response:
        if registry.operator_for(credential) is None:
            return HTMLResponse(LOGIN_PAGE.format(error='<p class="error">Not an operator\'s credential.</p>'), 401)
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(COOKIE, credential, httponly=True, samesite="strict", secure=secure_cookie)
        return response

    @app.get("/logout")
    def logout() -> Response:
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(COOKIE)
        return response

    @app.get("/static/style.css")
    def style() -> FileResponse:  # the login page's too, so it is the one file served to anyone
        return FileResponse(DASHBOARD / "style.css", media_type=ASSETS["style.css"])

    @app.get("/", dependencies=[Depends(signed_in)])
    def dashboard() -> FileResponse:
        return FileResponse(DASHBOARD / "index.html", media_type="text/html")

    @app.get("/static/app.js", dependencies=[Depends(signed_in)])
    def script() -> FileResponse:
        return FileResponse(DASHBOARD / "app.js", media_type=ASSETS["app.js"])

    @app.get("/metrics", dependencies=[Depends(operator)])
    def scrape() -> Response:
        return Response(generate_latest(metrics.collectors), media_type=CONTENT_TYPE_LATEST)

    @app.get("/api/summary", dependencies=[Depends(operator)])
    def summary() -> dict[str, Any]:
        """The fleet in aggregate: devices by status, by profile and density; the round under way."""
        counts = registry.device_counts()
        by_status: Counter[str] = Counter()
        by_profile: dict[str, Counter[str]] = {}
        for (status, profile, density), n in counts.items():
            by_status[str(status)] += n
            by_profile.setdefault(profile, Counter())[f"{density:g}"] += n
        under_way = registry.round_under_way()
        stable, candidate, canary = registry.rollout()
        return {
            "model_version": stable, "candidate": candidate, "canary": canary, "rounds": registry.count_rounds(),
            "versions": [{"version": v.version, "status": str(v.status), "canary": v.canary,
                          "published_at": v.created_at.isoformat(), "reason": v.reason}
                         for v in registry.list_versions()[-MAX_VERSIONS:]],
            "devices": dict(by_status), "densities": {p: dict(c) for p, c in sorted(by_profile.items())},
            "round_under_way": None if under_way is None else {
                "round": under_way.round, "started_at": under_way.started_at.isoformat(),
                "elapsed_s": round(time.time() - under_way.started_at.timestamp(), 1),
                "timeout_s": under_way.timeout_s, "sent": under_way.sent},
            "reference": None if reference is None else {f"{d:g}": a for d, a in reference.items()},
        }

    @app.get("/api/rounds", dependencies=[Depends(operator)])
    def rounds(after: Annotated[int, Query(ge=0)] = 0) -> dict[str, Any]:
        """Recorded rounds after round ``after`` (at most MAX_ROUNDS): accuracy per density, the gap to the
        reference, devices trained per profile and density, who did not count and why."""
        profiles = registry.device_profiles()
        recorded = registry.list_rounds(after=after, limit=MAX_ROUNDS)
        answer = []
        for r in recorded:
            trained: dict[str, Counter[str]] = {}
            for name, density in r.details.get("participants", {}).items():
                trained.setdefault(profiles.get(name, "?"), Counter())[f"{density:g}"] += 1
            accuracy = {f"{d:g}": m.get("accuracy") for d, m in r.metrics.items()}
            answer.append({
                "round": r.round, "recorded_at": r.recorded_at.isoformat(), "model_version": r.model_version,
                "accuracy": accuracy, "wall_s": r.details.get("wall_s"),
                "gap": None if reference is None else {
                    d: round(a - reference[float(d)], 2) for d, a in accuracy.items()
                    if a is not None and float(d) in reference},
                "trained": {p: dict(c) for p, c in sorted(trained.items())},
                "rejected": r.details.get("rejected", {}), "withheld": r.details.get("withheld")})
        return {"rounds": answer}

    @app.get("/api/devices", dependencies=[Depends(operator)])
    def devices(offset: Annotated[int, Query(ge=0)] = 0,
                limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100) -> dict[str, Any]:
        """One page of the fleet, by name: what `dress-fleet devices` lists."""
        rollout = registry.rollout()
        return {"total": registry.count_devices(), "offset": offset,
                "devices": [device_json(d, rollout) for d in registry.list_devices(offset=offset, limit=limit)]}

    @app.get("/api/devices/{name}", dependencies=[Depends(operator)])
    def device(name: str) -> dict[str, Any]:
        """One device: its state, density history, what its Predict ran per density, its labelled checks of each
        model version (agents with --check-set), and its refused updates."""
        found = registry.list_devices(name=name)
        if not found:
            raise HTTPException(404, f"no device named {name!r}")
        d = found[0]
        refused = [{"round": r.round, "reason": r.details["rejected"][name]} for r in registry.list_rounds()
                   if name in r.details.get("rejected", {})]
        return {**device_json(d, registry.rollout()),
                "history": [{"density": h.density, "reason": str(h.reason), "model_version": h.model_version,
                             "at": h.assigned_at.isoformat()} for h in registry.device_history(d.id)],
                "served": [{"density": density, "requests": n, "mean_ms": round(ms / n, 3) if n else None}
                           for density, (n, ms) in registry.served_totals(d.id).items()],
                "checks": [{"version": v, "density": density, "examples": n, "accuracy": round(100 * right / n, 2),
                            "at": at.isoformat()} for v, density, n, right, at in registry.device_checks(d.id)],
                "refused": refused}

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
