"""Transcripts record how much audio was decoded and the decoder's warnings

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27

`transcripts.decoded_s`: seconds the decoder delivered (silence standing in for a damaged stretch
included); NULL for transcripts made before this revision. `transcripts.warnings`: what the
decoder had to say (a truncated file, a corrupt middle replaced by silence), one line each; NULL
when it had nothing to say. A partial transcript is one with warnings.
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = '0002'
down_revision: str | None = '0001'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('transcripts', schema=None) as batch_op:
        batch_op.add_column(sa.Column('decoded_s', sa.Float(), nullable=True))
        batch_op.add_column(sa.Column('warnings', sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('transcripts', schema=None) as batch_op:
        batch_op.drop_column('warnings')
        batch_op.drop_column('decoded_s')
