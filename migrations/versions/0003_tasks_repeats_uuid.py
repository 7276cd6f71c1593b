"""question tasks, repeated measurements, portable run ids

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27 07:00:00

- runs.uuid: an identity that survives export/import between stores (backfilled).
- runs.attn_implementation: the attention kernel the model ran with.
- samples: one set of columns for every question task (passkey, RULER, needle grid,
  LongBench): subtask, protocol, context_length, needle_depth, question_tokens,
  answers_json, score (0..1) and score_metric. The passkey-only columns are folded in
  (passkey_length -> context_length, passkey_depth -> needle_depth, passkey ->
  answers_json, correct -> score) and dropped.
- samples.repeat: the measurement round of a cell; the cell's unique key includes it.
- samples.batch_size: prompts generated together.
"""
import uuid

import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('runs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('uuid', sa.String(length=36), nullable=True))
        batch_op.add_column(sa.Column('attn_implementation', sa.String(length=32), nullable=True))
    conn = op.get_bind()
    runs = sa.table('runs', sa.column('id', sa.Integer), sa.column('uuid', sa.String))
    for (run_id,) in conn.execute(sa.select(runs.c.id)).all():
        conn.execute(runs.update().where(runs.c.id == run_id).values(uuid=str(uuid.uuid4())))
    with op.batch_alter_table('runs', schema=None) as batch_op:
        batch_op.alter_column('uuid', existing_type=sa.String(length=36), nullable=False)
        batch_op.create_unique_constraint('uq_runs_uuid', ['uuid'])

    with op.batch_alter_table('samples', schema=None) as batch_op:
        batch_op.add_column(sa.Column('repeat', sa.Integer(), nullable=False, server_default='0'))
        batch_op.add_column(sa.Column('subtask', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('protocol', sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column('context_length', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('needle_depth', sa.Float(), nullable=True))
        batch_op.add_column(sa.Column('question_tokens', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('answers_json', sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column('score', sa.Float(), nullable=True))
        batch_op.add_column(sa.Column('score_metric', sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column('batch_size', sa.Integer(), nullable=True))

    samples = sa.table('samples', sa.column('id', sa.Integer), sa.column('task', sa.String),
                       sa.column('passkey', sa.String), sa.column('passkey_length', sa.Integer),
                       sa.column('passkey_depth', sa.Float), sa.column('correct', sa.Integer),
                       sa.column('subtask', sa.String), sa.column('protocol', sa.String),
                       sa.column('context_length', sa.Integer), sa.column('needle_depth', sa.Float),
                       sa.column('answers_json', sa.JSON), sa.column('score', sa.Float),
                       sa.column('score_metric', sa.String))
    old = conn.execute(sa.select(samples.c.id, samples.c.passkey, samples.c.passkey_length,
                                 samples.c.passkey_depth, samples.c.correct)
                       .where(samples.c.task == 'passkey')).all()
    for sid, key, length, depth, correct in old:
        # The old passkey task compressed the question with the context ("query-aware").
        conn.execute(samples.update().where(samples.c.id == sid).values(
            subtask='passkey', protocol='query-aware', context_length=length, needle_depth=depth,
            answers_json=[key] if key is not None else None,
            score=float(correct) if correct is not None else None,
            score_metric='passkey_digits' if correct is not None else None))

    with op.batch_alter_table('samples', schema=None) as batch_op:
        batch_op.drop_constraint('uq_samples_cell', type_='unique')
        batch_op.create_unique_constraint('uq_samples_cell', ['run_id', 'sample_index', 'config_key', 'repeat'])
        batch_op.drop_column('passkey')
        batch_op.drop_column('passkey_length')
        batch_op.drop_column('passkey_depth')
        batch_op.drop_column('correct')


def downgrade() -> None:
    with op.batch_alter_table('samples', schema=None) as batch_op:
        batch_op.add_column(sa.Column('correct', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('passkey_depth', sa.Float(), nullable=True))
        batch_op.add_column(sa.Column('passkey_length', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('passkey', sa.String(length=32), nullable=True))
    conn = op.get_bind()
    samples = sa.table('samples', sa.column('id', sa.Integer), sa.column('subtask', sa.String),
                       sa.column('passkey', sa.String), sa.column('passkey_length', sa.Integer),
                       sa.column('passkey_depth', sa.Float), sa.column('correct', sa.Integer),
                       sa.column('context_length', sa.Integer), sa.column('needle_depth', sa.Float),
                       sa.column('answers_json', sa.JSON), sa.column('score', sa.Float))
    rows = conn.execute(sa.select(samples.c.id, samples.c.answers_json, samples.c.context_length,
                                  samples.c.needle_depth, samples.c.score)
                        .where(samples.c.subtask == 'passkey')).all()
    for sid, answers, length, depth, score in rows:
        conn.execute(samples.update().where(samples.c.id == sid).values(
            passkey=(answers or [None])[0], passkey_length=length, passkey_depth=depth,
            correct=None if score is None else int(score >= 0.5)))
    with op.batch_alter_table('samples', schema=None) as batch_op:
        batch_op.drop_constraint('uq_samples_cell', type_='unique')
        batch_op.create_unique_constraint('uq_samples_cell', ['run_id', 'sample_index', 'config_key'])
        for col in ('batch_size', 'score_metric', 'score', 'answers_json', 'question_tokens', 'needle_depth',
                    'context_length', 'protocol', 'subtask', 'repeat'):
            batch_op.drop_column(col)
    with op.batch_alter_table('runs', schema=None) as batch_op:
        batch_op.drop_constraint('uq_runs_uuid', type_='unique')
        batch_op.drop_column('attn_implementation')
        batch_op.drop_column('uuid')
