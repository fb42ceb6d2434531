"""Merge jobs: their records, the SQLite store, worker processes, cancellation and resume."""
