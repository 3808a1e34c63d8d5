"""benchmarks/results/README.md lists every result file, and every command a result gives runs from the repository
(``python -m benchmarks.NAME``, or a ``make`` target such as ``make test-aarch64``; no temporary paths)."""

from __future__ import annotations

import json
import re
from pathlib import Path

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"


def test_every_result_file_is_in_the_index() -> None:
    index = (RESULTS / "README.md").read_text()
    listed = set(re.findall(r"`([a-z0-9-]+)(?:\.\{[a-z,]+\}|\.json|-\*\.png)", index))
    stems = {re.sub(r"-(iid|dirichlet[0-9.]+|labels[0-9]+|equal-.*)$", "", p.stem)
             for p in RESULTS.iterdir() if p.name != "README.md"}
    missing = {s for s in stems if not any(s == n or s.startswith(f"{n}-") for n in listed)}
    assert not missing, f"results not in benchmarks/results/README.md: {sorted(missing)}"


def test_every_result_gives_a_command_a_reader_can_run() -> None:
    for path in sorted(RESULTS.glob("*.json")):
        command = json.loads(path.read_text()).get("command", "")
        assert command, f"{path.name} records no command"
        for part in command.split(" && "):
            assert part.startswith(("python -m benchmarks.", "make ")), f"{path.name}: {part!r}"
            assert "/tmp" not in part, f"{path.name}: {part!r} names a temporary path"
