"""The SuperLink's public face: nginx, forwarding only Flower's Fleet API and health check.

Flower 1.42 serves its Control API (`flwr run`, `flwr stop`, `flwr ls`, `flwr supernode register`), its runtime
API and its Fleet API on one HTTP port, and its open-source build authenticates no operator: whoever reaches that
port runs code on the coordinator and every device. SuperNodes only ever call ``/v1/fleet/*`` (node
authentication travels in headers), so a TLS fleet's SuperLink listens on loopback and devices reach it through
Debian's nginx, configured here: TLS with the fleet's certificates on the public address, the fleet routes and
``GET /health`` passed to the SuperLink over TLS verified against the fleet CA, everything else answered 404.
The operator's `flwr` CLI and the ServerApp talk to the SuperLink on loopback.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from dress_model.checkpoint import atomic_write
from runtime import processes as fr
from runtime.certificates import FleetCertificates, https_context

NGINX_CANDIDATES = ("nginx", "/usr/sbin/nginx")
INSTALL_HINT = "install Debian's nginx (`apt-get install nginx`; `make setup` does)"
MAX_BODY = "16m"  # a Fleet request carries at most one object chunk (Flower's 5 MB) plus its envelope
FLEET_TIMEOUT_S = 120  # the longest a Fleet call may take (pulling a round's model over a slow link)


class ProxyUnavailableError(RuntimeError):
    """No reverse proxy is installed, so the SuperLink cannot be exposed beyond loopback safely."""


def nginx_binary() -> str:
    for candidate in NGINX_CANDIDATES:
        if found := shutil.which(candidate):
            return found
    raise ProxyUnavailableError("a TLS fleet's SuperLink is reached through nginx, which forwards only the Fleet "
                                f"API, and no nginx is installed: {INSTALL_HINT}")


@dataclass(frozen=True)
class FleetProxy:
    """Where devices connect (``public``) and the loopback SuperLink it forwards to (``upstream``)."""

    public_host: str
    public_port: int
    upstream_port: int
    certs: FleetCertificates

    def config(self, state_dir: Path) -> str:
        """nginx.conf: one TLS server, two allowed routes, nothing written outside ``state_dir``."""
        run = (state_dir / "proxy").resolve()
        logs = (state_dir / "logs").resolve()
        listen = f"[{self.public_host.strip('[]')}]" if ":" in self.public_host else self.public_host
        upstream = f"https://127.0.0.1:{self.upstream_port}"
        forward = f"""
            proxy_pass {upstream};
            proxy_http_version 1.1;
            proxy_ssl_trusted_certificate {self.certs.ca.resolve()};
            proxy_ssl_verify on;
            proxy_ssl_name localhost;
            proxy_ssl_server_name on;
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $remote_addr;
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout {FLEET_TIMEOUT_S}s;
            proxy_send_timeout {FLEET_TIMEOUT_S}s;"""
        return f"""# Written by dress-fleet for this coordinator run; edits are overwritten at the next start.
daemon off;
master_process on;
worker_processes 1;
{"user nobody nogroup;" if os.geteuid() == 0 else ""}
pid {run / "nginx.pid"};
error_log {logs / "proxy.log"} warn;
events {{ worker_connections 1024; }}
http {{
    access_log {logs / "proxy-access.log"};
    server_tokens off;
    client_body_temp_path {run / "body"};
    proxy_temp_path {run / "proxy"};
    fastcgi_temp_path {run / "fastcgi"};
    uwsgi_temp_path {run / "uwsgi"};
    scgi_temp_path {run / "scgi"};
    client_max_body_size {MAX_BODY};
    server {{
        listen {listen}:{self.public_port} ssl;
        ssl_certificate {self.certs.server_cert.resolve()};
        ssl_certificate_key {self.certs.server_key.resolve()};
        ssl_protocols TLSv1.2 TLSv1.3;
        # SuperNodes call only these: register/activate/heartbeat/pull/push, each signed by the node's key
        location /v1/fleet/ {{
            limit_except POST {{ deny all; }}{forward}
        }}
        location = /health {{
            limit_except GET {{ deny all; }}{forward}
        }}
        # the Control API (run, stop, ls, supernode register/unregister), runtime API and docs stay on loopback
        location / {{ return 404; }}
    }}
}}
"""

    def start(self, state_dir: Path) -> fr.ManagedProcess:
        """Write the config, test it with ``nginx -t``, then run nginx in the foreground under our reaper, so it
        dies with the coordinator; returns once it answers ``/health`` on the public address."""
        binary = nginx_binary()
        fr.require_free_port(self.public_host, self.public_port, "fleet proxy (nginx)")
        run = state_dir / "proxy"
        run.mkdir(parents=True, exist_ok=True, mode=0o700)
        (state_dir / "logs").mkdir(parents=True, exist_ok=True)
        conf = run / "nginx.conf"
        atomic_write(conf, lambda tmp: tmp.write_text(self.config(state_dir)))
        cmd = [binary, "-e", str((state_dir / "logs" / "proxy.log").resolve()), "-p", str(run.resolve()),
               "-c", str(conf.resolve())]
        checked = subprocess.run([*cmd, "-t"], capture_output=True, text=True, timeout=30)
        if checked.returncode != 0:
            raise RuntimeError(f"nginx refused the fleet proxy's configuration {conf}:\n{checked.stderr.strip()}")
        proc = fr.ManagedProcess("fleet proxy", cmd, os.environ, state_dir / "logs" / "proxy.out")
        here = fr.local_host(self.public_host)
        fr.wait_healthy(proc, f"https://{here}:{self.public_port}/health", https_context(self.certs.ca))
        return proc
