"""What every benchmark records beside its numbers: the machine and the exact command."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shlex
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import torch

from contracts.settings import task_name
from dress_model.checkpoint import atomic_write
from dress_model.models import MODELS, Architecture


@dataclass(frozen=True)
class Task:
    """What a benchmark learns: a dataset and a model at a width; its name is what result rows carry."""

    dataset: str
    model: str
    width: int = Architecture.width

    @property
    def name(self) -> str:
        return task_name(self.dataset, self.model, self.width)


def parse_task(name: str) -> Task:
    """``DATASET-MODEL`` or ``DATASET-MODEL-wWIDTH`` (``fashion-mnist-cnn-w4``) as a Task."""
    parts = name.split("-")
    width = Architecture.width
    if len(parts) > 2 and parts[-1][:1] == "w" and parts[-1][1:].isdigit():
        width = int(parts.pop()[1:])
    if len(parts) < 2 or parts[-1] not in MODELS or width < 1:
        raise ValueError(f"task {name!r}: expected DATASET-MODEL[-wWIDTH] with MODEL one of {sorted(MODELS)} and "
                         "WIDTH a positive integer, e.g. fashion-mnist-cnn-w4")
    return Task("-".join(parts[:-1]), parts[-1], width)


def machine() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def command() -> str:
    """How this run was started, as a reader runs it from the repository: ``python -m benchmarks.NAME ARGS``."""
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    head = f"-m {spec.name}" if spec is not None and spec.name else shlex.quote(sys.argv[0])
    return " ".join(["python", head, *(shlex.quote(a) for a in sys.argv[1:])])


def hms(seconds: float) -> str:
    minutes, s = divmod(int(seconds), 60)
    return f"{minutes // 60}h{minutes % 60:02d}m{s:02d}s"


def write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2) + "\n"))


def markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = [f"{r[c]:.2f}" if isinstance(r[c], float) else str(r[c]) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def median_us(
    fns: dict[str, Callable[[], object]], budget_s: float, min_rounds: int, max_rounds: int, block: int = 5
) -> dict[str, float]:
    """Median microseconds per call over rounds in which every candidate runs a short block of calls.

    Rounds alternate the candidates so a CPU shared with other work slows them alike; within a block
    the first call is not recorded, as it mostly pays for refilling caches the other candidates used.
    """
    for fn in fns.values():
        fn()
    start = time.perf_counter()
    for fn in fns.values():
        fn()
    per_round = (time.perf_counter() - start) * (block + 1)
    rounds = max(min_rounds, min(max_rounds, int(budget_s / max(per_round, 1e-9))))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            fn()
            for _ in range(block):
                t = time.perf_counter()
                fn()
                samples[name].append(time.perf_counter() - t)
    return {name: statistics.median(s) * 1e6 for name, s in samples.items()}


@contextlib.contextmanager
def peak_rss_above_idle() -> Iterator[list[float]]:
    """MB of resident memory the block took above where the process was, sampled while it ran (what it frees
    before it ends counts too): the one number in the yielded list, once the block is done."""
    process = psutil.Process()
    idle = process.memory_info().rss
    peak, done, result = idle, threading.Event(), [0.0]

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, process.memory_info().rss)
            time.sleep(0.0005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield result
    finally:
        done.set()
        sampler.join()
        result[0] = (max(peak, process.memory_info().rss) - idle) / 2**20
