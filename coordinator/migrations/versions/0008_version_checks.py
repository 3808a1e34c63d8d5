"""Version checks: each device's accuracy under a model version on its own labelled images, per density.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07 10:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | Sequence[str] | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "version_checks",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("device_id", sa.Integer(), nullable=False),
        sa.Column("model_version", sa.String(128), nullable=False),
        sa.Column("density", sa.Float(), nullable=False),
        sa.Column("examples", sa.Integer(), nullable=False),
        sa.Column("correct", sa.Integer(), nullable=False),
        sa.Column("checked_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["device_id"], ["devices.id"], name="fk_version_checks_device_id_devices",
                                ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["model_version"], ["model_versions.version"],
                                name="fk_version_checks_model_version_model_versions", ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name="pk_version_checks"),
        sa.UniqueConstraint("device_id", "model_version", "density", name="uq_version_checks_device_version_density"),
    )
    op.create_index("ix_version_checks_model_version", "version_checks", ["model_version"])


def downgrade() -> None:
    op.drop_index("ix_version_checks_model_version", table_name="version_checks")
    op.drop_table("version_checks")
