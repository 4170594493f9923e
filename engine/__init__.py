"""The single-mel batched Whisper engine: audio in, typed records out.

Imports no database, Celery or click, so it runs alone in benchmarks. Importing this package
loads an optimised BLAS for MLX on Linux CPUs (see ``engine.blas``) before MLX itself is imported
anywhere in the process; it loads no model.
"""

from engine import blas as _blas

_blas.ensure_fast_blas()
