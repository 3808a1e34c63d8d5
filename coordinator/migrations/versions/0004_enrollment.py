"""Enrollment: one-time tokens per device name, the digest of each device's credential and SuperNode key.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30 23:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TIMESTAMP = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("devices") as batch:
        batch.add_column(sa.Column("credential_sha256", sa.String(64), nullable=True))
        batch.add_column(sa.Column("supernode_key_sha256", sa.String(64), nullable=True))
        batch.create_unique_constraint("uq_devices_credential_sha256", ["credential_sha256"])
    op.create_table(
        "enrollments",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("token_sha256", sa.String(64), nullable=False),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.Column("expires_at", TIMESTAMP, nullable=False),
        sa.Column("used_at", TIMESTAMP, nullable=True),
        sa.Column("device_id", sa.Integer(), nullable=True),
        sa.ForeignKeyConstraint(["device_id"], ["devices.id"], name="fk_enrollments_device_id_devices",
                                ondelete="SET NULL"),
        sa.PrimaryKeyConstraint("id", name="pk_enrollments"),
        sa.UniqueConstraint("token_sha256", name="uq_enrollments_token_sha256"),
    )
    op.create_index("ix_enrollments_name", "enrollments", ["name"])


def downgrade() -> None:
    op.drop_index("ix_enrollments_name", table_name="enrollments")
    op.drop_table("enrollments")
    with op.batch_alter_table("devices") as batch:
        batch.drop_constraint("uq_devices_credential_sha256", type_="unique")
        batch.drop_column("supernode_key_sha256")
        batch.drop_column("credential_sha256")
