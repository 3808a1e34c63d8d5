"""Staged rollouts: a model version's status, canary share and decision; the version each heartbeat's Predict
use was served by.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07 03:50:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

STATUS = sa.Enum("candidate", "promoted", "rolled-back", "superseded", name="version_status", native_enum=False,
                 create_constraint=True, length=32)


def upgrade() -> None:
    with op.batch_alter_table("model_versions") as batch:  # versions published before rollouts were promoted
        batch.add_column(sa.Column("status", STATUS, nullable=False, server_default="promoted"))
        batch.add_column(sa.Column("canary", sa.Float(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("decided_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("reason", sa.String(512), nullable=True))
    with op.batch_alter_table("model_versions") as batch:  # new rows always say, as the models declare
        batch.alter_column("status", server_default=None)
        batch.alter_column("canary", server_default=None)
    with op.batch_alter_table("budgets") as batch:
        batch.add_column(sa.Column("model_version", sa.String(128), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("budgets") as batch:
        batch.drop_column("model_version")
    with op.batch_alter_table("model_versions") as batch:
        batch.drop_constraint("version_status", type_="check")
        batch.drop_column("reason")
        batch.drop_column("decided_at")
        batch.drop_column("canary")
        batch.drop_column("status")
