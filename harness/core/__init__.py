"""Foundations: cache paths and atomic publishing, host programs, progress lines, subprocesses, deadlines."""

__version__ = "0.1.0"
