"""One way to run a host program: a timeout always, and a failure that says what, why and the output's tail.

Used for every build, conversion and helper step (``qemu-img``, ``mke2fs``, ``mmdebstrap``, ...).  A program is
found on PATH or in /usr/sbin and /sbin (a normal user's PATH lacks them); one that is not installed names its
Debian package (:mod:`harness.core.programs`).

The few other places that start a process do what this cannot, each for its reason: the QEMU process itself
(:mod:`harness.vm.machine`: a long-lived child with its own shutdown), runs that stream into a log file
(``nestbed report``, ``nestbed soak``), a decompressor fed on stdin (:mod:`harness.vm.vmlinux`), and
:mod:`harness.hosts.hostfacts`, which also runs alone inside an L1 on the standard library.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

from harness.core import programs
from harness.errors import HarnessError

TAIL_LINES = 15


def run(argv: list[str], *, timeout: float, what: str, error: type[HarnessError] = HarnessError,
        cwd: Path | None = None, env: dict[str, str] | None = None,
        cause: Callable[[str], str] | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run *argv* (stdin closed, output captured) within *timeout* seconds.

    A missing program or a timeout raises *error* headed ``"<what>: ..."``, and so does a non-zero exit
    unless *check* is false (then the caller judges the result); a failure's message ends with the last
    lines of the output, and *cause* may name a cause the user can act on in the headline.
    """
    argv = [programs.find(argv[0]), *argv[1:]]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env,
                              stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise error(f"{what}: {programs.missing(argv[0])}") from None
    except subprocess.TimeoutExpired:
        raise error(f"{what}: {argv[0]} did not finish within {timeout:g} s") from None
    if check and proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-TAIL_LINES:])
        why = cause(proc.stdout + proc.stderr) if cause else ""
        raise error(f"{what}: {argv[0]} exited {proc.returncode}{': ' + why if why else ''}\n{tail}")
    return proc
