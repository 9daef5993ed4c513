"""api keys: hashed keys and mTLS identities with scopes and rate limits

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30 00:55:00
"""
import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('api_keys',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('kind', sa.String(length=8), nullable=False),
    sa.Column('owner', sa.String(length=255), nullable=False),
    sa.Column('scopes', sa.String(length=255), nullable=False),
    sa.Column('key_hash', sa.String(length=64), nullable=True),
    sa.Column('rate_per_s', sa.Float(), nullable=True),
    sa.Column('burst', sa.Integer(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('revoked_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('key_hash')
    )
    op.create_index('ix_api_keys_kind_owner', 'api_keys', ['kind', 'owner'])


def downgrade() -> None:
    op.drop_index('ix_api_keys_kind_owner', table_name='api_keys')
    op.drop_table('api_keys')
