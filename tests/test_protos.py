"""The committed generated code is what protos/generate.py makes now, and imports as a package."""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def _load_generate():
    spec = importlib.util.spec_from_file_location("protos_generate", REPO_ROOT / "protos" / "generate.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    generated = _load_generate().generate(tmp_path)
    assert {"control_plane_pb2.py", "control_plane_pb2.pyi", "control_plane_pb2_grpc.py"} <= {p.name for p in generated}
    for fresh in generated:
        committed = REPO_ROOT / fresh.relative_to(tmp_path)
        assert committed.exists(), f"{committed} is not committed; run python protos/generate.py"
        assert committed.read_bytes() == fresh.read_bytes(), f"{committed} is stale; run python protos/generate.py"


def test_generated_code_imports_as_a_package() -> None:
    from protos.dress.fleet.v1 import control_plane_pb2, control_plane_pb2_grpc

    assert control_plane_pb2.DESCRIPTOR.package == "dress.fleet.v1"
    service = control_plane_pb2.DESCRIPTOR.services_by_name["ControlPlane"]
    assert service.full_name == "dress.fleet.v1.ControlPlane"
    assert [m.name for m in service.methods] == ["Describe", "Register", "Heartbeat", "FetchModel"]
    assert service.methods_by_name["FetchModel"].server_streaming
    assert hasattr(control_plane_pb2_grpc, "ControlPlaneStub")
    grpc_source = (REPO_ROOT / "protos/dress/fleet/v1/control_plane_pb2_grpc.py").read_text()
    assert "from protos.dress.fleet.v1 import control_plane_pb2" in grpc_source
    assert "flwr" not in grpc_source


def test_doubles_keep_densities_exact() -> None:
    """The architecture's densities are the one place the numbers travel: a level indexes them on both sides."""
    from protos.dress.fleet.v1 import control_plane_pb2 as pb

    densities = [0.1, 1 / 3, 0.25 + 1e-12, 1.0]
    wire = pb.Architecture(densities=densities).SerializeToString()
    assert list(pb.Architecture.FromString(wire).densities) == densities
