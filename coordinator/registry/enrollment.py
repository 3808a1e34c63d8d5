"""Enrollment and authentication: one-time tokens, the credential a token is spent for, who a secret proves the
caller is, and the SuperNode key registered for a device."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import timedelta

from sqlalchemy import Connection, insert, select, update

from contracts.credentials import CREDENTIAL_PREFIX, TOKEN_PREFIX, digest, new_secret
from contracts.naming import check_name
from contracts.policy import CalibrationPoint
from coordinator.registry.devices import DeviceRecords, supernode_fields
from coordinator.registry.errors import EnrollmentError, InvalidInputError
from coordinator.registry.models import (
    Device,
    Enrollment,
)
from coordinator.registry.records import Assignment, Principal
from coordinator.registry.store import utc_now

log = logging.getLogger(__name__)


DEFAULT_ENROLLMENT_TTL = timedelta(hours=24)


class Enrollments(DeviceRecords):
    """Enrollment tokens and device credentials (stored as digests)."""

    def enroll_device(
        self,
        token: str,
        name: str,
        profile: str,
        calibration: Iterable[CalibrationPoint],
        supernode: tuple[str, int] | None = None,
    ) -> tuple[Assignment, str]:
        """Spend an enrollment token: register the device it names (an empty ``name`` takes the token's) and
        answer its new credential, the only copy there will be; a device already under that name is
        re-enrolled and its old credential stops working. One transaction: the token is spent if and only if
        the device is registered with the new credential."""
        now = utc_now()

        def spend(conn: Connection) -> tuple[Assignment, str]:
            row = conn.execute(select(Enrollment.id, Enrollment.name, Enrollment.expires_at, Enrollment.used_at)
                               .where(Enrollment.token_sha256 == digest(token)).with_for_update()).one_or_none()
            if row is None or row.used_at is not None or row.expires_at <= now:
                raise EnrollmentError("the enrollment token is unknown, spent or expired: ask the operator for "
                                      "a new one (dress-fleet devices enroll NAME)")
            if name and name != row.name:
                raise EnrollmentError(f"the enrollment token is for device {row.name!r}, not {name!r}")
            credential = new_secret(CREDENTIAL_PREFIX)
            fields = {**self._registration(row.name, profile, calibration), "credential_sha256": digest(credential),
                      **supernode_fields(supernode)}
            assignment = self._upsert_device(conn, row.name, fields)
            conn.execute(update(Enrollment).where(Enrollment.id == row.id)
                         .values(used_at=now, device_id=assignment.device_id))
            return assignment, credential

        assignment, credential = self._retry_insert(spend)
        log.info("enrolled device id %d", assignment.device_id)
        return assignment, credential

    def enroll(self, names: Iterable[str], ttl: timedelta = DEFAULT_ENROLLMENT_TTL) -> dict[str, str]:
        """A one-time token per device name, valid for ``ttl``, in one transaction; only digests are stored.

        A token lets its holder register once as that name (``enroll_device``); enrolling a name that is
        already registered lets a replacement device take it over."""
        names = list(dict.fromkeys(names))
        try:
            for name in names:
                check_name(name)
        except ValueError as e:
            raise InvalidInputError(str(e)) from e
        if ttl <= timedelta(0):
            raise InvalidInputError(f"an enrollment must stay valid for a positive time, got {ttl}")
        now = utc_now()
        tokens = {name: new_secret(TOKEN_PREFIX) for name in names}
        if tokens:
            with self._write() as conn:
                conn.execute(insert(Enrollment), [
                    {"name": name, "token_sha256": digest(token), "created_at": now, "expires_at": now + ttl}
                    for name, token in tokens.items()])
        return tokens

    def supernode_of(self, name: str) -> tuple[str | None, int | None]:
        """The digest of the SuperNode key registered for device ``name`` and its Flower node id (None, None)."""
        with self._read() as s:
            row = s.execute(select(Device.supernode_key_sha256, Device.flower_node_id)
                            .where(Device.name == name)).one_or_none()
        return (None, None) if row is None else (row[0], row[1])

    def authenticate(self, secret: str) -> Principal | None:
        """Who ``secret`` proves the caller is: the device whose credential it is, the name of an unspent and
        unexpired enrollment token, or None."""
        key = digest(secret)
        with self._read() as s:
            if secret.startswith(CREDENTIAL_PREFIX):
                row = s.execute(select(Device.id, Device.name).where(Device.credential_sha256 == key)).one_or_none()
                return None if row is None else Principal(row.name, row.id)
            if secret.startswith(TOKEN_PREFIX):
                name = s.scalar(select(Enrollment.name).where(
                    Enrollment.token_sha256 == key, Enrollment.used_at.is_(None), Enrollment.expires_at > utc_now()))
                return None if name is None else Principal(name, None)
        return None

