"""Alembic environment: the metadata is models.Base.metadata, the URL comes from the settings.

Called from `models.db.upgrade` with an engine in `config.attributes["engine"]`, or from the
alembic command line, where the URL is the settings' database URL.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

import models  # noqa: F401  (registers every table on Base.metadata)
from migrations import include_name, include_object
from models.base import Base

config = context.config
target_metadata = Base.metadata


def _configure(**kwargs) -> None:
    context.configure(
        target_metadata=target_metadata,
        include_object=include_object,
        include_name=include_name,
        compare_type=True,
        **kwargs,
    )


def run_offline() -> None:
    from archive_asr.settings import get_settings

    url = get_settings().resolved_database_url
    _configure(url=url, literal_binds=True, render_as_batch=url.startswith("sqlite"))
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    engine = config.attributes.get("engine")
    if engine is None:
        from models.db import _normalise
        from archive_asr.settings import get_settings

        engine = create_engine(_normalise(get_settings().resolved_database_url))
    with engine.connect() as connection:
        _configure(connection=connection, render_as_batch=connection.dialect.name == "sqlite")
        with context.begin_transaction():
            context.run_migrations()
        connection.commit()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
