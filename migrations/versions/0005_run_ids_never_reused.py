"""run ids are never reused: runs AUTOINCREMENT on SQLite

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-27 20:10:00

A run id is what users write down and share ("run 5"). SQLite's plain INTEGER PRIMARY KEY
hands out max(id) + 1, so deleting the newest run gave its id to the next run. AUTOINCREMENT
keeps a high-water mark (``sqlite_sequence``) instead. SQLite cannot add it in place: the
table is rebuilt with every row and id as they are (the copy sets the mark to the largest id
kept; an id deleted before this upgrade from the top can still come back once). PostgreSQL's
serial ids come from a sequence that never goes back: nothing to do there.
"""
from alembic import op


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    with op.batch_alter_table('runs', recreate='always', table_kwargs={'sqlite_autoincrement': True}):
        pass


def downgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    with op.batch_alter_table('runs', recreate='always', table_kwargs={'sqlite_autoincrement': False}):
        pass
