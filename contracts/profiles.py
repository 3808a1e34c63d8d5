"""Device profiles, kept as data in profiles.toml so adding a device kind needs no code change."""

from __future__ import annotations

import functools
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
