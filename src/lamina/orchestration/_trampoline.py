"""Exec a replica's command so that it dies with the process that started it.

    python -m lamina.orchestration._trampoline PARENT_PID -- COMMAND [ARG ...]

The child asks Linux for ``PR_SET_PDEATHSIG`` (SIGTERM when its parent thread exits), checks that the
parent is still there, then execs the command in place (same pid; the setting survives exec). This is
done in the child rather than with subprocess's ``preexec_fn`` because that runs the parent's at-fork
handlers in the child, and in a threaded parent those can deadlock (OpenTelemetry's TracerProvider starts
a thread pool in its handler: the child hung before exec).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def main(argv: list[str]) -> None:
    if len(argv) < 3 or argv[1] != "--":
        sys.exit("usage: python -m lamina.orchestration._trampoline PARENT_PID -- COMMAND [ARG ...]")
    parent, command = int(argv[0]), argv[2:]
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    if os.getppid() != parent:  # the parent died before prctl took effect
        sys.exit(1)
    os.execvp(command[0], command)


if __name__ == "__main__":
    main(sys.argv[1:])
