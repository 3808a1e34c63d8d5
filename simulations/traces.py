"""Budget traces for virtual devices: how a device's latency and memory budget move during a run.

A trace is a list of (t_s, latency_ms, memory_mb, battery, online) points, step-interpolated in time.
Budgets are drawn relative to the device's own cost of the full model (its calibration), so a fleet of any
model size spreads over the densities: a device starts with headroom for somewhere between the sparsest and
the full subnet, then what happens to real devices happens to it:
battery drain (budget tightens as the battery empties), thermal throttling windows, background-load spikes,
and dropouts (offline windows). Everything is drawn from one seeded RNG per device: same seed, same fleet.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from contracts.profiles import Profile

MIX_HELP = "comma-separated PROFILE=PERCENT pairs summing to 100, e.g. pi4=40,jetson-nano=30,phone=30"


@dataclass(frozen=True)
class TracePoint:
    t_s: float
    latency_ms: float
    memory_mb: float
    battery: float | None
    online: bool


def parse_mix(spec: str, known: list[str]) -> dict[str, float]:
    """``pi4=40,phone=60`` -> {"pi4": 0.4, "phone": 0.6}; clear errors for anything else."""
    mix: dict[str, float] = {}
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        name, sep, share = part.partition("=")
        name = name.strip()
        if not sep:
            raise ValueError(f"bad mix entry {part!r}: expected PROFILE=PERCENT ({MIX_HELP})")
        if name not in known:
            raise ValueError(f"unknown device profile {name!r} in mix; expected one of {', '.join(sorted(known))}")
        if name in mix:
            raise ValueError(f"profile {name!r} appears twice in the mix")
        try:
            value = float(share)
        except ValueError:
            raise ValueError(f"bad share {share!r} for {name!r}: expected a number ({MIX_HELP})") from None
        if not 0 < value <= 100:
            raise ValueError(f"share for {name!r} must be in (0, 100], got {value:g}")
        mix[name] = value
    if not mix:
        raise ValueError(f"empty device mix; expected {MIX_HELP}")
    total = sum(mix.values())
    if abs(total - 100) > 1e-6:
        raise ValueError(f"device mix shares must sum to 100, got {total:g} ({MIX_HELP})")
    return {name: value / 100 for name, value in mix.items()}


def assign_profiles(mix: dict[str, float], devices: int, seed: int) -> list[str]:
    """Exactly round(share * devices) of each profile (largest remainders), shuffled by seed."""
    exact = {name: share * devices for name, share in mix.items()}
    counts = {name: int(v) for name, v in exact.items()}
    for name in sorted(exact, key=lambda n: exact[n] - counts[n], reverse=True)[: devices - sum(counts.values())]:
        counts[name] += 1
    names = [name for name, count in counts.items() for _ in range(count)]
    random.Random(seed).shuffle(names)
    return names


def make_trace(
    profile: Profile,
    full_latency_ms: float,
    full_memory_mb: float,
    duration_s: float,
    seed: int,
    step_s: float = 2.0,
    dropout: float = 0.1,
) -> list[TracePoint]:
    """One device's trace over ``duration_s`` seconds of run time; ``full_*`` is its cost at density 1."""
    rng = random.Random(seed)
    base_latency = full_latency_ms * rng.uniform(0.05, 1.3)
    base_memory = full_memory_mb * rng.uniform(0.15, 2.0)
    battery = rng.uniform(0.4, 1.0) if profile.battery else None
    drain = rng.uniform(0.0, 0.6) / max(duration_s, 1.0)  # battery fraction lost per second
    throttle_at = rng.uniform(0.2, 0.8) * duration_s
    throttle_len = rng.uniform(0.05, 0.2) * duration_s
    drop_at = rng.uniform(0.3, 0.9) * duration_s if rng.random() < dropout else None
    drop_len = rng.uniform(0.05, 0.15) * duration_s
    points = []
    t = 0.0
    while t <= duration_s:
        latency, memory = base_latency, base_memory
        level = None
        if battery is not None:
            level = max(0.0, battery - drain * t)
            if level < 0.3:  # low battery: the OS and the user want the cheap subnet
                latency *= 0.25 + level
        if throttle_at <= t < throttle_at + throttle_len:  # thermal throttling: everything runs slower
            latency *= 0.4
        if rng.random() < 0.1:  # background load spike
            latency *= rng.uniform(0.3, 0.7)
            memory *= rng.uniform(0.5, 0.9)
        online = not (drop_at is not None and drop_at <= t < drop_at + drop_len)
        points.append(TracePoint(round(t, 3), max(latency, 0.1), max(memory, 1.0), level, online))
        t += step_s
    return points


def at(trace: list[TracePoint], t_s: float) -> TracePoint:
    """The point in force at ``t_s`` (step interpolation; before the start, the first point)."""
    current = trace[0]
    for point in trace:
        if point.t_s > t_s:
            break
        current = point
    return current
