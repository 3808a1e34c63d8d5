"""Device profiles, kept as data in profiles.toml so adding a device kind needs no code change, and a fleet's mix of
them (which device of a simulated fleet is which profile: the simulation and the `profile` partition agree)."""

from __future__ import annotations

import functools
import random
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dress_model.partition import largest_remainders

PROFILES_PATH = Path(__file__).with_name("profiles.toml")


class UnknownProfileError(ValueError):
    """A profile name that is not in the profiles file; the message lists the valid ones."""


@dataclass(frozen=True, slots=True)
class Range:
    """A closed [low, high] interval of typical budget values."""

    low: float
    high: float

    def __post_init__(self) -> None:
        if not 0 < self.low <= self.high:
            raise ValueError(f"range must satisfy 0 < low <= high, got [{self.low}, {self.high}]")


@dataclass(frozen=True, slots=True)
class Profile:
    """What the coordinator expects from one kind of device."""

    name: str
    description: str
    cores: int
    memory_mb: int
    relative_speed: float  # inference throughput relative to laptop-x86 = 1.0
    budget_latency_ms: Range
    budget_memory_mb: Range
    battery: bool


_FIELDS = {"description", "cores", "memory_mb", "relative_speed", "budget_latency_ms", "budget_memory_mb", "battery"}


def _parse(name: str, raw: dict[str, Any]) -> Profile:
    """Build one profile, failing loudly on typos so a bad profiles file never half-loads."""
    if set(raw) != _FIELDS:
        missing, extra = sorted(_FIELDS - set(raw)), sorted(set(raw) - _FIELDS)
        raise ValueError(f"profile {name!r}: missing keys {missing}, unknown keys {extra}")
    profile = Profile(
        name=name,
        description=str(raw["description"]),
        cores=int(raw["cores"]),
        memory_mb=int(raw["memory_mb"]),
        relative_speed=float(raw["relative_speed"]),
        budget_latency_ms=Range(*map(float, raw["budget_latency_ms"])),
        budget_memory_mb=Range(*map(float, raw["budget_memory_mb"])),
        battery=bool(raw["battery"]),
    )
    if profile.cores < 1 or profile.memory_mb < 1 or profile.relative_speed <= 0:
        raise ValueError(f"profile {name!r}: cores, memory_mb and relative_speed must be positive")
    return profile


@functools.cache
def load_profiles(path: Path = PROFILES_PATH) -> dict[str, Profile]:
    """All profiles by name; cached because every registration looks one up."""
    with open(path, "rb") as f:
        data = tomllib.load(f)
    return {name: _parse(name, raw) for name, raw in data.items()}


def get_profile(name: str, path: Path = PROFILES_PATH) -> Profile:
    """The named profile, or UnknownProfileError that lists the valid names."""
    profiles = load_profiles(path)
    try:
        return profiles[name]
    except KeyError:
        raise UnknownProfileError(
            f"unknown device profile {name!r}; valid profiles: {', '.join(sorted(profiles))}"
        ) from None


MIX_HELP = "comma-separated PROFILE=PERCENT pairs summing to 100, e.g. pi4=40,jetson-nano=30,phone=30"


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
    counts = largest_remainders({name: share * devices for name, share in mix.items()}, devices)
    names = [name for name, count in counts.items() for _ in range(count)]
    random.Random(seed).shuffle(names)
    return names
