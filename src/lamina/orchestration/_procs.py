"""What replica and job processes share: signalling a process's whole group, and the end of its log."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path

#: how much of the end of a log is read for its last lines
_TAIL_BYTES = 64 * 1024


def signal_group(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    """Signal the process's whole group (it leads its own session), or it alone when that is not allowed;
    a process already gone is no error."""
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        return
    except PermissionError:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(sig)


def tail_lines(path: Path, lines: int) -> str:
    """The last ``lines`` lines of the file at ``path`` ('' if there is none)."""
    try:
        with path.open("rb") as log:
            size = log.seek(0, os.SEEK_END)
            log.seek(max(size - _TAIL_BYTES, 0))
            data = log.read()
    except OSError:
        return ""
    text = data.decode("utf-8", errors="replace").rstrip("\n")
    return "\n".join(text.splitlines()[-lines:])
