"""Alembic migrations for the archive-asr database (run them with `archive-asr db upgrade`)."""

# Full-text objects that autogenerate cannot see or describe (raw SQL in the migrations):
# SQLite's FTS5 table and its shadow tables, PostgreSQL's expression GIN index.
FTS_OBJECTS = frozenset({
    "segments_fts", "segments_fts_data", "segments_fts_idx", "segments_fts_docsize",
    "segments_fts_config", "segments_fts_content", "ix_segments_text_fts",
})


def include_name(name, type_, parent_names) -> bool:
    """Autogenerate filter: everything except the full-text objects, by name."""
    return name not in FTS_OBJECTS


def include_object(obj, name, type_, reflected, compare_to) -> bool:
    return name not in FTS_OBJECTS
