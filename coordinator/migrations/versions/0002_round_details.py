"""Rounds carry their details (who trained, bytes per density, timings); metric reports go (no sender).

The launcher follows a run by reading the rounds table, so everything the live view and the report show of
a round is stored with it.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30 10:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("training_rounds") as batch:
        batch.add_column(sa.Column("details", sa.JSON(), nullable=True))
    op.drop_index("ix_metric_reports_device_id_id", table_name="metric_reports")
    op.drop_table("metric_reports")


def downgrade() -> None:
    op.create_table(
        "metric_reports",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("device_id", sa.Integer(), nullable=False),
        sa.Column("density", sa.Float(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("reported_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["device_id"], ["devices.id"], name=op.f("fk_metric_reports_device_id_devices"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_metric_reports")),
    )
    op.create_index("ix_metric_reports_device_id_id", "metric_reports", ["device_id", "id"])
    with op.batch_alter_table("training_rounds") as batch:
        batch.drop_column("details")
