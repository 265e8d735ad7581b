"""The VM process: machine spec and its argv, the QEMU process, its console, snapshots."""
