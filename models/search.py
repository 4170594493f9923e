"""Full-text search over segment text: FTS5 on SQLite, tsvector on PostgreSQL.

User queries are words or phrases, never FTS syntax: the query is cut into word tokens here and
each token is quoted, so `AND`, `"`, `*`, `-` or `:` in a query are just text. A query wrapped
in double quotes is a phrase (the words in order); otherwise every word must occur.

Only current transcripts are searched: per content that a scanned path holds now (`files.sha256`),
its newest transcript. A transcript of content no file holds any more (the file was fixed or
replaced and enqueued again) or an older transcript of the same content (another model, a rerun)
is left out, so each file answers with one transcript.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sqlalchemy import Select, func, select, text
from sqlalchemy.orm import Session

from models.tables import File, Job, Transcript

# Letters and digits, as FTS5's unicode61 and PostgreSQL's 'simple' parser cut words.
TOKEN = re.compile(r"[^\W_]+")


@dataclass(frozen=True)
class SearchHit:
    job_id: int
    path: str
    start_s: float
    end_s: float
    text: str
    language: str | None


def current_transcripts() -> Select:
    """SELECT transcript_id, job_id of the current transcripts: per content a scanned path holds, its newest."""
    ranked = (
        select(
            Transcript.id.label("transcript_id"),
            Transcript.job_id.label("job_id"),
            func.row_number()
            .over(partition_by=Job.sha256, order_by=(Transcript.created_at.desc(), Transcript.id.desc()))
            .label("rank"),
        )
        .join(Job, Job.id == Transcript.job_id)
        .where(Job.sha256.in_(select(File.sha256)))
        .subquery()
    )
    return select(ranked.c.transcript_id, ranked.c.job_id).where(ranked.c.rank == 1)


# The same in SQL, for the hand-written full-text queries below.
CURRENT_SQL = """
WITH current_transcripts AS (
    SELECT id FROM (
        SELECT t.id, row_number() OVER (PARTITION BY j.sha256 ORDER BY t.created_at DESC, t.id DESC) AS rank
        FROM transcripts t JOIN jobs j ON j.id = t.job_id
        WHERE j.sha256 IN (SELECT sha256 FROM files)
    ) ranked
    WHERE rank = 1
)"""


def query_tokens(query: str) -> tuple[list[str], bool]:
    """The query's words, and whether it asks for them as one phrase."""
    stripped = query.strip()
    phrase = len(stripped) > 1 and stripped[0] == stripped[-1] == '"'
    return TOKEN.findall(stripped), phrase


def _sqlite_match(tokens: list[str], phrase: bool) -> str:
    quoted = ['"' + t.replace('"', '""') + '"' for t in tokens]
    return '"' + " ".join(tokens) + '"' if phrase else " AND ".join(quoted)


SQLITE_SQL = CURRENT_SQL + """
SELECT j.id, j.path, s.start_s, s.end_s, s.text, t.language
FROM segments_fts
JOIN segments s ON s.id = segments_fts.rowid
JOIN transcripts t ON t.id = s.transcript_id
JOIN current_transcripts c ON c.id = t.id
JOIN jobs j ON j.id = t.job_id
WHERE segments_fts MATCH :match
ORDER BY bm25(segments_fts), j.path, s.start_s
LIMIT :limit
"""

# to_tsvector('simple', s.text) is spelled exactly as in the GIN index so the index is used.
POSTGRES_SQL = CURRENT_SQL + """
SELECT j.id, j.path, s.start_s, s.end_s, s.text, t.language
FROM segments s
JOIN transcripts t ON t.id = s.transcript_id
JOIN current_transcripts c ON c.id = t.id
JOIN jobs j ON j.id = t.job_id
WHERE to_tsvector('simple', s.text) @@ {tsquery}('simple', :query)
ORDER BY ts_rank(to_tsvector('simple', s.text), {tsquery}('simple', :query)) DESC, j.path, s.start_s
LIMIT :limit
"""


def search_segments(*, session: Session, query: str, limit: int = 50) -> list[SearchHit]:
    """Segments whose text matches the query's words (all of them, or the phrase), best first."""
    tokens, phrase = query_tokens(query)
    if not tokens:
        return []
    if session.get_bind().dialect.name == "sqlite":
        rows = session.execute(text(SQLITE_SQL), {"match": _sqlite_match(tokens, phrase), "limit": limit})
    else:
        sql = POSTGRES_SQL.format(tsquery="phraseto_tsquery" if phrase else "plainto_tsquery")
        rows = session.execute(text(sql), {"query": " ".join(tokens), "limit": limit})
    return [SearchHit(*row) for row in rows]
