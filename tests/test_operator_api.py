"""The operator's listener over real HTTPS: only an operator's credential opens it; its metrics parse as
Prometheus' and follow the fleet (devices, heartbeats through the real control plane, rounds, refused updates);
the fleet pages; plaintext is loopback only."""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from conftest import architecture, enrolled
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from cli.fleet import app
from contracts.policy import Budget, CalibrationPoint
from coordinator.control_plane import serve
from coordinator.metrics import FleetMetrics
from coordinator.operator_api import MAX_PAGE, OperatorListener, operator_app
from coordinator.registry import Registry
from coordinator.validation import REFUSALS
from protos.dress.fleet.v1 import control_plane_pb2 as pb
from runtime.certificates import CertificateError, init_certificates
from runtime.processes import pick_port

ARCH = architecture("cnn", "0.1,0.25,0.5,1", "fashion-mnist", 4)
CALIBRATION = [pb.CalibrationPoint(level=level, latency_ms=100 * d, memory_mb=800 * d)
               for level, d in enumerate(ARCH.densities)]


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


class Fleet:
    def __init__(self, tmp_path: Path, reference: dict[float, float] | None = None) -> None:
        self.state = tmp_path / "state"
        self.registry = Registry(state_dir=self.state)
        certs = init_certificates(tmp_path / "certs", ["127.0.0.1"])
        self.context = ssl.create_default_context(cafile=str(certs.ca))
        metrics = FleetMetrics(self.registry)
        self.control_port, port = pick_port(), pick_port()
        self.control = serve(self.registry, "127.0.0.1", self.control_port, ARCH, lambda v, d, h: b"", metrics=metrics)
        self.listener = OperatorListener(operator_app(self.registry, metrics, reference=reference), "127.0.0.1",
                                         port, certs).start()
        self.url = f"https://127.0.0.1:{port}"

    def get(self, path: str, credential: str | None, follow: bool = True, cookie: str | None = None) -> tuple[int, str]:
        headers = {"Authorization": f"Bearer {credential}"} if credential is not None else {}
        if cookie:
            headers["Cookie"] = cookie
        opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=self.context),
                                             *([] if follow else [NoRedirect()]))
        try:
            with opener.open(urllib.request.Request(self.url + path, headers=headers), timeout=10) as reply:
                return reply.status, reply.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def post_login(self, credential: str) -> tuple[int, str]:
        """The login form's answer: its status and the cookie it sets."""
        opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=self.context), NoRedirect())
        data = urllib.parse.urlencode({"credential": credential}).encode()
        try:
            with opener.open(urllib.request.Request(self.url + "/login", data=data), timeout=10) as reply:
                return reply.status, reply.headers.get("set-cookie", "")
        except urllib.error.HTTPError as e:
            return e.code, e.headers.get("set-cookie", "")

    def metrics(self, credential: str) -> dict[str, dict[tuple, float]]:
        status, text = self.get("/metrics", credential)
        assert status == 200, text
        return {family.name: {tuple(sorted(s.labels.items())) + ((("sample", s.name),) if family.type == "histogram"
                                                                  else ()): s.value for s in family.samples}
                for family in text_string_to_metric_families(text)}

    def close(self) -> None:
        self.listener.stop()
        self.control.stop(grace=None).wait()
        self.registry.close()


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    fleet = Fleet(tmp_path)
    yield fleet
    fleet.close()


def test_only_an_operators_credential_opens_the_listener(fleet: Fleet) -> None:
    runner = CliRunner()
    added = runner.invoke(app, ["operators", "add", "alice", "--credential-only", "--state-dir", str(fleet.state)])
    assert added.exit_code == 0, added.output
    credential = added.output.strip()
    with grpc.insecure_channel(f"127.0.0.1:{fleet.control_port}") as channel:
        device = enrolled(channel, fleet.registry, "pi-1")
        device.Register(pb.RegisterRequest(name="pi-1", profile="pi4", calibration=CALIBRATION))
    for path in ("/metrics", "/api/devices", "/api/summary", "/api/rounds", "/api/devices/pi-1"):
        for stranger in (None, "", "dfo_" + "x" * 43, device.secret, credential + "x"):
            status, body = fleet.get(path, stranger)
            assert status == 401 and "operators add" in body, (path, stranger, status, body)
        assert fleet.get(path, credential)[0] == 200
    # a browser: the dashboard sends a stranger to sign in; a wrong credential is refused, the right one is a cookie
    for path in ("/", "/static/app.js"):
        assert fleet.get(path, None, follow=False)[0] == 303
    assert fleet.post_login("dfo_guessed")[0] == 401
    status, cookie = fleet.post_login(credential)
    assert status == 303 and "HttpOnly" in cookie and "SameSite=strict" in cookie and "Secure" in cookie
    page = fleet.get("/", None, cookie=cookie.split(";")[0])
    assert page[0] == 200 and "/static/app.js" in page[1]
    listed = runner.invoke(app, ["operators", "list", "--state-dir", str(fleet.state)])
    assert "alice" in listed.output and credential not in listed.output
    again = runner.invoke(app, ["operators", "add", "alice", "--credential-only", "--state-dir", str(fleet.state)])
    assert fleet.get("/metrics", credential)[0] == 401  # a new credential for alice: the old one is dead
    removed = runner.invoke(app, ["operators", "remove", "alice", "--state-dir", str(fleet.state)])
    assert removed.exit_code == 0 and fleet.get("/metrics", again.output.strip())[0] == 401
    missing = runner.invoke(app, ["operators", "remove", "alice", "--state-dir", str(fleet.state)])
    assert missing.exit_code == 2 and "no operator named 'alice'" in missing.output
    bad = runner.invoke(app, ["operators", "add", "bad name!", "--state-dir", str(fleet.state)])
    assert bad.exit_code == 2 and "operator name" in bad.output


def test_metrics_follow_the_fleet_devices_heartbeats_rounds_and_refusals(fleet: Fleet) -> None:
    credential = fleet.registry.add_operator("prometheus")
    before = fleet.metrics(credential)
    assert before["dress_rounds"] == {(): 0.0} and before["dress_heartbeats"] == {(): 0.0}
    assert before["dress_refused_updates"] == {(("reason", kind),): 0.0 for kind in REFUSALS}
    with grpc.insecure_channel(f"127.0.0.1:{fleet.control_port}") as channel:
        devices = {name: enrolled(channel, fleet.registry, name) for name in ("pi-1", "pi-2", "laptop")}
        ids = {name: stub.Register(pb.RegisterRequest(name=name, profile="laptop-x86" if name == "laptop" else "pi4",
                                                      calibration=CALIBRATION)).device_id
               for name, stub in devices.items()}
        for _ in range(3):
            devices["laptop"].Heartbeat(pb.HeartbeatRequest(budget=pb.Budget(latency_ms=1000, memory_mb=4000)))
    fleet.registry.record_round(1, {ids["pi-1"]: 0.1, ids["laptop"]: 1.0}, {1.0: {"accuracy": 50.0}}, 3000, 1000,
                                details={"wall_s": 12.0, "refused": {"outlier": 1}, "withheld": None})
    fleet.registry.record_round(2, {ids["laptop"]: 1.0}, {1.0: {"accuracy": 60.0}}, 2000, 900,
                                details={"wall_s": 45.0, "refused": {"outlier": 1, "examples": 2},
                                         "withheld": "the aggregate was implausible"})
    after = fleet.metrics(credential)
    assert after["dress_heartbeats"] == {(): 3.0}
    assert sum(after["dress_devices"].values()) == 3
    # the laptop's budget fits d=1
    assert after["dress_devices"][(("density", "1"), ("profile", "laptop-x86"), ("status", "online"))] == 1.0
    assert after["dress_rounds"] == {(): 2.0} and after["dress_rounds_withheld"] == {(): 1.0}
    assert after["dress_round_participants"] == {(("density", "1"),): 1.0}  # the last round's
    assert after["dress_round_bytes"] == {(("direction", "down"),): 5000.0, (("direction", "up"),): 1900.0}
    refused = {labels[0][1]: value for labels, value in after["dress_refused_updates"].items()}
    assert refused == {**dict.fromkeys(REFUSALS, 0.0), "outlier": 2.0, "examples": 2.0}
    durations = after["dress_round_duration_seconds"]
    assert durations[(("le", "20"), ("sample", "dress_round_duration_seconds_bucket"))] == 1.0
    assert durations[(("le", "60"), ("sample", "dress_round_duration_seconds_bucket"))] == 2.0
    assert durations[(("sample", "dress_round_duration_seconds_sum"),)] == 57.0


def test_the_fleet_comes_in_pages(fleet: Fleet) -> None:
    credential = fleet.registry.add_operator("alice")
    points = [CalibrationPoint(d, 100 * d, 800 * d) for d in ARCH.densities]
    for name, token in fleet.registry.enroll([f"pi-{i:02d}" for i in range(12)]).items():
        fleet.registry.enroll_device(token, name, "pi4", points)
    status, body = fleet.get("/api/devices?offset=10&limit=5", credential)
    page = json.loads(body)
    assert status == 200 and page["total"] == 12 and [d["name"] for d in page["devices"]] == ["pi-10", "pi-11"]
    assert page["devices"][0]["status"] == "online" and page["devices"][0]["profile"] == "pi4"
    for bad in (f"limit={MAX_PAGE + 1}", "limit=0", "offset=-1"):
        assert fleet.get(f"/api/devices?{bad}", credential)[0] == 422, bad


def test_plaintext_is_for_loopback_only() -> None:
    with pytest.raises(CertificateError, match="loopback only"):
        OperatorListener(operator_app(None, None), "0.0.0.0", pick_port(), None)  # type: ignore[arg-type]


def test_the_dashboard_json_follows_rounds_under_way_recorded_and_a_device(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path, reference={1.0: 90.0, 0.1: 85.0})
    try:
        credential = fleet.registry.add_operator("alice")
        points = [CalibrationPoint(d, 100 * d, 800 * d) for d in ARCH.densities]
        ids = {name: fleet.registry.enroll_device(token, name, "pi4" if name != "laptop" else "laptop-x86",
                                                  points)[0].device_id
               for name, token in fleet.registry.enroll(["pi-1", "pi-2", "laptop"]).items()}
        fleet.registry.start_round(1, {"pi-1": 0.1, "laptop": 1.0}, 60.0)
        summary = json.loads(fleet.get("/api/summary", credential)[1])
        assert summary["devices"] == {"online": 3} and summary["rounds"] == 0
        assert summary["densities"]["pi4"] == {"0.25": 2} and sum(summary["densities"]["laptop-x86"].values()) == 1
        under_way = summary["round_under_way"]
        assert under_way["round"] == 1 and under_way["sent"] == {"pi-1": 0.1, "laptop": 1.0}
        assert under_way["timeout_s"] == 60.0 and 0 <= under_way["elapsed_s"] < 60
        fleet.registry.record_round(1, {ids["laptop"]: 1.0}, {1.0: {"accuracy": 88.5}, 0.1: {"accuracy": 80.0}},
                                    100, 50, details={"participants": {"laptop": 1.0},
                                                      "rejected": {"pi-1": "update norm 9 over 5× the round's median"},
                                                      "wall_s": 30.0})
        summary = json.loads(fleet.get("/api/summary", credential)[1])
        assert summary["round_under_way"] is None and summary["rounds"] == 1  # recorded: no longer under way
        rounds = json.loads(fleet.get("/api/rounds", credential)[1])["rounds"]
        assert rounds[0]["accuracy"] == {"1": 88.5, "0.1": 80.0} and rounds[0]["gap"] == {"1": -1.5, "0.1": -5.0}
        assert rounds[0]["trained"] == {"laptop-x86": {"1": 1}} and "pi-1" in rounds[0]["rejected"]
        assert json.loads(fleet.get("/api/rounds?after=1", credential)[1])["rounds"] == []
        device = json.loads(fleet.get("/api/devices/pi-1", credential)[1])
        assert device["profile"] == "pi4" and device["history"][0]["reason"] == "registration"
        assert device["refused"] == [{"round": 1, "reason": "update norm 9 over 5× the round's median"}]
        assert fleet.get("/api/devices/nobody", credential)[0] == 404
        # the version each device is given, and the one it serves once its heartbeat says so
        assert device["given_version"] is None and device["model_version"] is None  # nothing published yet
        fleet.registry.add_model_version("v1", str(tmp_path / "v1.pt"), ARCH.densities)
        fleet.registry.heartbeat(ids["pi-1"], Budget(100.0, 800.0), served_version="v1")
        fleet.registry.heartbeat(ids["pi-2"], Budget(100.0, 800.0))  # still on the version before
        listed = {d["name"]: d for d in json.loads(fleet.get("/api/devices", credential)[1])["devices"]}
        assert (listed["pi-1"]["given_version"], listed["pi-1"]["model_version"]) == ("v1", "v1")
        assert (listed["pi-2"]["given_version"], listed["pi-2"]["model_version"]) == ("v1", None)
        assert json.loads(fleet.get("/api/devices/pi-1", credential)[1])["model_version"] == "v1"
        assert device["checks"] == []  # none reported yet
        fleet.registry.heartbeat(ids["pi-1"], Budget(100.0, 800.0), checks={("v1", 1.0): (256, 230),
                                                                             ("v1", 0.1): (256, 200)})
        checks = json.loads(fleet.get("/api/devices/pi-1", credential)[1])["checks"]
        assert [(c["version"], c["density"], c["examples"], c["accuracy"]) for c in checks] == [
            ("v1", 1.0, 256, 89.84), ("v1", 0.1, 256, 78.12)]
    finally:
        fleet.close()
