"""Engines and sessions. The schema is migrated to head the first time a process opens a database,
so `archive-asr enqueue` works on a fresh machine with no set-up step.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from archive_asr.errors import ConfigError, DatabaseUnavailable
from archive_asr.settings import get_settings, masked_url, private_dir

MIGRATIONS_DIR = Path(__file__).resolve().parents[1] / "migrations"
SQLITE_BUSY_TIMEOUT_S = 60  # several local workers write one SQLite file; wait, don't fail
PG_MIGRATION_LOCK = 0x61736172  # advisory lock id ("asar"): one process migrates at a time
DISK_FULL_BYTES = 1 << 20  # less free space than this beside a SQLite file that fails: the disk is full
# What SQLite and PostgreSQL say when the disk is full (SQLite often only says "disk I/O error").
DISK_ERRORS = ("disk I/O error", "database or disk is full", "No space left on device", "could not extend file")

_engines: dict[str, Engine] = {}
_migrated: set[str] = set()
_makers: dict[str, sessionmaker] = {}
_lock = threading.Lock()


def safe_url(url: str) -> str:
    """The URL with any password hidden, for messages (a password holding an unescaped '@' included)."""
    return masked_url(url)


def _normalise(url: str) -> str:
    # psycopg (v3) is what we install; a bare postgresql:// would look for psycopg2.
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        url = "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    # Let SQLAlchemy's "begin" event start transactions (below), not pysqlite's deferred BEGIN.
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA foreign_keys=ON")  # so deleting a transcript deletes its segments and words
    cur.execute("PRAGMA journal_mode=WAL")  # readers (status, search) don't block the writing worker
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def _sqlite_begin_immediate(conn) -> None:
    # Take the write lock at BEGIN: a deferred transaction that reads, then writes, fails with
    # "database is locked" at once (no busy wait) when another process wrote in between, which is
    # the normal case with several local workers sharing one file.
    conn.exec_driver_sql("BEGIN IMMEDIATE")


def _create(url: str) -> Engine:
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError) as e:  # ValueError: a port that is not a number
        raise ConfigError(f"ARCHIVE_ASR_DATABASE_URL is not a database URL ({e}): {safe_url(url)}") from e
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            _create_private_file(Path(parsed.database).expanduser())
        engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S})
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin_immediate)
    else:
        # prepare_threshold=None: psycopg would otherwise prepare a statement after 5 runs and
        # PostgreSQL keep a generic plan made while the table was small (a sequential scan for
        # `key IN (...)`), which made enqueueing 100,000 files crawl as the tables grew.
        engine = create_engine(url, pool_pre_ping=True, connect_args={"connect_timeout": 10, "prepare_threshold": None})
    return engine


def _create_private_file(path: Path) -> None:
    """A new SQLite file is made 0600 (SQLite gives its -wal and -shm files the same mode); an
    existing one keeps its mode."""
    private_dir(path.parent)
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass
    except OSError:
        pass  # SQLite will say why (read-only folder, full disk) in its own words


def _disk_full(url: str, reason: str) -> str | None:
    """'disk full: ...' when this failure is a full disk, else None."""
    if not any(marker in reason for marker in DISK_ERRORS):
        return None
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        parsed = None
    if parsed is not None and parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        folder = Path(parsed.database).expanduser().parent
        try:
            free = shutil.disk_usage(folder).free
        except OSError:
            return None
        if free >= DISK_FULL_BYTES and "disk is full" not in reason:
            return None  # a real I/O error, not space
        return f"disk full ({free} bytes free in {folder}): free some space and start again"
    if "No space left on device" in reason or "could not extend file" in reason:
        return f"disk full on the database server ({reason})"
    return None


def connect_error(url: str, e: Exception) -> DatabaseUnavailable:
    """One readable line for a database that does not answer (or whose disk is full)."""
    reason = str(getattr(e, "orig", None) or e).strip().splitlines()
    first = reason[0] if reason else type(e).__name__
    return DatabaseUnavailable(f"cannot open the database {safe_url(url)}: {_disk_full(url, first) or first}")


def get_engine(url: str | None = None, *, migrate: bool = True) -> Engine:
    """The engine for `url` (default: the settings' database), migrated to head on first use."""
    url = _normalise(url or get_settings().resolved_database_url)
    with _lock:
        engine = _engines.get(url)
        if engine is None:
            engine = _create(url)
            try:
                with engine.connect() as conn:
                    conn.execute(text("SELECT 1"))
            except DBAPIError as e:
                engine.dispose()
                raise connect_error(url, e) from e
            _engines[url] = engine
        if migrate and url not in _migrated:
            try:
                upgrade(engine)
            except DBAPIError as e:
                raise connect_error(url, e) from e
            _migrated.add(url)
        return engine


def dispose_engines() -> None:
    """Close every pooled connection (tests, and processes that fork)."""
    with _lock:
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()
        _makers.clear()
        _migrated.clear()


def alembic_config(engine: Engine | None = None):
    """An Alembic Config that works from any cwd (script_location is this package's folder)."""
    from alembic.config import Config

    config = Config(str(MIGRATIONS_DIR / "alembic.ini"))
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if engine is not None:
        config.attributes["engine"] = engine
    return config


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


@contextmanager
def _migration_lock(engine: Engine) -> Iterator[None]:
    """Two processes starting on a fresh database must not both create it."""
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": PG_MIGRATION_LOCK})
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": PG_MIGRATION_LOCK})
                conn.commit()
    elif engine.url.database and engine.url.database != ":memory:":
        lock_path = Path(engine.url.database).expanduser().with_suffix(".migrate.lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock
    else:
        yield


def upgrade(engine: Engine, revision: str = "head") -> str | None:
    """Migrate to `revision` unless already there; return the revision now current."""
    from alembic import command

    head = head_revision()
    if revision == "head" and current_revision(engine) == head:
        return head
    with _migration_lock(engine):
        if not (revision == "head" and current_revision(engine) == head):
            command.upgrade(alembic_config(engine), revision)
    return current_revision(engine)


def session_factory(url: str | None = None) -> sessionmaker:
    url = _normalise(url or get_settings().resolved_database_url)
    engine = get_engine(url)
    with _lock:
        maker = _makers.get(url)
        if maker is None:
            maker = _makers[url] = sessionmaker(engine, expire_on_commit=False)
        return maker


@contextmanager
def session_scope(url: str | None = None) -> Iterator[Session]:
    """One transaction: commit on success, roll back on error."""
    session = session_factory(url)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
