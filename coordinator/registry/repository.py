"""The registry's typed repository API, one facade over its parts: devices (``devices.py``), enrollment and
authentication (``enrollment.py``), operators (``operators.py``), staged rollouts (``rollouts.py``), rounds and model versions (``rounds.py``), on one database (``store.py``)."""

from __future__ import annotations

from coordinator.registry.enrollment import Enrollments
from coordinator.registry.operators import Operators
from coordinator.registry.rollouts import Rollouts
from coordinator.registry.rounds import RoundRecords

__all__ = ["Registry"]


class Registry(Enrollments, RoundRecords, Operators, Rollouts):
    """Devices, their budgets and density history, enrollment, training rounds and model versions.

    Opens (and migrates) the database at `db_url`, or an embedded SQLite file under `state_dir`.
    Thread-safe: the control plane calls it from many server threads at once.
    """
