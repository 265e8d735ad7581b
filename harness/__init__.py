"""nestbed: a test harness for nested virtualization on QEMU/KVM.

The public face::

    from harness import boot, BootOptions, Guest     # harness.guest
    from harness import boot_l1, boot_hosts, L1Host   # harness.nested
    from harness import errors                        # the error tree

The library knows nothing of pytest; the pytest plugin is ``nestbed_fixtures`` (source: ``fixtures/``).
Names load on first use, so ``python3 -S -m harness matrix`` still runs on the standard library alone.
"""

from __future__ import annotations

import importlib
from typing import Any

from harness.core import __version__

_PUBLIC = {"boot": "harness.guest", "BootOptions": "harness.guest", "Guest": "harness.guest",
           "boot_l1": "harness.nested", "boot_hosts": "harness.nested", "L1Host": "harness.nested"}
__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'harness' has no attribute {name!r}")
