"""The scheduler: the `archive-asr` CLI group, scanning, enqueueing, status, export, search, retry."""
