"""initial schema: runs and samples

Revision ID: 0001
Revises:
Create Date: 2026-11-26 11:56:49

Everything in knormctl/store/models.py at the time, except the run-liveness
columns (heartbeat_utc, hostname, pid), which 0002 adds.
"""
from alembic import op
import sqlalchemy as sa


revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('runs',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('command', sa.String(length=32), nullable=False),
    sa.Column('task', sa.String(length=32), nullable=False),
    sa.Column('status', sa.String(length=32), nullable=False),
    sa.Column('group_name', sa.String(length=200), nullable=True),
    sa.Column('shard', sa.String(length=32), nullable=True),
    sa.Column('resumed_from', sa.Integer(), nullable=True),
    sa.Column('started_utc', sa.DateTime(), nullable=False),
    sa.Column('ended_utc', sa.DateTime(), nullable=True),
    sa.Column('command_line', sa.Text(), nullable=False),
    sa.Column('model_requested', sa.String(length=500), nullable=False),
    sa.Column('model_resolved', sa.Text(), nullable=True),
    sa.Column('model_hash', sa.String(length=128), nullable=True),
    sa.Column('dtype', sa.String(length=32), nullable=True),
    sa.Column('device', sa.String(length=64), nullable=True),
    sa.Column('knormctl_version', sa.String(length=64), nullable=True),
    sa.Column('git_commit', sa.String(length=64), nullable=True),
    sa.Column('samples_done', sa.Integer(), nullable=False),
    sa.Column('samples_failed', sa.Integer(), nullable=False),
    sa.Column('samples_planned', sa.Integer(), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('config_json', sa.JSON(), nullable=False),
    sa.Column('env_json', sa.JSON(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_runs'))
    )
    with op.batch_alter_table('runs', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_runs_group_name'), ['group_name'], unique=False)
        batch_op.create_index(batch_op.f('ix_runs_status'), ['status'], unique=False)

    op.create_table('samples',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('run_id', sa.Integer(), nullable=False),
    sa.Column('created_utc', sa.DateTime(), nullable=False),
    sa.Column('task', sa.String(length=32), nullable=False),
    sa.Column('sample_index', sa.Integer(), nullable=False),
    sa.Column('config_key', sa.String(length=200), nullable=False),
    sa.Column('dataset', sa.String(length=200), nullable=False),
    sa.Column('doc_id', sa.String(length=200), nullable=True),
    sa.Column('doc_title', sa.String(length=500), nullable=True),
    sa.Column('char_offset', sa.Integer(), nullable=True),
    sa.Column('text_hash', sa.String(length=64), nullable=True),
    sa.Column('prompt_tokens', sa.Integer(), nullable=False),
    sa.Column('press', sa.String(length=64), nullable=False),
    sa.Column('keep_ratio', sa.Float(), nullable=False),
    sa.Column('prune_after', sa.Integer(), nullable=False),
    sa.Column('skip_layers', sa.String(length=200), nullable=False),
    sa.Column('compress_mode', sa.String(length=16), nullable=False),
    sa.Column('keep_recent', sa.Integer(), nullable=False),
    sa.Column('new_tokens', sa.Integer(), nullable=True),
    sa.Column('ttft_s', sa.Float(), nullable=True),
    sa.Column('tpot_s', sa.Float(), nullable=True),
    sa.Column('itl_p50_s', sa.Float(), nullable=True),
    sa.Column('itl_p90_s', sa.Float(), nullable=True),
    sa.Column('itl_p99_s', sa.Float(), nullable=True),
    sa.Column('throughput_tps', sa.Float(), nullable=True),
    sa.Column('total_s', sa.Float(), nullable=True),
    sa.Column('peak_mem_bytes', sa.BigInteger(), nullable=True),
    sa.Column('peak_mem_kind', sa.String(length=64), nullable=True),
    sa.Column('peak_mem_reason', sa.Text(), nullable=True),
    sa.Column('kv_bytes_peak', sa.BigInteger(), nullable=True),
    sa.Column('kv_bytes_final', sa.BigInteger(), nullable=True),
    sa.Column('kv_entries_peak', sa.BigInteger(), nullable=True),
    sa.Column('kv_entries_final', sa.BigInteger(), nullable=True),
    sa.Column('compress_events', sa.Integer(), nullable=True),
    sa.Column('compress_time_s', sa.Float(), nullable=True),
    sa.Column('ppl_context', sa.Float(), nullable=True),
    sa.Column('ppl_compressed', sa.Float(), nullable=True),
    sa.Column('eval_tokens', sa.Integer(), nullable=True),
    sa.Column('token_match', sa.Float(), nullable=True),
    sa.Column('passkey_depth', sa.Float(), nullable=True),
    sa.Column('passkey_length', sa.Integer(), nullable=True),
    sa.Column('passkey', sa.String(length=32), nullable=True),
    sa.Column('correct', sa.Integer(), nullable=True),
    sa.Column('generated_text', sa.Text(), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('generated_ids_json', sa.JSON(), nullable=True),
    sa.Column('step_latencies_json', sa.JSON(), nullable=True),
    sa.Column('extra_json', sa.JSON(), nullable=True),
    sa.ForeignKeyConstraint(['run_id'], ['runs.id'], name=op.f('fk_samples_run_id_runs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_samples')),
    sa.UniqueConstraint('run_id', 'sample_index', 'config_key', name='uq_samples_cell')
    )
    with op.batch_alter_table('samples', schema=None) as batch_op:
        batch_op.create_index('ix_samples_run_config', ['run_id', 'config_key'], unique=False)
        batch_op.create_index(batch_op.f('ix_samples_run_id'), ['run_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('samples', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_samples_run_id'))
        batch_op.drop_index('ix_samples_run_config')

    op.drop_table('samples')
    with op.batch_alter_table('runs', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_runs_status'))
        batch_op.drop_index(batch_op.f('ix_runs_group_name'))

    op.drop_table('runs')
