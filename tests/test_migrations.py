"""Migrations run up, down and up again on SQLite and PostgreSQL, and match the models exactly."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from migrations import include_name, include_object
from models.base import Base
from models.db import _create, alembic_config, current_revision, head_revision
from tests.fixtures_db import db_url  # noqa: F401


def _differences(engine: sa.Engine) -> list:
    with engine.connect() as conn:
        context = MigrationContext.configure(
            conn, opts={"include_name": include_name, "include_object": include_object, "compare_type": True}
        )
        return compare_metadata(context, Base.metadata)


def _fts_objects(engine: sa.Engine) -> set[str]:
    with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            rows = conn.execute(sa.text("SELECT name FROM sqlite_master WHERE name LIKE 'segments_fts%'"))
        else:
            rows = conn.execute(sa.text("SELECT indexname FROM pg_indexes WHERE indexname = 'ix_segments_text_fts'"))
        return {r[0] for r in rows}


def test_upgrade_downgrade_upgrade_matches_models(db_url):
    engine = _create(db_url)
    config = alembic_config(engine)
    try:
        command.upgrade(config, "head")
        assert current_revision(engine) == head_revision()
        assert _fts_objects(engine), "full-text objects missing after upgrade"

        command.downgrade(config, "base")
        assert current_revision(engine) is None
        assert set(sa.inspect(engine).get_table_names()) <= {"alembic_version"}
        assert not _fts_objects(engine)

        command.upgrade(config, "head")
        assert {"jobs", "files", "transcripts", "segments", "words"} <= set(sa.inspect(engine).get_table_names())
        assert _differences(engine) == []
    finally:
        engine.dispose()


def test_autogenerate_sees_a_real_difference(db_url):
    """The comparison can fail: drop an index the models declare and it must be reported."""
    engine = _create(db_url)
    try:
        command.upgrade(alembic_config(engine), "head")
        with engine.begin() as conn:
            conn.execute(sa.text("DROP INDEX ix_jobs_worker_host"))
        diffs = _differences(engine)
        assert any(d[0] == "add_index" and d[1].name == "ix_jobs_worker_host" for d in diffs), diffs
    finally:
        engine.dispose()
