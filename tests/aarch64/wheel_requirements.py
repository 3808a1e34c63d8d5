"""What a wheel asks of the device root (tests/aarch64/run.sh), read from its METADATA on the host.

    python wheel_requirements.py WHEEL TORCH STAMP TEST_REQUIREMENTS

STAMP gets what the device root installs: the wheel's own requirements (no extra), the two below and TORCH (its
environment is rebuilt when that changes);
TEST_REQUIREMENTS gets the dev extra's pytest and hypothesis as the wheel pins them: what the kernel tests need
beyond the device's own install (the rest of the dev extra is for the x86 suite and may not have aarch64 wheels).
"""

from __future__ import annotations

import sys
import zipfile
from email import message_from_bytes
from pathlib import Path

from packaging.requirements import Requirement

TEST_TOOLS = {"pytest", "hypothesis"}


def main(wheel: Path, torch: str, stamp: Path, test_requirements: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        requires = message_from_bytes(z.read(meta)).get_all("Requires-Dist") or []
    parsed = [Requirement(r) for r in requires]
    own = [r for r in parsed if r.marker is None or r.marker.evaluate({"extra": ""})]
    tools = [r for r in parsed if r.name in TEST_TOOLS and r.marker is not None and r.marker.evaluate({"extra": "dev"})]
    if {r.name for r in tools} != TEST_TOOLS:
        sys.exit(f"{wheel.name}'s dev extra lacks {sorted(TEST_TOOLS - {r.name for r in tools})}")
    test_requirements.write_text("".join(f"{r.name}{r.specifier}\n" for r in tools))
    stamp.write_text("".join(f"{r}\n" for r in [*own, *tools]) + torch + "\n")


if __name__ == "__main__":
    if len(sys.argv) != 5:
        sys.exit(__doc__)
    main(Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]))
