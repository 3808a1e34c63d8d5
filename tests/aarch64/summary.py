"""The aarch64 run's outcome as one JSON (tests/aarch64/run.sh writes it where DRESS_AARCH64_RESULTS says, e.g.
benchmarks/results/aarch64.json): kernel test cases and failures from pytest's JUnit XML, the served model's
comparison with x86, and the wheel that was installed.

    python summary.py JUNIT_XML CHECK_JSON WHEEL SECONDS OUT
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from benchmarks.common import machine, write_json


def main(junit: Path, check: Path, wheel: str, seconds: float, out: Path) -> None:
    suites = ET.parse(junit).getroot()
    suites = [suites] if suites.tag == "testsuite" else list(suites)
    count = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    served = json.loads(check.read_text())
    write_json(out, {
        "command": "make test-aarch64 DRESS_AARCH64_RESULTS=benchmarks/results/aarch64.json",
        "machine": machine(),
        "emulated": "aarch64, qemu-user (binfmt_misc), Debian bookworm arm64 roots",
        "cases": count["tests"], "failures": count["failures"] + count["errors"], "skipped": count["skipped"],
        "max_rel_err": served["max_rel_err"], "agent_outputs_match": served["agent_outputs_match"],
        "served_tolerance": {"rtol": served["rtol"], "atol": served["atol"]},
        "wheel_installed": True, "wheel": wheel, "wall_s": seconds,
    })


if __name__ == "__main__":
    if len(sys.argv) != 6:
        sys.exit(__doc__)
    main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], float(sys.argv[4]), Path(sys.argv[5]))
