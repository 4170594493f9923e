"""The database: tables (models.tables), engines and sessions (models.db), job states (models.jobs)."""

from models.base import Base
from models.tables import File, Job, JobStatus, Segment, Transcript, Word

__all__ = ["Base", "File", "Job", "JobStatus", "Segment", "Transcript", "Word"]
