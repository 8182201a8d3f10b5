"""feedback: a reason code for agree / disagree (the free text stays in ``comment``)

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-05 12:00:00
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = '0004'
down_revision: str | None = '0003'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('feedback', schema=None) as batch_op:
        # server default only to fill the rows that exist; the application always sets it
        batch_op.add_column(sa.Column('reason', sa.String(length=64), nullable=False, server_default=''))
    with op.batch_alter_table('feedback', schema=None) as batch_op:
        batch_op.alter_column('reason', server_default=None)


def downgrade() -> None:
    with op.batch_alter_table('feedback', schema=None) as batch_op:
        batch_op.drop_column('reason')
