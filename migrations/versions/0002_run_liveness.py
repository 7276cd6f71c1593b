"""run liveness: heartbeat, host and pid of the process that owns a run

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26 11:56:58

A run left 'running' by a process that died (SIGKILL, power cut) is detected
from these and shown as interrupted. Rows written before this revision keep
NULL here: they are judged by started_utc alone.
"""
from alembic import op
import sqlalchemy as sa


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nullable columns only: SQLite adds them in place (no table rebuild), existing rows untouched.
    with op.batch_alter_table('runs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('heartbeat_utc', sa.DateTime(), nullable=True))
        batch_op.add_column(sa.Column('hostname', sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column('pid', sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('runs', schema=None) as batch_op:
        batch_op.drop_column('pid')
        batch_op.drop_column('hostname')
        batch_op.drop_column('heartbeat_utc')
