"""Real-time density on the device: a deadline-carrying request stream replayed over budget traces, per policy.

Measured for real on this machine (``measure``):
- every subnet's batch-1 forward latency with 0, 1 and 2 busy background processes (what a foreground app
  does to a phone's cores), the densities interleaved so a burst of outside load lands on all of them alike,
  one pass per request interval: between requests a server sleeps, and the scheduler lets a waking sleeper
  run ahead of busy processes; passes timed back to back make the timing loop a busy process itself, preempted
  like the background ones, with a tail the replayed stream would not see;
- the time to load a separately stored pruned model of each density, under each load;
- which test images each subnet classifies correctly.

Replayed (``replay``, seeded): a trace says the load level over time; a request arrives every ``INTERVAL_MS``
with the same deadline; the policy picks the subnet that answers; the request's latency is drawn from that
subnet's measured samples at the load of its moment, plus any wait behind the previous request or a model
reload (one request at a time, as the agent's forward lock serves them). A request misses when its answer
comes later than its deadline; its accuracy is whether the answering subnet got its test image right.

Policies:
- ``static-dense`` / ``static-smallest``: one subnet whatever happens.
- ``coordinator``: today's heartbeat-driven assignment — every ``HEARTBEAT_S`` the densest subnet whose measured
  median latency at the load of that moment meets the deadline (an idealised coordinator: it knows the exact
  cost, but only every heartbeat).
- ``reload-pruned``: the same choice at every load change, made at once, but each change loads a separately
  stored pruned model, and requests wait for the load.
- ``dress-local``: the agent's own ``LatencyModel`` (calibrated at idle; the largest slowdown of its last
  passes), per request the densest subnet it expects to meet the deadline — what ``ServedModel.predict`` does.
"""

from __future__ import annotations

import base64
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agent.latency import LatencyModel
from dress_model.data import ImageDataset
from dress_model.packed import PackedModel

LOADS = (0, 1, 2)  # busy background processes
INTERVAL_MS = 20.0  # one request every 20 ms: 50 requests a second
HEARTBEAT_S = 5.0  # the agent's default heartbeat period
TRACE_S = 60.0
POLICIES = ("static-dense", "static-smallest", "reload-pruned", "coordinator", "dress-local")


@contextmanager
def background_load(processes: int) -> Iterator[None]:
    """``processes`` busy-looping interpreters for the duration (killed on the way out, whatever happens)."""
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(processes)]
    try:
        time.sleep(0.3 if hogs else 0.0)  # let the scheduler see them
        yield
    finally:
        for hog in hogs:
            hog.kill()
        for hog in hogs:
            hog.wait()


@dataclass
class Measured:
    """What the replay draws from: latency samples (ms) per load and density, reload ms, right answers."""

    latency: dict[int, dict[float, np.ndarray]]
    reload_ms: dict[int, dict[float, float]]
    correct: dict[float, np.ndarray]  # per density: one bool per test image

    @property
    def densities(self) -> tuple[float, ...]:
        return tuple(sorted(self.correct))

    def median_ms(self, load: int, density: float) -> float:
        return float(np.median(self.latency[load][density]))

    def to_json(self) -> dict[str, Any]:
        """Everything the replay draws from, so that a policy can be replayed later without measuring again."""
        return {"latency_ms": {str(load): {f"{d:g}": [float(ms) for ms in samples] for d, samples in row.items()}
                               for load, row in self.latency.items()},
                "reload_ms": {str(load): {f"{d:g}": ms for d, ms in row.items()} for load, row in self.reload_ms.items()},
                "images": len(next(iter(self.correct.values()))),
                "correct": {f"{d:g}": base64.b64encode(np.packbits(c)).decode() for d, c in self.correct.items()}}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Measured:
        """What ``to_json`` wrote; a KeyError or ValueError names a file that is not such samples."""
        images = int(data["images"])
        return cls(
            latency={int(load): {float(d): np.array(samples, dtype=float) for d, samples in row.items()}
                     for load, row in data["latency_ms"].items()},
            reload_ms={int(load): {float(d): float(ms) for d, ms in row.items()} for load, row in data["reload_ms"].items()},
            correct={float(d): np.unpackbits(np.frombuffer(base64.b64decode(bits), dtype=np.uint8))[:images].astype(bool)
                     for d, bits in data["correct"].items()},
        )


def measure(packed: PackedModel, test: ImageDataset, samples: int, progress: Callable[[str], None]) -> Measured:
    densities = tuple(sorted(packed.densities))
    images = test.images
    correct = {}
    for d in densities:
        packed.set_density(d)
        predictions = torch.cat([packed(images[i : i + 500]).argmax(1) for i in range(0, len(test), 500)])
        correct[d] = (predictions == test.labels).numpy()
    latency: dict[int, dict[float, np.ndarray]] = {}
    reload_ms: dict[int, dict[float, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        dense = packed.to_dress().eval()
        files = {d: PackedModel.from_dress(dense, max_density=d).save(Path(tmp) / f"pruned-{d:g}.dress") for d in densities}
        for load in LOADS:
            progress(f"latency with {load} busy background process(es)")
            times: dict[float, list[float]] = {d: [] for d in densities}
            with background_load(load):
                due = time.perf_counter()
                for i in range(samples + 5):
                    x = images[i % len(test)].unsqueeze(0)
                    for d in densities:
                        packed.set_density(d)
                        due += INTERVAL_MS / 1000  # one pass per request interval, as the replayed stream
                        time.sleep(max(0.0, due - time.perf_counter()))
                        start = time.perf_counter()
                        packed(x)
                        if i >= 5:  # warm-up passes are not recorded
                            times[d].append(round(1000 * (time.perf_counter() - start), 4))  # as kept: to_json
                reloads = {d: [] for d in densities}
                for _ in range(5):
                    for d in densities:
                        start = time.perf_counter()
                        loaded = PackedModel.load(files[d])
                        loaded(images[:1])  # the first answer of the new model is part of switching to it
                        reloads[d].append(1000 * (time.perf_counter() - start))
            latency[load] = {d: np.array(t) for d, t in times.items()}
            reload_ms[load] = {d: statistics.median(r) for d, r in reloads.items()}
    packed.set_density(densities[-1])
    return Measured(latency, reload_ms, correct)


# -- traces: load level over time ---------------------------------------------------------------------------

Trace = Callable[[float], int]


def steady(_: float) -> int:
    """One background app the whole time."""
    return 1


def bursty(seed: int) -> Trace:
    """Idle, with bursts of 1-4 s in which a foreground app takes both cores, 2-8 s apart (seeded)."""
    rng = np.random.default_rng(seed)
    bursts, t = [], float(rng.uniform(1, 4))
    while t < TRACE_S:
        length = float(rng.uniform(1, 4))
        bursts.append((t, t + length))
        t += length + float(rng.uniform(2, 8))
    return lambda now: 2 if any(a <= now < b for a, b in bursts) else 0


def battery_drain(now: float) -> int:
    """Power saving steps in as the battery drains: full speed, then one core's worth of slowdown, then two."""
    return min(2, int(3 * now / TRACE_S))


def traces(seed: int) -> dict[str, Trace]:
    return {"steady": steady, "bursty": bursty(seed), "battery-drain": battery_drain}


# -- the replay ---------------------------------------------------------------------------------------------


def _fitting(measured: Measured, load: int, deadline_ms: float) -> float:
    """The densest subnet whose median latency at ``load`` meets the deadline, else the sparsest."""
    fits = [d for d in measured.densities if measured.median_ms(load, d) <= deadline_ms]
    return max(fits, default=measured.densities[0])


def replay(measured: Measured, trace: Trace, policy: str, deadline_ms: float, seed: int) -> dict[str, float]:
    """miss_rate and accuracy (percent) and p99_ms of the responses, for one policy over one trace."""
    rng = np.random.default_rng(seed)
    densities = measured.densities
    calibration = {d: measured.median_ms(0, d) for d in densities}  # what the agent measured when it started
    local = LatencyModel(calibration)
    served = densities[-1] if policy != "static-smallest" else densities[0]
    if policy in ("coordinator", "reload-pruned"):
        served = _fitting(measured, trace(0.0), deadline_ms)
    next_heartbeat, last_load = HEARTBEAT_S, trace(0.0)
    free_at = 0.0  # ms: when the previous request (or a reload) is done
    responses, right = [], 0
    n = int(TRACE_S * 1000 / INTERVAL_MS)
    for i in range(n):
        arrival = i * INTERVAL_MS
        load = trace(arrival / 1000)
        if policy == "coordinator" and arrival / 1000 >= next_heartbeat:
            served = _fitting(measured, load, deadline_ms)
            next_heartbeat += HEARTBEAT_S
        if policy == "reload-pruned" and load != last_load:
            wanted = _fitting(measured, load, deadline_ms)
            if wanted != served:
                free_at = max(free_at, arrival) + measured.reload_ms[load][wanted]
                served = wanted
        last_load = load
        density = served
        if policy == "dress-local":
            density = local.densest_within(densities, 1, deadline_ms) or densities[0]
        samples = measured.latency[load][density]
        service = float(samples[rng.integers(len(samples))])
        if policy == "dress-local":
            local.observe(density, 1, service)
        start = max(arrival, free_at)
        free_at = start + service
        responses.append(free_at - arrival)
        correct = measured.correct[density]
        right += bool(correct[i % len(correct)])
    times = np.array(responses)
    return {"miss_rate": round(100.0 * float((times > deadline_ms).mean()), 2),
            "accuracy": round(100.0 * right / n, 2), "p99_ms": round(float(np.percentile(times, 99)), 3)}


def run(measured: Measured, deadline_ms: float, seed: int) -> list[dict[str, object]]:
    rows = []
    for name, trace in traces(seed).items():
        for policy in POLICIES:
            rows.append({"trace": name, "policy": policy, **replay(measured, trace, policy, deadline_ms, seed)})
    return rows
