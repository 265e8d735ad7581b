"""Talking to a guest: serial console, SSH (direct or through a host), keys, the testinfra backend."""
