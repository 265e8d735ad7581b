"""nestbed: a test harness for nested virtualization on QEMU/KVM.

The library knows nothing of pytest; the pytest plugin is the ``fixtures`` package.
"""

__version__ = "0.1.0"
