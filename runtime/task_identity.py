"""Flower's identity of the task a process runs (run, task, node), for building messages outside a Flower process.

Flower stamps every ``Message`` it builds with the identity of the app process that builds it; a benchmark or a
test that drives a strategy or a ClientApp in its own process must take on such an identity first, and give it
back after. Only Flower's public properties are used: an identity not set reads as None.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from flwr.supercore.task_identity import TaskIdentity

FIELDS = ("run_id", "task_id", "node_id")


def current() -> tuple[int | None, ...]:
    """The identity as set now, None where it is not."""
    values = []
    for field in FIELDS:
        try:
            values.append(getattr(TaskIdentity, field))
        except RuntimeError:  # not set
            values.append(None)
    return tuple(values)


@contextmanager
def task_identity(run_id: int = 1, task_id: int = 1, node_id: int = 1) -> Iterator[None]:
    """This process is a Flower task with this identity inside the block (a ServerApp's by default)."""
    saved = current()
    for field, value in zip(FIELDS, (run_id, task_id, node_id), strict=True):
        setattr(TaskIdentity, field, value)
    try:
        yield
    finally:
        for field, value in zip(FIELDS, saved, strict=True):
            setattr(TaskIdentity, field, value)
