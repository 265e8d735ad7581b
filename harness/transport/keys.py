"""SSH keys: the per-cache client keypair and build-time host keys.

The client key lives in ``<cache>/keys/`` (0700), its private half 0600.  Host keys are
generated when an image is built and recorded in its manifest, so clients pin them
(no trust-on-first-use, no AutoAddPolicy).
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from harness.core import paths
from harness.core.publish import publish, write_atomic


def _openssh_pair(comment: str) -> tuple[bytes, str]:
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, f"{public.decode()} {comment}"


def key_dir() -> Path:
    return paths.private_dir(paths.cache_root() / "keys")


def client_keypair() -> tuple[Path, str]:
    """(private key path, public key line) of this cache's client key; created once."""
    d = key_dir()
    priv, pub = d / "id_ed25519", d / "id_ed25519.pub"

    def make(tmp: Path) -> None:
        # One artifact, published by the private half's rename: the public half goes in first.
        private, public = _openssh_pair("nestbed-client")
        write_atomic(pub, public + "\n")
        write_atomic(tmp, private, mode=0o600)

    publish(priv, make, what="client key", exists=lambda p: p.is_file() and pub.is_file(), timeout=60)
    os.chmod(priv, 0o600)
    return priv, pub.read_text().strip()


def new_host_key(comment: str = "nestbed-host") -> tuple[bytes, str]:
    """A fresh ed25519 host key: (OpenSSH private key bytes, public key line)."""
    return _openssh_pair(comment)
