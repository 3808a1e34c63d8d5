"""Operators: who may watch the fleet. Each holds a bearer credential the registry stores only as a digest, as a
device's; it opens the dashboard and the metrics, never the control plane."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import delete, insert, select, update

from contracts.credentials import OPERATOR_PREFIX, digest, new_secret
from contracts.naming import check_name
from coordinator.registry.errors import InvalidInputError
from coordinator.registry.models import Operator
from coordinator.registry.store import Store, utc_now


class Operators(Store):
    def add_operator(self, name: str) -> str:
        """A new credential for operator ``name``, the only copy there will be; an operator of that name already
        there keeps the name, and their old credential stops working. One transaction."""
        try:
            check_name(name)
        except ValueError as e:
            raise InvalidInputError(f"operator name: {e}") from e
        credential = new_secret(OPERATOR_PREFIX)
        with self._write() as conn:
            if not conn.execute(update(Operator).where(Operator.name == name)
                                .values(credential_sha256=digest(credential))).rowcount:
                conn.execute(insert(Operator).values(name=name, credential_sha256=digest(credential),
                                                     created_at=utc_now()))
        return credential

    def remove_operator(self, name: str) -> bool:
        """Whether there was an operator ``name``; their credential stops working."""
        with self._write() as conn:
            return bool(conn.execute(delete(Operator).where(Operator.name == name)).rowcount)

    def list_operators(self) -> list[tuple[str, datetime]]:
        """Every operator's name and when it was added, by name."""
        with self._read() as s:
            return [(row.name, row.created_at) for row in s.execute(
                select(Operator.name, Operator.created_at).order_by(Operator.name))]

    def operator_for(self, secret: str) -> str | None:
        """The operator whose credential ``secret`` is, or None."""
        if not secret.startswith(OPERATOR_PREFIX):
            return None
        with self._read() as s:
            return s.scalar(select(Operator.name).where(Operator.credential_sha256 == digest(secret)))
