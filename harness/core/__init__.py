"""Foundations: cache paths and atomic publishing, host programs, progress lines, subprocesses."""

__version__ = "0.1.0"
