"""time a run spent stopped: runs.stopped_s

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27 18:05:00

An interrupted run resumed later (``sweep --resume``) keeps its first start, so "took"
(first start to last end) counted the hours it sat stopped. ``stopped_s`` adds up, at each
resume, the time since the run last ended (or last beat, for a killed process); the report
shows the time measured without it. NULL (rows before this revision, runs never resumed): 0.
"""
from alembic import op
import sqlalchemy as sa


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A nullable column: SQLite adds it in place (no table rebuild), existing rows untouched.
    with op.batch_alter_table('runs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('stopped_s', sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('runs', schema=None) as batch_op:
        batch_op.drop_column('stopped_s')
