"""The scenarios' matrix: ``scenarios/matrix.toml`` applies whenever pytest collects this directory.

Exclusions always apply; ``--nestbed-tier`` and ``--nestbed-shard`` select on top of it
(see docs/reports.md).  ``--nestbed-matrix FILE`` picks another matrix.
"""

from __future__ import annotations

from pathlib import Path

import pytest

MATRIX = Path(__file__).with_name("matrix.toml")


def pytest_configure(config: pytest.Config) -> None:
    if not config.getoption("nestbed_matrix", None):
        config.option.nestbed_matrix = str(MATRIX)
