"""Strangers at a TLS coordinator's public SuperLink address, from another host: the coordinator runs in a
network namespace of its own with `dress-fleet coordinator start --host ADDRESS --certs ...`, a stranger in a
second one (benchmarks/stranger_probe.py) tries Flower's CLI, raw HTTP on every route prefix and fuzzed Fleet
requests. Refused: a CLI call that fails, an HTTP answer that is not 2xx (GET /health is public and not counted).
The coordinator must be alive and its SuperLink healthy afterwards.

    python -m benchmarks.superlink_strangers --fuzz 200
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.netns import hosts, unavailable
from contracts.settings import APP_DIR
from runtime.certificates import init_certificates

BIN = Path(sys.executable).parent
PORT, CONTROL_PORT = 9092, 9093


def _wait_for(path: Path, text: str, proc: subprocess.Popen, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while text not in (path.read_text(errors="replace") if path.exists() else ""):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the coordinator did not start:\n{path.read_text(errors='replace')[-3000:]}")
        time.sleep(0.5)


def superlink_strangers(fuzz: int, seed: int) -> dict[str, Any]:
    """What strangers on another host get from the coordinator's public SuperLink address."""
    if reason := unavailable():
        return {"skipped": reason}
    with tempfile.TemporaryDirectory(prefix="superlink-strangers-") as tmp, hosts("coordinator", "stranger") as net:
        root = Path(tmp)
        address = net.address("coordinator")
        certs = init_certificates(root / "certs", [address])
        state = root / "state"
        env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "PYTHONUNBUFFERED": "1"}
        log = root / "coordinator.log"
        coordinator = subprocess.Popen(net.command("coordinator", [
            str(BIN / "dress-fleet"), "coordinator", "start", "--host", address, "--superlink-port", str(PORT),
            "--control-port", str(CONTROL_PORT), "--certs", str(certs.directory), "--state-dir", str(state),
            "--rounds", "1", "--min-devices", "1"]), stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=env,
            start_new_session=True)  # fmt: skip
        try:
            _wait_for(log, "submitted", coordinator)
            probed = net.run("stranger", [sys.executable, str(Path(__file__).with_name("stranger_probe.py")),
                                          "--address", f"{address}:{PORT}", "--ca", str(certs.ca),
                                          "--app", str(APP_DIR), "--fuzz", str(fuzz), "--seed", str(seed)],
                             capture_output=True, text=True, env=env, timeout=1800)
            if probed.returncode != 0:
                raise RuntimeError(f"the stranger's probe failed:\n{probed.stderr[-3000:]}")
            answer = json.loads(probed.stdout.strip().splitlines()[-1])
            time.sleep(2)  # a stop that got through would take the coordinator down within this
            runs = net.run("coordinator", [sys.executable, "-c", (
                "import json, sys; from pathlib import Path; from runtime.processes import flwr; "
                "print(json.dumps(flwr(Path(sys.argv[1]), 'ls', 'local')))"), str(state)],
                capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
            listed = json.loads(runs.stdout.strip().splitlines()[-1]) if runs.returncode == 0 else {}
            alive = coordinator.poll() is None and len(listed.get("runs", [])) == 1  # only the operator's run
        finally:
            coordinator.terminate()
            try:
                coordinator.wait(timeout=60)
            except subprocess.TimeoutExpired:
                coordinator.kill()
    probes = answer["probes"]
    let_through = [p for p in probes if not p["refused"]]
    statuses: dict[str, int] = {}
    for p in probes:
        key = str(p.get("status", "cli"))
        statuses[key] = statuses.get(key, 0) + 1
    return {"tried": len(probes), "refused": len(probes) - len(let_through), "coordinator_alive": alive,
            "health_public": answer["health"], "answers": dict(sorted(statuses.items())),
            "let_through": [p["probe"] for p in let_through][:20], "fuzzed": fuzz}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fuzz", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    print(json.dumps(superlink_strangers(args.fuzz, args.seed), indent=2))


if __name__ == "__main__":
    main()
